#!/usr/bin/env node
// A Node client of the CSI SnapshotMetadata service nbdgw serves (@grpc/grpc-js +
// @grpc/proto-loader loading proto/nbdgw/csi/v1/csi.proto at run time), over a unix socket as the
// external-snapshot-metadata sidecar calls it. Prints one JSON document:
//   {"info": {...}, "capabilities": [...], "ready": bool, "streams": {NAME: [[type, capacity,
//    [[offset, size], ...]], ...]}} or {"error": {"code": N, "details": "..."}} for a failed stream
//
//   node csi.js --socket PATH --allocated ID [--allocated ID ...] --delta BASE,TARGET [...]
//               [--start N] [--max N]
// int64 values are printed as decimal strings (JSON numbers lose precision past 2^53).
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const ROOT = path.resolve(__dirname, "..", "..", "..");
const PROTO_DIR = path.join(ROOT, "proto");

function parseArgs(argv) {
  const args = { allocated: [], delta: [], start: "0", max: 0 };
  for (let i = 0; i < argv.length; i += 2) {
    const [key, value] = [argv[i], argv[i + 1]];
    if (key === "--socket") args.socket = value;
    else if (key === "--allocated") args.allocated.push(value);
    else if (key === "--delta") args.delta.push(value.split(","));
    else if (key === "--start") args.start = value;
    else if (key === "--max") args.max = Number(value);
    else throw new Error(`unknown argument ${key}`);
  }
  return args;
}

function unary(client, method, request) {
  return new Promise((resolve, reject) =>
    client[method](request, (err, res) => (err ? reject(err) : resolve(res))),
  );
}

function collect(call) {
  return new Promise((resolve) => {
    const messages = [];
    call.on("data", (m) =>
      messages.push([
        m.block_metadata_type,
        m.volume_capacity_bytes,
        m.block_metadata.map((b) => [b.byte_offset, b.size_bytes]),
      ]),
    );
    call.on("error", (e) => resolve({ error: { code: e.code, details: e.details } }));
    call.on("end", () => resolve(messages));
  });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const def = protoLoader.loadSync(path.join(PROTO_DIR, "nbdgw", "csi", "v1", "csi.proto"), {
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
    includeDirs: [PROTO_DIR],
  });
  const csi = grpc.loadPackageDefinition(def).csi.v1;
  const target = `unix:${args.socket}`;
  const creds = grpc.credentials.createInsecure();
  const identity = new csi.Identity(target, creds);
  const metadata = new csi.SnapshotMetadata(target, creds);
  const out = { streams: {} };
  out.info = await unary(identity, "GetPluginInfo", {});
  const caps = await unary(identity, "GetPluginCapabilities", {});
  out.capabilities = caps.capabilities.map((c) => (c.service ? c.service.type : c.type));
  out.ready = (await unary(identity, "Probe", {})).ready.value;
  for (const id of args.allocated) {
    const call = metadata.GetMetadataAllocated({
      snapshot_id: id,
      starting_offset: args.start,
      max_results: args.max,
    });
    out.streams[`allocated:${id}`] = await collect(call);
  }
  for (const [base, targetId] of args.delta) {
    const call = metadata.GetMetadataDelta({
      base_snapshot_id: base,
      target_snapshot_id: targetId,
      starting_offset: args.start,
      max_results: args.max,
    });
    out.streams[`delta:${base},${targetId}`] = await collect(call);
  }
  identity.close();
  metadata.close();
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().catch((e) => {
  process.stdout.write(JSON.stringify({ error: { message: String(e) } }) + "\n");
  process.exit(1);
});
