package copier

import (
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

// countPipes counts this process's open fds that are pipes.
func countPipes(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("no /proc/self/fd: %v", err)
	}
	n := 0
	for _, e := range ents {
		if target, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err == nil && strings.HasPrefix(target, "pipe:") {
			n++
		}
	}
	return n
}

// TestIdleJoinHoldsNoPipe: connections that have moved data and then gone
// quiet hold no splice pipe. Go's io.Copy keeps a pipe pair per blocked
// direction, 4 fds per idle relayed connection; this copier gives the pipe
// back whenever the source has nothing to read.
func TestIdleJoinHoldsNoPipe(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("splice is Linux only")
	}
	checkLeaks(t)
	base := countPipes(t)
	const n = 50
	for i := range n {
		r := startRelay(t)
		msg := []byte{byte(i), 1, 2, 3}
		buf := make([]byte, len(msg))
		// One byte each way: both directions have spliced and now wait.
		for _, dir := range [][2]io.ReadWriter{{r.clientA, r.clientB}, {r.clientB, r.clientA}} {
			if _, err := dir[0].Write(msg); err != nil {
				t.Fatal(err)
			}
			r.clientA.SetReadDeadline(time.Now().Add(timeout))
			r.clientB.SetReadDeadline(time.Now().Add(timeout))
			if _, err := io.ReadFull(dir[1], buf); err != nil {
				t.Fatalf("pair %d: %v", i, err)
			}
		}
	}
	// Pipes parked in the pool are closed by the collector; what is left
	// open is what the idle directions hold.
	var held int
	deadline := time.Now().Add(5 * time.Second)
	for {
		runtime.GC()
		held = countPipes(t) - base
		if held <= 4 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("%d idle joined connections hold %d pipe fds (io.Copy would hold %d)", n, held, 4*n)
	if held > 4 {
		t.Fatalf("%d idle joined connections hold %d pipe fds: idle directions keep their pipes", n, held)
	}
}

// BenchmarkCopy compares this copier with io.Copy (Go's own splice, which
// keeps its pipe) on one loopback connection, in the same run:
//
//	go test -run='^$' -bench=Copy -benchtime=2s -count=5 ./internal/copier
func BenchmarkCopy(b *testing.B) {
	for _, bc := range []struct {
		name string
		copy func(dst, src net.Conn) (int64, error)
	}{
		{"copier", Copy},
		{"io.Copy", func(dst, src net.Conn) (int64, error) { return io.Copy(dst, src) }},
	} {
		b.Run(bc.name, func(b *testing.B) {
			clientA, a := tcpPair(b)
			bb, clientB := tcpPair(b)
			done := make(chan int64, 1)
			go func() { n, _ := bc.copy(bb, a); bb.CloseWrite(); done <- n }()
			sunk := make(chan int64, 1)
			go func() { n, _ := io.Copy(io.Discard, clientB); sunk <- n }()
			chunk := make([]byte, 1<<20)
			b.SetBytes(int64(len(chunk)))
			b.ResetTimer()
			for range b.N {
				if _, err := clientA.Write(chunk); err != nil {
					b.Fatal(err)
				}
			}
			clientA.CloseWrite()
			<-done
			if n := <-sunk; n != int64(b.N)<<20 {
				b.Fatalf("sink got %d bytes, want %d", n, int64(b.N)<<20)
			}
		})
	}
}
