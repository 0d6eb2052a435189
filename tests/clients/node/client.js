#!/usr/bin/env node
// A Node client of the nbdgw gRPC API (@grpc/grpc-js + @grpc/proto-loader, loading the .proto
// files at run time). It calls every RPC of nbdgw.v1.BitmapService and grpc.health.v1.Health
// against a running gateway and prints one JSON document with what it saw, so that a test can
// check it against the Python side. It proves the API is usable from another language without
// generated code.
//
//   node client.js --target HOST:PORT --export NAME --bitmap CONTEXT [--token TOKEN] [--clear]
//                  [--tls-ca FILE [--tls-cert FILE --tls-key FILE] [--tls-server-name NAME]]
//
// Numbers that are uint64 on the wire are printed as decimal strings (JSON numbers lose
// precision past 2^53). Exit code 0 when every call behaved as the API promises, 1 otherwise
// (the JSON then has an "error" member).
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const crypto = require("node:crypto");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const ROOT = path.resolve(__dirname, "..", "..", "..");
const PROTO_DIR = path.join(ROOT, "proto");
const THIRD_PARTY = path.join(PROTO_DIR, "third_party");
const LOADER_OPTIONS = {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_DIR, THIRD_PARTY],
};

// grpc.health.v1 is not among our .proto files: describe it inline (protobufjs JSON).
const HEALTH_JSON = {
  nested: {
    grpc: {
      nested: {
        health: {
          nested: {
            v1: {
              nested: {
                HealthCheckRequest: { fields: { service: { type: "string", id: 1 } } },
                HealthCheckResponse: {
                  fields: { status: { type: "ServingStatus", id: 1 } },
                  nested: {
                    ServingStatus: {
                      values: { UNKNOWN: 0, SERVING: 1, NOT_SERVING: 2, SERVICE_UNKNOWN: 3 },
                    },
                  },
                },
                Health: {
                  methods: {
                    Check: {
                      requestType: "HealthCheckRequest",
                      responseType: "HealthCheckResponse",
                    },
                  },
                },
              },
            },
          },
        },
      },
    },
  },
};

const OPTIONS = [
  "--target",
  "--export",
  "--bitmap",
  "--token",
  "--tls-ca",
  "--tls-cert",
  "--tls-key",
  "--tls-server-name",
];

function parseArgs(argv) {
  const args = { target: process.env.NBDGW_TARGET || "127.0.0.1:50051", token: null, clear: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--clear") args.clear = true;
    else if (OPTIONS.includes(a) && i + 1 < argv.length)
      args[a.slice(2)] = argv[++i];
    else throw new Error(`unknown argument ${a}`);
  }
  if (!args.export || !args.bitmap) throw new Error("--export and --bitmap are required");
  return args;
}

// google.rpc.Status and its details, decoded from the grpc-status-details-bin trailer
// (grpc-js passes the trailer through without decoding it).
const rpcRoot = new protobuf.Root();
rpcRoot.resolvePath = (_origin, target) => path.join(THIRD_PARTY, target);
rpcRoot.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"]);
rpcRoot.resolveAll();
const Status = rpcRoot.lookupType("google.rpc.Status");

function decodeStatusDetails(err) {
  const raw = err.metadata && err.metadata.get("grpc-status-details-bin");
  if (!raw || raw.length === 0) return [];
  const status = Status.decode(raw[0]);
  return status.details.map((any) => {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf("/") + 1);
    const type = rpcRoot.lookupType(typeName);
    return { type: typeName, value: type.toObject(type.decode(any.value), { longs: String }) };
  });
}

function describeError(err) {
  return {
    code: err.code,
    name: Object.keys(grpc.status).find((k) => grpc.status[k] === err.code),
    message: err.details,
    details: decodeStatusDetails(err),
  };
}

function unary(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + 30000);
    client[method](request, metadata, { deadline }, (err, resp) =>
      err ? reject(err) : resolve(resp),
    );
  });
}

