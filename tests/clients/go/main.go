// A Go client of the nbdgw API, built by tests/gateway/test_go_client.py from the code that
// scripts/gen-clients generates (proto/buf.gen.yaml): it proves the API is usable from Go with
// plain generated stubs. It lists the exports, streams one context's extents, streams the data
// of its set extents (checking every message's CRC32C before using its data), asks for an
// export that does not exist, and prints what it saw as one JSON object for the test to check.
//
//	go run main.go -target 127.0.0.1:50051 -export disk -context qemu:dirty-bitmap:backup
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"time"

	nbdgwv1 "nbdgw.dev/gen/go/nbdgw/v1"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

type export struct {
	Name      string `json:"name"`
	SizeBytes uint64 `json:"size_bytes"`
	ClearMode string `json:"clear_mode"`
}

type extents struct {
	Messages int         `json:"messages"`
	End      uint64      `json:"end"`
	Rows     [][3]uint64 `json:"rows"` // offset, length, flags
}

type dataStream struct {
	Messages  int             `json:"messages"`
	End       uint64          `json:"end"`
	DataBytes int             `json:"data_bytes"`
	Rows      [][]interface{} `json:"rows"` // offset, length, flags, allocation, sha256 of the data
}

type rpcError struct {
	Code   string            `json:"code"`
	Reason string            `json:"reason"`
	Domain string            `json:"domain"`
	Meta   map[string]string `json:"metadata"`
}

type report struct {
	Exports  []export   `json:"exports"`
	Pages    int        `json:"pages"`
	Extents  extents    `json:"extents"`
	Data     dataStream `json:"data"`
	NotFound rpcError   `json:"not_found"`
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "go client: "+format+"\n", args...)
	os.Exit(1)
}

// CRC32C (Castagnoli), the checksum the gateway sends with every message's data.
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// checkData returns the data of msg once its CRC32C matches; it exits, naming the range, when
// it does not, before any of the data is used.
func checkData(msg *nbdgwv1.StreamExtentsResponse) []byte {
	where := fmt.Sprintf("[%d, %d)", msg.Offset, msg.NextOffset)
	if msg.DataCompression != "" {
		// Not asked for: this client requests no compression.
		fail("the data of %s is %s-compressed, which was not asked for", where, msg.DataCompression)
	}
	if msg.DataCrc32C == nil {
		fail("the data of %s carries no CRC32C (a gateway too old?)", where)
	}
	if got := crc32.Checksum(msg.Data, castagnoli); got != *msg.DataCrc32C {
		fail("the data of %s is corrupt: CRC32C %08x where the gateway sent %08x", where, got, *msg.DataCrc32C)
	}
	return msg.Data
}

func main() {
	target := flag.String("target", "127.0.0.1:50051", "the gateway's host:port (plaintext)")
	token := flag.String("token", "", "bearer token, when the gateway requires one")
	exportName := flag.String("export", "disk", "export to stream")
	contextName := flag.String("context", "qemu:dirty-bitmap:backup", "metadata context to stream")
	flag.Parse()

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if *token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+*token)
	}
	conn, err := grpc.DialContext(ctx, *target, grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		fail("dial %s: %v", *target, err)
	}
	defer conn.Close()
	client := nbdgwv1.NewBitmapServiceClient(conn)
	var out report

	// ListExports, one export per page: the page tokens work from Go too.
	pageToken := ""
	for {
		page, err := client.ListExports(ctx, &nbdgwv1.ListExportsRequest{PageSize: 1, PageToken: pageToken})
		if err != nil {
			fail("ListExports: %v", err)
		}
		out.Pages++
		for _, e := range page.Exports {
			out.Exports = append(out.Exports, export{e.Name, e.SizeBytes, e.ClearMode.String()})
		}
		if pageToken = page.NextPageToken; pageToken == "" {
			break
		}
	}

	// StreamExtents of the whole export, every extent, decoded from the packed columns:
	// extent i starts where extent i-1 ended plus offset_deltas[i].
	stream, err := client.StreamExtents(ctx, &nbdgwv1.StreamExtentsRequest{
		Export:  "exports/" + *exportName,
		Context: *contextName,
		Filter:  nbdgwv1.ExtentFilter_EXTENT_FILTER_ALL,
	})
	if err != nil {
		fail("StreamExtents: %v", err)
	}
	for {
		msg, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			fail("StreamExtents: %v", err)
		}
		out.Extents.Messages++
		out.Extents.End = msg.NextOffset
		end := msg.Offset
		for i, length := range msg.Lengths {
			start := end + msg.OffsetDeltas[i]
			out.Extents.Rows = append(out.Extents.Rows, [3]uint64{start, length, uint64(msg.Flags[i])})
			end = start + length
		}
	}

	// The data of the set extents: every message's CRC32C is checked before its data is used.
	data, err := client.StreamExtents(ctx, &nbdgwv1.StreamExtentsRequest{
		Export:      "exports/" + *exportName,
		Context:     *contextName,
		Filter:      nbdgwv1.ExtentFilter_EXTENT_FILTER_SET,
		IncludeData: true,
	})
	if err != nil {
		fail("StreamExtents with data: %v", err)
	}
	for {
		msg, err := data.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			fail("StreamExtents with data: %v", err)
		}
		payload := checkData(msg)
		out.Data.Messages++
		out.Data.End = msg.NextOffset
		end, pos := msg.Offset, uint64(0)
		for i, length := range msg.Lengths {
			start := end + msg.OffsetDeltas[i]
			allocation := nbdgwv1.Allocation_ALLOCATION_UNSPECIFIED
			if i < len(msg.Allocation) {
				allocation = msg.Allocation[i]
			}
			digest := ""
			if allocation == nbdgwv1.Allocation_ALLOCATION_DATA {
				if pos+length > uint64(len(payload)) {
					fail("the data of [%d, %d) is shorter than its extents", msg.Offset, msg.NextOffset)
				}
				sum := sha256.Sum256(payload[pos : pos+length])
				digest = hex.EncodeToString(sum[:])
				pos += length
				out.Data.DataBytes += int(length)
			}
			out.Data.Rows = append(out.Data.Rows, []interface{}{start, length, msg.Flags[i], allocation.String(), digest})
			end = start + length
		}
	}

	// A rich error: the status carries a google.rpc.ErrorInfo.
	_, err = client.GetExport(ctx, &nbdgwv1.GetExportRequest{Name: "exports/no-such-export"})
	st, ok := status.FromError(err)
	if err == nil || !ok {
		fail("GetExport of a missing export: expected a status, got %v", err)
	}
	out.NotFound.Code = st.Code().String()
	for _, detail := range st.Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok {
			out.NotFound.Reason, out.NotFound.Domain, out.NotFound.Meta = info.Reason, info.Domain, info.Metadata
		}
	}

	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail("%v", err)
	}
}
