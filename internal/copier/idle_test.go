//go:build linux

package copier

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"tcprelay/internal/check"
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
	check.Leaks(t)
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
	check.Eventually(t, 5*time.Second, func() error {
		runtime.GC()
		if held = countPipes(t) - base; held > 4 {
			return fmt.Errorf("%d idle joined connections hold %d pipe fds: idle directions keep their pipes", n, held)
		}
		return nil
	})
	t.Logf("%d idle joined connections hold %d pipe fds (io.Copy would hold %d)", n, held, 4*n)
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
			// 1 MiB reads: io.Copy into io.Discard reads 8 KiB at a time,
			// and the sink, not the copy, would set the pace.
			buf := make([]byte, 1<<20)
			go func() {
				n, _ := io.CopyBuffer(struct{ io.Writer }{io.Discard}, struct{ io.Reader }{clientB}, buf)
				sunk <- n
			}()
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

// waitGoroutines waits until at most want goroutines run.
func waitGoroutines(t *testing.T, want int, what string) {
	t.Helper()
	check.Eventually(t, 5*time.Second, func() error {
		if got := runtime.NumGoroutine(); got > want {
			return fmt.Errorf("%s: %d goroutines, want at most %d", what, got, want)
		}
		return nil
	})
}

// exchange sends msg from one end of r to the other, then back.
func exchange(t *testing.T, r *relay, msg []byte) {
	t.Helper()
	buf := make([]byte, len(msg))
	for _, p := range [][2]net.Conn{{r.clientA, r.clientB}, {r.clientB, r.clientA}} {
		if _, err := p[0].Write(msg); err != nil {
			t.Fatal(err)
		}
		p[1].SetReadDeadline(time.Now().Add(timeout))
		if _, err := io.ReadFull(p[1], buf); err != nil {
			t.Fatalf("read: %v", err)
		}
		if string(buf) != string(msg) {
			t.Fatalf("got %q, want %q", buf, msg)
		}
	}
}

// TestIdleLinksHoldNoGoroutine: links that have moved bytes and gone quiet
// give their goroutines back (a Join'd pair would otherwise hold two each),
// and wake up when bytes come, in either direction, as often as they come.
func TestIdleLinksHoldNoGoroutine(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the idle poller is Linux only")
	}
	check.Leaks(t)
	const n = 100
	relays := make([]*relay, n)
	g0 := runtime.NumGoroutine()
	for i := range relays {
		relays[i] = startRelay(t) // each Join waits in a goroutine of the test's
		exchange(t, relays[i], []byte{byte(i), 'a'})
	}
	// n goroutines are the test's own (Join waiting for its Result), plus
	// one for the poller; the links themselves should hold none.
	want := g0 + n + 1
	waitGoroutines(t, want, fmt.Sprintf("%d idle links (each with one waiter of the test's): idle directions keep their goroutines", n))
	// Parked from both the cold start and, after a burst, from the hot wait:
	// each must wake for new bytes, again and again.
	for round := range 3 {
		for i, r := range relays {
			exchange(t, r, []byte{byte(i), byte(round), 'b'})
		}
		waitGoroutines(t, want, fmt.Sprintf("round %d, idle again", round))
		time.Sleep(2 * hotFor) // let the next round find the links cold
	}
}

// TestParkedLinkEnds: a parked link notices a half-close, a reset, and
// Close, and reports each correctly.
func TestParkedLinkEnds(t *testing.T) {
	check.Leaks(t)
	settle := func(r *relay) {
		exchange(t, r, []byte("x"))
		time.Sleep(2 * hotFor) // parked by now (or still waiting: both must work)
	}
	t.Run("half-close", func(t *testing.T) {
		r := startRelay(t)
		settle(r)
		r.clientA.CloseWrite()
		r.clientB.SetReadDeadline(time.Now().Add(timeout))
		if b, err := io.ReadAll(r.clientB); err != nil || len(b) != 0 {
			t.Fatalf("clientB read %q, %v; want a clean EOF", b, err)
		}
		r.notReturned(t, "after a half-close with the other direction open")
		exchange1(t, r.clientB, r.clientA, []byte("still open"))
		r.clientB.CloseWrite()
		if res := r.result(t); res.Err != nil || res.AToB != 1 || res.BToA != 11 {
			t.Fatalf("Result = %+v, want AToB=1 BToA=11 Err=nil", res)
		}
	})
	t.Run("reset", func(t *testing.T) {
		r := startRelay(t)
		settle(r)
		r.clientA.SetLinger(0)
		r.clientA.Close()
		r.clientB.SetReadDeadline(time.Now().Add(timeout))
		if _, err := io.ReadAll(r.clientB); err != nil {
			t.Logf("clientB: %v", err)
		}
		if res := r.result(t); res.Err == nil {
			t.Fatalf("Result = %+v, want the reset as Err", res)
		}
	})
	t.Run("Close", func(t *testing.T) {
		clientA, a := tcpPair(t)
		b, clientB := tcpPair(t)
		res := make(chan Result, 1)
		l := Start(a, b, func(_ *Link, r Result) { res <- r })
		r := &relay{clientA: clientA, a: a, b: b, clientB: clientB}
		exchange(t, r, []byte("y"))
		time.Sleep(2 * hotFor)
		l.Close()
		select {
		case got := <-res:
			if !errors.Is(got.Err, net.ErrClosed) || got.AToB != 1 || got.BToA != 1 {
				t.Fatalf("Result = %+v, want AToB=BToA=1 and Err net.ErrClosed", got)
			}
		case <-time.After(timeout):
			t.Fatal("Close did not end a parked link")
		}
		assertClosed(t, "a", a)
		assertClosed(t, "b", b)
		l.Close() // a second Close changes nothing
	})
}