// Runs a StreamExtents call to its end; with stopAfter, cancels it after that many messages
// (as a client that dies mid-stream would) and returns what it got.
function stream(client, request, metadata, stopAfter = null, method = "StreamExtents") {
  return new Promise((resolve, reject) => {
    const messages = [];
    let cancelled = false;
    const call = client[method](request, metadata);
    call.on("data", (msg) => {
      if (cancelled) return;
      messages.push(msg);
      if (stopAfter !== null && messages.length >= stopAfter) {
        cancelled = true;
        call.cancel();
        resolve(messages);
      }
    });
    call.on("error", (err) => {
      if (cancelled && err.code === grpc.status.CANCELLED) return;
      reject(err);
    });
    call.on("end", () => {
      if (!cancelled) resolve(messages);
    });
  });
}

// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), a table a byte at a time: small and
// fast enough for a test client (Node has no CRC32C of its own, and this saves a dependency).
const CRC32C_TABLE = new Uint32Array(256).map((_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
  return c >>> 0;
});

function crc32c(buf) {
  let c = 0xffffffff;
  for (let i = 0; i < buf.length; i++) c = CRC32C_TABLE[(c ^ buf[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

// Every message with data carries the CRC32C of its data: check it before using any of it.
function checkData(msg) {
  if (!msg.data.length) return;
  const where = `[${msg.offset}, ${msg.next_offset})`;
  // This client asks for no compression: Node 20's zlib has no zstd (Node 22.15 adds it).
  if (msg.data_compression) throw new Error(`data of ${where}: unexpected ${msg.data_compression}`);
  if (msg._data_crc32c !== "data_crc32c") throw new Error(`data of ${where} has no CRC32C`);
  const got = crc32c(msg.data);
  if (got !== msg.data_crc32c)
    throw new Error(
      `data of ${where} is corrupt: CRC32C ${got.toString(16)} where the gateway sent ` +
        msg.data_crc32c.toString(16),
    );
}

// The stream digest (nbdgw/integrity.py, RangeDigest, which defines it): the range in 1 MiB
// blocks; each block holding a non-zero byte of delivered data (everything else counts as
// zeros) extends chain = H(chain || lo || hi || H(block)), from H("nbdgw-digest-v1\0" alg).
// sha256 only: Node's crypto has no blake3.
const DIGEST_BLOCK = 1 << 20;
const sha256 = (...parts) => {
  const h = crypto.createHash("sha256");
  for (const p of parts) h.update(p);
  return h.digest();
};

class RangeDigest {
  constructor(start) {
    this.chain = sha256(Buffer.from("nbdgw-digest-v1\0sha256"));
    this.lo = start;
    this.end = (Math.floor(start / DIGEST_BLOCK) + 1) * DIGEST_BLOCK;
    this.pos = start;
    this.block = null;
  }

  update(offset, data) {
    if (offset < this.pos) throw new Error(`data at ${offset} goes back before ${this.pos}`);
    while (data.length) {
      if (offset >= this.end) {
        this.close(this.end);
        this.lo = Math.floor(offset / DIGEST_BLOCK) * DIGEST_BLOCK;
        this.end = this.lo + DIGEST_BLOCK;
      }
      const piece = data.subarray(0, this.end - offset);
      if (this.block === null) {
        if (piece.some((b) => b !== 0)) {
          this.block = crypto.createHash("sha256");
          this.block.update(Buffer.alloc(offset - this.lo));
          this.block.update(piece);
        }
      } else {
        this.block.update(Buffer.alloc(offset - this.pos));
        this.block.update(piece);
      }
      offset += piece.length;
      this.pos = offset;
      data = data.subarray(piece.length);
    }
  }

  close(hi) {
    if (this.block !== null) {
      this.block.update(Buffer.alloc(hi - this.pos));
      const range = Buffer.alloc(16);
      range.writeBigUInt64BE(BigInt(this.lo), 0);
      range.writeBigUInt64BE(BigInt(hi), 8);
      this.chain = sha256(this.chain, range, this.block.digest());
      this.block = null;
    }
    this.pos = Math.max(this.pos, hi);
  }

  finish(end) {
    this.close(Math.min(end, this.end));
    return this.chain;
  }
}

// The sha256 stream digest of a data stream from `start`, checked against the gateway's (in
// its last message); returns it in hex.
function checkDigest(messages, start) {
  const digest = new RangeDigest(start);
  for (const msg of messages) {
    let pos = Number(msg.offset);
    let dataPos = 0;
    for (let i = 0; i < msg.lengths.length; i++) {
      pos += Number(msg.offset_deltas[i]);
      const length = Number(msg.lengths[i]);
      if (msg.allocation[i] === "ALLOCATION_DATA") {
        digest.update(pos, msg.data.subarray(dataPos, dataPos + length));
        dataPos += length;
      }
      pos += length;
    }
  }
  const last = messages[messages.length - 1];
  const ours = digest.finish(Number(last.next_offset));
  if (!last.digest.length) throw new Error("the gateway sent no digest");
  if (!ours.equals(last.digest))
    throw new Error(
      `the sha256 stream digest ${ours.toString("hex")} differs from the gateway's ` +
        last.digest.toString("hex"),
    );
  return ours.toString("hex");
}

// Packed columns back to rows: [offset, length, flags, allocation, sha256 of the data].
function rows(messages) {
  const out = [];
  for (const msg of messages) {
    checkData(msg);
    let pos = BigInt(msg.offset);
    let dataPos = 0;
    for (let i = 0; i < msg.lengths.length; i++) {
      pos += BigInt(msg.offset_deltas[i]);
      const length = BigInt(msg.lengths[i]);
      const allocation = msg.allocation.length ? msg.allocation[i] : "ALLOCATION_UNSPECIFIED";
      let digest = null;
      if (msg.data.length && allocation === "ALLOCATION_DATA") {
        const chunk = msg.data.subarray(dataPos, dataPos + Number(length));
        if (chunk.length !== Number(length)) throw new Error(`short data at ${pos}`);
        digest = crypto.createHash("sha256").update(chunk).digest("hex");
        dataPos += chunk.length;
      }
      out.push([pos.toString(), length.toString(), msg.flags[i], allocation, digest]);
      pos += length;
    }
    if (dataPos !== msg.data.length) throw new Error("data left over in a message");
  }
  return out;
}

// Checks the resume promise: every message's offset is the previous next_offset.
function checkContiguous(messages, start) {
  let expected = BigInt(start);
  for (const msg of messages) {
    if (BigInt(msg.offset) !== expected)
      throw new Error(`message starts at ${msg.offset}, expected ${expected}`);
    expected = BigInt(msg.next_offset);
  }
  return expected.toString();
}

const failures = [];

// An error the API promises: its code and its ErrorInfo reason.
function expectError(seen, code, reason) {
  const info = (seen.details || []).find((d) => d.type === "google.rpc.ErrorInfo");
  if (seen.code !== code) failures.push(`expected code ${code}, got ${JSON.stringify(seen)}`);
  else if (!info || info.value.reason !== reason)
    failures.push(`expected ErrorInfo reason ${reason}, got ${JSON.stringify(seen.details)}`);
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const pkg = grpc.loadPackageDefinition(
    protoLoader.loadSync("nbdgw/v1/bitmap_service.proto", LOADER_OPTIONS),
  );
  const healthPkg = grpc.loadPackageDefinition(protoLoader.fromJSON(HEALTH_JSON, LOADER_OPTIONS));
  let creds = grpc.credentials.createInsecure();
  const options = {};
  if (args["tls-ca"]) {
    const read = (name) => (args[name] ? fs.readFileSync(args[name]) : null);
    creds = grpc.credentials.createSsl(read("tls-ca"), read("tls-key"), read("tls-cert"));
    if (args["tls-server-name"]) options["grpc.ssl_target_name_override"] = args["tls-server-name"];
  }
  const client = new pkg.nbdgw.v1.BitmapService(args.target, creds, options);
  const health = new healthPkg.grpc.health.v1.Health(args.target, creds, options);
  const md = new grpc.Metadata();
  if (args.token) md.set("authorization", `Bearer ${args.token}`);
  const result = { target: args.target };
  try {
    result.health = {};
    for (const service of ["", "nbdgw.v1.BitmapService"]) {
      result.health[service] = (await unary(health, "Check", { service }, md)).status;
    }

    // ListExports, one export per page, to exercise the page token.
    const exports = [];
    let pageToken = "";
    let pages = 0;
    do {
      const resp = await unary(client, "ListExports", { page_size: 1, page_token: pageToken }, md);
      exports.push(...resp.exports);
      pageToken = resp.next_page_token;
      pages++;
    } while (pageToken);
    result.list_exports = { pages, exports };

    result.get_export = await unary(client, "GetExport", { name: `exports/${args.export}` }, md);
    result.list_bitmaps = (await unary(client, "ListBitmaps", { parent: args.export }, md)).bitmaps;

    const base = { export: args.export, context: args.bitmap };
    const all = await stream(client, { ...base, filter: "EXTENT_FILTER_ALL" }, md);
    result.extents = {
      messages: all.length,
      end: checkContiguous(all, "0"),
      rows: rows(all),
    };

    const withData = await stream(
      client,
      { ...base, filter: "EXTENT_FILTER_SET", include_data: true, digest: "sha256" },
      md,
    );
    result.dirty_with_data = {
      end: checkContiguous(withData, "0"),
      rows: rows(withData),
      data_bytes: withData.reduce((n, m) => n + m.data.length, 0),
      digest: checkDigest(withData, 0),
    };
    // What a clear of the ranges this stream carried names (empty for a read-only export).
    result.clear_token = withData.length ? withData[0].clear_token : "";

    // Resume: take two small messages, drop the call, continue with the last resume token.
    const small = { ...base, filter: "EXTENT_FILTER_ALL", max_extents_per_message: 1 };
    const head = await stream(client, small, md, 2);
    const last = head[head.length - 1];
    const tail = await stream(client, { ...small, resume_token: last.resume_token }, md);
    const byOffset = await stream(
      client,
      { ...small, resume_offset: head[0].next_offset },
      md,
    );
    result.resumed = {
      head_messages: head.length,
      resume_offset: last.next_offset,
      end: checkContiguous(head.concat(tail), "0"),
      rows: rows(head.concat(tail)),
      by_offset_rows: rows(head.slice(0, 1).concat(byOffset)),
    };

    // An error the API promises: an unknown export is NOT_FOUND with ErrorInfo.
    try {
      await unary(client, "GetExport", { name: "exports/no-such-export" }, md);
      result.not_found = { unexpected: "GetExport of an unknown export succeeded" };
    } catch (err) {
      result.not_found = describeError(err);
    }
    expectError(result.not_found, grpc.status.NOT_FOUND, "EXPORT_NOT_FOUND");
    try {
      await stream(client, { ...base, offset: "18446744073709551615" }, md);
      result.out_of_range = { unexpected: "a stream past the end succeeded" };
    } catch (err) {
      result.out_of_range = describeError(err);
    }
    expectError(result.out_of_range, grpc.status.OUT_OF_RANGE, "RANGE_PAST_END");
    if (failures.length) throw new Error(failures.join("; "));

    if (args.clear) {
      const firstDirty = result.dirty_with_data.rows[0];
      // The export is writable: clear with the token of the stream that read the range.
      const req = { export: args.export, bitmap: args.bitmap, clear_token: result.clear_token };
      if (firstDirty) Object.assign(req, { offset: firstDirty[0], length: firstDirty[1] });
      else Object.assign(req, { offset: "0", length: "1" });
      result.clear = { request: req, response: await unary(client, "ClearRange", req, md) };
      const after = await stream(client, { ...base, filter: "EXTENT_FILTER_SET" }, md);
      result.dirty_after_clear = rows(after);
    }

    // RPCs added to v1 later: called when the loaded proto has them.
    if (client.StreamRemainingDirty) {
      const remaining = await stream(
        client,
        { export: args.export, bitmap: args.bitmap },
        md,
        null,
        "StreamRemainingDirty",
      );
      // The same packed columns as StreamExtents, without flags (every range is dirty).
      const asExtents = remaining.map((m) => ({
        ...m,
        flags: m.lengths.map(() => 1),
        allocation: [],
        data: Buffer.alloc(0),
      }));
      result.remaining_dirty = { end: checkContiguous(remaining, "0"), rows: rows(asExtents) };
    }
    if (client.SetExportGeneration) {
      try {
        const req = { export: args.export, generation: "node-client" };
        result.set_generation = await unary(client, "SetExportGeneration", req, md);
      } catch (err) {
        result.set_generation = { error: describeError(err) };
      }
    }
  } catch (err) {
    result.error = err.code !== undefined ? describeError(err) : { message: String(err.stack) };
  } finally {
    client.close();
    health.close();
  }
  process.stdout.write(JSON.stringify(result, null, 1) + "\n");
  process.exitCode = result.error ? 1 : 0;
}

main().catch((err) => {
  process.stderr.write(`client.js: ${err.stack || err}\n`);
  process.exitCode = 1;
});
