package tunnel_test

import (
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"testing"

	"tcprelay/internal/testutil"
	"tcprelay/server"
	"tcprelay/tunnel"
)

// benchPaths are the paths the benchmarks compare, in one run: direct
// loopback, through the relay, through the relay with the kernel's
// autotuning of socket buffers instead of Config.LinkBuffer, and through
// the relay with TLS on the agent's connections.
var benchPaths = []struct {
	name   string
	listen func(b *testing.B) net.Listener
}{
	{"direct", func(b *testing.B) net.Listener {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { ln.Close() })
		return ln
	}},
	{"relay", func(b *testing.B) net.Listener {
		return benchRelay(b, testutil.StartRelay(b, server.Config{Logger: quiet}), nil)
	}},
	{"relay-autotune", func(b *testing.B) net.Listener {
		return benchRelay(b, testutil.StartRelay(b, server.Config{Logger: quiet, LinkBuffer: -1}), nil)
	}},
	{"relay-tls", func(b *testing.B) net.Listener {
		cert, pool := testutil.SelfSignedCert(b)
		relay := testutil.StartTLSRelay(b, server.Config{Logger: quiet}, cert)
		return benchRelay(b, relay, &tls.Config{RootCAs: pool})
	}},
}

var quiet = slog.New(slog.DiscardHandler)

func benchRelay(b *testing.B, relay *testutil.Relay, tlsCfg *tls.Config) net.Listener {
	cfg := tunnel.Config{Logger: quiet, TLS: tlsCfg}
	ln, err := cfg.Listen(testutil.Context(b), relay.Addr)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	return ln
}

// BenchmarkThroughput moves bytes one way over a single connection on each
// path. Compare the MB/s of the paths in one run:
//
//	go test -run='^$' -bench=Throughput -benchtime=2s -count=5 ./tunnel
func BenchmarkThroughput(b *testing.B) {
	for _, p := range benchPaths {
		b.Run(p.name, func(b *testing.B) {
			ln := p.listen(b)
			benchSink(b, ln, ln.Addr().String())
		})
	}
}

// benchSink accepts one connection on ln and discards what it reads, while
// the benchmark writes b.N chunks of 1 MiB to addr.
func benchSink(b *testing.B, ln net.Listener, addr string) {
	defer ln.Close()
	got := make(chan int64, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- -1
			return
		}
		defer c.Close()
		n, _ := io.Copy(io.Discard, c)
		got <- n
	}()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	chunk := make([]byte, 1<<20)
	b.SetBytes(int64(len(chunk)))
	b.ResetTimer()
	for range b.N {
		if _, err := c.Write(chunk); err != nil {
			b.Fatal(err)
		}
	}
	c.(*net.TCPConn).CloseWrite()
	if n := <-got; n != int64(b.N)*int64(len(chunk)) {
		b.Fatalf("sink read %d bytes, want %d", n, int64(b.N)*int64(len(chunk)))
	}
	b.StopTimer()
	c.Close()
}

// BenchmarkConnectEcho measures a new connection plus a 1-byte echo, the
// latency a new client sees, on each path in the same run.
//
//	go test -run='^$' -bench=ConnectEcho -benchtime=2000x -count=5 ./tunnel
func BenchmarkConnectEcho(b *testing.B) {
	for _, p := range benchPaths {
		b.Run(p.name, func(b *testing.B) {
			ln := p.listen(b)
			testutil.Serve(b, ln, testutil.Echo)
			addr := ln.Addr().String()
			buf := make([]byte, 1)
			b.ResetTimer()
			for range b.N {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(c, buf); err != nil {
					b.Fatal(err)
				}
				c.Close()
			}
		})
	}
}
