package proto

import (
	"bytes"
	"testing"
)

// The codec's cost on the paths that run per connection: the relay writes
// Bind (or Incoming) for each new client, and the agent reads it.
//
//	go test -run='^$' -bench=. -benchmem ./internal/proto

var benchBind = &Bind{Tunnel: 1, Client: "203.0.113.7:51234", Local: "198.51.100.1:8081"}

// BenchmarkAppendBind encodes into a reused buffer: 0 allocations.
func BenchmarkAppendBind(b *testing.B) {
	b.ReportAllocs()
	buf := make([]byte, 0, 128)
	for range b.N {
		buf = Append(buf[:0], benchBind)
	}
	b.SetBytes(int64(len(buf)))
}

// BenchmarkReadParseBind reads one frame from a stream into a reused
// buffer and decodes it; what it allocates (4 allocations, about 100
// bytes) is the message and its strings, once per connection.
func BenchmarkReadParseBind(b *testing.B) {
	b.ReportAllocs()
	frame := Append(nil, benchBind)
	r := bytes.NewReader(frame)
	buf := make([]byte, 256)
	b.SetBytes(int64(len(frame)))
	for range b.N {
		r.Reset(frame)
		t, payload, err := ReadFrame(r, buf, DefaultMaxPayload)
		if err != nil {
			b.Fatal(err)
		}
		m, err := Parse(t, payload)
		if err != nil {
			b.Fatal(err)
		}
		if m.(*Bind).Tunnel != 1 {
			b.Fatal("wrong message")
		}
	}
}