// exchange1 sends msg from one conn and reads it at the other.
func exchange1(t *testing.T, from, to net.Conn, msg []byte) {
	t.Helper()
	if _, err := from.Write(msg); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(msg))
	to.SetReadDeadline(time.Now().Add(timeout))
	if _, err := io.ReadFull(to, buf); err != nil || string(buf) != string(msg) {
		t.Fatalf("read %q, %v; want %q", buf, err, msg)
	}
}

// TestProgressAndWaiting: a Link reports, live, the bytes each direction
// delivered, and how long a direction has waited for a reader that does
// not read; the wait ends when the reader reads again.
func TestProgressAndWaiting(t *testing.T) {
	check.Leaks(t)
	r, l := startLink(t)
	exchange(t, r, []byte("hello"))
	// A direction counts its bytes once the write that delivered them has
	// returned, which may be after the reader has them.
	check.Eventually(t, 5*time.Second, func() error {
		if a, b := l.Progress(); a != 5 || b != 5 {
			return fmt.Errorf("Progress() = %d, %d after a 5-byte exchange each way", a, b)
		}
		return nil
	})
	if w := l.Waiting(); w != 0 {
		t.Fatalf("Waiting() = %v with nothing to deliver", w)
	}
	// clientB stops reading; clientA writes until the buffers between them
	// are full.
	r.clientA.SetWriteDeadline(time.Now().Add(2 * time.Second))
	sent := int64(0)
	chunk := make([]byte, 64<<10)
	for {
		n, err := r.clientA.Write(chunk)
		sent += int64(n)
		if err != nil {
			break // the deadline: everything is full
		}
	}
	check.Eventually(t, 5*time.Second, func() error {
		if w := l.Waiting(); w < 100*time.Millisecond {
			return fmt.Errorf("Waiting() = %v with a reader that stopped", w)
		}
		return nil
	})
	// The reader reads everything again: the wait ends, and every byte is
	// counted.
	got, err := io.ReadFull(r.clientB, make([]byte, sent))
	if err != nil {
		t.Fatalf("read %d of %d: %v", got, sent, err)
	}
	check.Eventually(t, 5*time.Second, func() error {
		if a, _ := l.Progress(); a != 5+sent || l.Waiting() != 0 {
			return fmt.Errorf("Progress() a→b = %d, want %d; Waiting() = %v, want 0", a, 5+sent, l.Waiting())
		}
		return nil
	})
}

// TestIdleSinceParked: a Link reports how long both its directions have
// been parked, growing while nothing moves, and starting over when bytes
// move.
func TestIdleSinceParked(t *testing.T) {
	check.Leaks(t)
	r, l := startLink(t)
	exchange(t, r, []byte("hello"))
	const quiet = 50 * time.Millisecond
	check.Eventually(t, 5*time.Second, func() error {
		if d := l.Idle(); d < quiet {
			return fmt.Errorf("Idle() = %v after a quiet exchange, want it to grow past %v", d, quiet)
		}
		return nil
	})
	// Bytes move: the link has not been idle since.
	moved := time.Now()
	if _, err := r.clientA.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	r.clientB.SetReadDeadline(time.Now().Add(timeout))
	if _, err := io.ReadFull(r.clientB, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	if d, since := l.Idle(), time.Since(moved); d > since {
		t.Errorf("Idle() = %v %v after a byte moved, want it started over", d, since)
	}
}
