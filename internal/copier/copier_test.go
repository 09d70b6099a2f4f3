package copier

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"tcprelay/internal/check"
)

// timeout bounds every blocking step, so a broken copier fails a test
// instead of hanging it. It is generous: the machine running these tests may
// be slow and busy (and -race multiplies the cost of every step).
const timeout = 10 * time.Second

// ---------------------------------------------------------------------------
// Leak checks

// TestMain checks that the package's tests, taken together, leave no
// goroutine and no file descriptor behind. Each test also checks itself
// (check.Leaks), which says which test leaked.
func TestMain(m *testing.M) {
	// The first network operation of the process creates the poller's own
	// fds (epoll, eventfd): create them before taking the baseline.
	if ln, err := net.Listen("tcp", "127.0.0.1:0"); err == nil {
		ln.Close()
	}
	g0, fd0 := runtime.NumGoroutine(), check.FDs()
	code := m.Run()
	if code == 0 {
		if msg := check.Baseline(g0, fd0, 5*time.Second); msg != "" {
			fmt.Fprintln(os.Stderr, "leak after all tests:", msg)
			code = 1
		}
	}
	os.Exit(code)
}

// ---------------------------------------------------------------------------
// Fixtures

// tcpPair returns the two ends of a fresh loopback TCP connection.
func tcpPair(tb testing.TB) (*net.TCPConn, *net.TCPConn) {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	type accepted struct {
		c   net.Conn
		err error
	}
	ch := make(chan accepted, 1)
	go func() {
		c, err := ln.Accept()
		ch <- accepted{c, err}
	}()
	dialed, err := net.DialTimeout("tcp", ln.Addr().String(), timeout)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { dialed.Close() })
	acc := <-ch
	if acc.err != nil {
		tb.Fatal(acc.err)
	}
	tb.Cleanup(func() { acc.c.Close() })
	return dialed.(*net.TCPConn), acc.c.(*net.TCPConn)
}

// relay is clientA <-> [a  Join  b] <-> clientB, with Join(a, b) running in
// its own goroutine.
type relay struct {
	clientA, a, b, clientB *net.TCPConn
	res                    chan Result
}

func startRelay(tb testing.TB) *relay {
	tb.Helper()
	r := &relay{res: make(chan Result, 1)}
	r.clientA, r.a = tcpPair(tb)
	r.b, r.clientB = tcpPair(tb)
	go func() { r.res <- Join(r.a, r.b) }()
	// Registered after the conns' cleanups, so it runs before them: close
	// both outer ends (which ends Join whatever state it is in: a Link's own
	// conns are closed only by the Link) and wait for Join to return, so no
	// test leaves its goroutines running.
	tb.Cleanup(func() {
		r.clientA.Close()
		r.clientB.Close()
		select {
		case <-r.res:
		case <-time.After(timeout):
			tb.Error("Join did not return after all its conns were closed")
		}
	})
	return r
}

// result waits for Join's Result. It consumes it: call it once per relay.
func (r *relay) result(tb testing.TB) Result {
	tb.Helper()
	select {
	case res := <-r.res:
		r.res <- res // keep it for the cleanup
		return res
	case <-time.After(timeout):
		tb.Fatalf("Join did not return within %v", timeout)
		return Result{}
	}
}

// notReturned fails the test if Join has already returned.
func (r *relay) notReturned(tb testing.TB, when string) {
	tb.Helper()
	select {
	case res := <-r.res:
		r.res <- res
		tb.Fatalf("Join returned %+v %s; want it still running", res, when)
	default:
	}
}

// assertClosed checks that Join closed c: a write on it fails with
// net.ErrClosed.
func assertClosed(tb testing.TB, name string, c net.Conn) {
	tb.Helper()
	if _, err := c.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		tb.Errorf("write to %s after Join returned: err = %v, want net.ErrClosed", name, err)
	}
}

// randomBytes returns n bytes from a seeded generator: reproducible.
func randomBytes(n int, seed uint64) []byte {
	buf := make([]byte, n)
	rand.NewChaCha8([32]byte{0: byte(seed), 1: byte(seed >> 8)}).Read(buf)
	return buf
}

// readAll reads c to EOF under a deadline.
func readAll(c net.Conn) ([]byte, error) {
	c.SetReadDeadline(time.Now().Add(timeout))
	return io.ReadAll(c)
}

// ---------------------------------------------------------------------------
// Tests

// TestBulkBothWays sends 8 MiB each way at once; each side half-closes when
// done and reads to EOF.
func TestBulkBothWays(t *testing.T) {
	check.Leaks(t)
	r := startRelay(t)
	const size = 8 << 20
	fromA, fromB := randomBytes(size, 1), randomBytes(size, 2)

	var wg sync.WaitGroup
	errs := make(chan error, 4)
	var gotAtB, gotAtA [sha256.Size]byte
	var nAtB, nAtA int
	send := func(c *net.TCPConn, data []byte) {
		defer wg.Done()
		c.SetWriteDeadline(time.Now().Add(timeout))
		if _, err := c.Write(data); err != nil {
			errs <- fmt.Errorf("write: %w", err)
			return
		}
		if err := c.CloseWrite(); err != nil {
			errs <- fmt.Errorf("CloseWrite: %w", err)
		}
	}
	recv := func(c *net.TCPConn, sum *[sha256.Size]byte, n *int) {
		defer wg.Done()
		h := sha256.New()
		c.SetReadDeadline(time.Now().Add(timeout))
		m, err := io.Copy(h, c)
		*n = int(m)
		h.Sum(sum[:0])
		if err != nil {
			errs <- fmt.Errorf("read: %w", err)
		}
	}
	wg.Add(4)
	go send(r.clientA, fromA)
	go send(r.clientB, fromB)
	go recv(r.clientB, &gotAtB, &nAtB)
	go recv(r.clientA, &gotAtA, &nAtA)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	if nAtB != size || gotAtB != sha256.Sum256(fromA) {
		t.Errorf("clientB got %d bytes (sha256 %x), want the %d bytes clientA sent", nAtB, gotAtB, size)
	}
	if nAtA != size || gotAtA != sha256.Sum256(fromB) {
		t.Errorf("clientA got %d bytes (sha256 %x), want the %d bytes clientB sent", nAtA, gotAtA, size)
	}
	res := r.result(t)
	if res.AToB != size || res.BToA != size || res.Err != nil {
		t.Errorf("Result = %+v, want AToB=BToA=%d, Err=nil", res, size)
	}
	assertClosed(t, "a", r.a)
	assertClosed(t, "b", r.b)
}

// TestHalfClose: a request, half-close, then a response on the direction that
// is still open. Join must stay up until both directions are done.
func TestHalfClose(t *testing.T) {
	check.Leaks(t)
	r := startRelay(t)

	if _, err := r.clientA.Write([]byte("request")); err != nil {
		t.Fatal(err)
	}
	if err := r.clientA.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	// ReadAll returns only at EOF: the half-close crossed the relay.
	got, err := readAll(r.clientB)
	if err != nil || string(got) != "request" {
		t.Fatalf("clientB read %q, %v; want \"request\" then EOF", got, err)
	}
	r.notReturned(t, "after the a→b direction ended")

	// The b→a direction still flows.
	if _, err := r.clientB.Write([]byte("response")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len("response"))
	r.clientA.SetReadDeadline(time.Now().Add(timeout))
	if _, err := io.ReadFull(r.clientA, buf); err != nil || string(buf) != "response" {
		t.Fatalf("clientA read %q, %v; want \"response\"", buf, err)
	}
	r.notReturned(t, "before clientB half-closed")

	if err := r.clientB.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if rest, err := readAll(r.clientA); err != nil || len(rest) != 0 {
		t.Fatalf("clientA read %q, %v after \"response\"; want EOF", rest, err)
	}
	res := r.result(t)
	if res.AToB != int64(len("request")) || res.BToA != int64(len("response")) || res.Err != nil || res.BFirst {
		t.Errorf("Result = %+v, want AToB=7 BToA=8 Err=nil, and a→b ended first", res)
	}
	assertClosed(t, "a", r.a)
	assertClosed(t, "b", r.b)
}

// TestResetBecomesClose: one client resets its connection while the other is
// blocked in Read; the blocked Read must end, and Join must close both conns.
func TestResetBecomesClose(t *testing.T) {
	for _, tc := range []struct {
		name string
		pick func(r *relay) (resetter, reader *net.TCPConn)
	}{
		{"resetB", func(r *relay) (*net.TCPConn, *net.TCPConn) { return r.clientB, r.clientA }},
		{"resetA", func(r *relay) (*net.TCPConn, *net.TCPConn) { return r.clientA, r.clientB }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			check.Leaks(t)
			r := startRelay(t)
			resetter, reader := tc.pick(r)

			// A round trip first, so the relay is up and nothing is left
			// unread anywhere.
			if _, err := reader.Write([]byte("ping")); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 4)
			resetter.SetReadDeadline(time.Now().Add(timeout))
			if _, err := io.ReadFull(resetter, buf); err != nil {
				t.Fatal(err)
			}

			readErr := make(chan error, 1)
			go func() {
				reader.SetReadDeadline(time.Now().Add(timeout))
				n, err := reader.Read(make([]byte, 16))
				if n > 0 {
					err = fmt.Errorf("read %d unexpected bytes (err %v)", n, err)
				}
				readErr <- err
			}()

			if err := resetter.SetLinger(0); err != nil {
				t.Fatal(err)
			}
			resetter.Close() // SO_LINGER 0: sends RST

			err := <-readErr
			if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("the other client's Read returned %v; want EOF or an error before the deadline", err)
			}
			t.Logf("the other client's Read: %v", err)

			res := r.result(t)
			t.Logf("Result: %+v", res)
			if res.Err == nil {
				t.Errorf("Result.Err = nil, want the reset")
			} else if !errors.Is(res.Err, syscall.ECONNRESET) {
				t.Errorf("Result.Err = %v, want ECONNRESET", res.Err)
			}
			if res.AToB+res.BToA != 4 {
				t.Errorf("Result counts %d+%d bytes before the reset, want the 4 of \"ping\"", res.AToB, res.BToA)
			}
			assertClosed(t, "a", r.a)
			assertClosed(t, "b", r.b)
		})
	}
}

// TestBackpressure: clientB never reads. What clientA can write must be
// bounded by the kernel's buffers, not grow the heap of the copier.
func TestBackpressure(t *testing.T) {
	check.Leaks(t)
	r := startRelay(t)
	const (
		budget = 64 << 20 // what clientA tries to write
		limit  = 16 << 20 // sum of socket buffers and splice pipe, with room
		chunk  = 64 << 10
		stall  = 2 * time.Second
	)

	// Pin the four sockets' buffers: with autotuning a loopback receive
	// buffer may grow to net.ipv4.tcp_rmem's maximum (32 MiB on some
	// hosts), which would make the bound below the kernel's, not Join's.
	// Linux doubles the figure set; the splice pipe adds pipeSize.
	const sockBuf = 256 << 10
	for _, c := range []*net.TCPConn{r.clientA, r.a, r.b, r.clientB} {
		if err := c.SetReadBuffer(sockBuf); err != nil {
			t.Fatal(err)
		}
		if err := c.SetWriteBuffer(sockBuf); err != nil {
			t.Fatal(err)
		}
	}

	// Let Join reach its steady state before the baseline.
	if _, err := r.clientA.Write([]byte("warm")); err != nil {
		t.Fatal(err)
	}
	warm := make([]byte, 4)
	r.clientB.SetReadDeadline(time.Now().Add(timeout))
	if _, err := io.ReadFull(r.clientB, warm); err != nil {
		t.Fatal(err)
	}

	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)

	type written struct {
		n   int
		sum [sha256.Size]byte
		err error
	}
	done := make(chan written, 1)
	go func() {
		gen := rand.NewChaCha8([32]byte{3})
		h := sha256.New()
		buf := make([]byte, chunk)
		var w written
		r.clientA.SetWriteDeadline(time.Now().Add(stall))
		for w.n < budget {
			gen.Read(buf)
			n, err := r.clientA.Write(buf)
			h.Write(buf[:n])
			w.n += n
			if err != nil {
				w.err = err
				break
			}
		}
		h.Sum(w.sum[:0])
		done <- w
	}()
	var w written
	select {
	case w = <-done:
	case <-time.After(stall + timeout):
		t.Fatal("clientA's writer did not stop at its write deadline")
	}

	runtime.GC()
	runtime.ReadMemStats(&after)
	growth := int64(after.HeapInuse) - int64(before.HeapInuse)
	t.Logf("accepted while clientB was not reading: %d bytes (%.2f MiB); HeapInuse %+d bytes (%.2f MiB)",
		w.n, float64(w.n)/(1<<20), growth, float64(growth)/(1<<20))
	if !errors.Is(w.err, os.ErrDeadlineExceeded) {
		t.Fatalf("clientA stopped with %v after %d bytes; want a write deadline error", w.err, w.n)
	}
	if w.n >= limit {
		t.Errorf("clientA wrote %d bytes into a stalled relay; want < %d", w.n, limit)
	}
	if growth > 4<<20 {
		t.Errorf("HeapInuse grew by %d bytes during the stall; want < 4 MiB", growth)
	}

	// Now drain: every accepted byte arrives, intact, then EOF.
	if err := r.clientA.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	r.clientB.SetReadDeadline(time.Now().Add(timeout))
	n, err := io.Copy(h, r.clientB)
	if err != nil {
		t.Fatalf("clientB read %d bytes, then %v", n, err)
	}
	if n != int64(w.n) || !bytes.Equal(h.Sum(nil), w.sum[:]) {
		t.Errorf("clientB received %d bytes (sha256 %x), want the %d bytes clientA's writes accepted (sha256 %x)",
			n, h.Sum(nil), w.n, w.sum)
	}
	if err := r.clientB.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	res := r.result(t)
	if res.AToB != int64(len(warm)+w.n) || res.BToA != 0 || res.Err != nil {
		t.Errorf("Result = %+v, want AToB=%d BToA=0 Err=nil", res, len(warm)+w.n)
	}
}

// TestSpliceNoUserSpaceCopy: between two *net.TCPConn the bytes move with
// splice(2), so moving 64 MiB allocates next to nothing.
func TestSpliceNoUserSpaceCopy(t *testing.T) {
	check.Leaks(t)
	const (
		size  = 64 << 20
		chunk = 1 << 20
	)
	clientA, a := tcpPair(t)
	b, clientB := tcpPair(t)
	out := make([]byte, chunk)
	in := make([]byte, chunk)
	res := make(chan Result, 1)
	readErr := make(chan error, 1)
	var received int64

	var before, after runtime.MemStats
	runtime.GC()
	io0, ioOK := readProcIO()
	runtime.ReadMemStats(&before)

	go func() { res <- Join(a, b) }()
	go func() {
		clientB.SetReadDeadline(time.Now().Add(timeout))
		for {
			n, err := clientB.Read(in)
			received += int64(n)
			if err != nil {
				if err == io.EOF {
					err = nil
				}
				readErr <- err
				return
			}
		}
	}()
	clientA.SetWriteDeadline(time.Now().Add(timeout))
	for sent := 0; sent < size; sent += chunk {
		if _, err := clientA.Write(out); err != nil {
			clientA.Close()
			clientB.Close()
			t.Fatalf("write after %d bytes: %v", sent, err)
		}
	}
	clientA.CloseWrite()
	clientB.CloseWrite()
	err := <-readErr
	var r Result
	select {
	case r = <-res:
	case <-time.After(timeout):
		clientA.Close()
		clientB.Close()
		<-res
		t.Fatal("Join did not return")
	}

	runtime.ReadMemStats(&after)
	io1, _ := readProcIO()
	alloc := after.TotalAlloc - before.TotalAlloc
	t.Logf("moving %d MiB: TotalAlloc +%d bytes (%.1f KiB), Mallocs +%d",
		size>>20, alloc, float64(alloc)/1024, after.Mallocs-before.Mallocs)
	if err != nil || received != size {
		t.Fatalf("clientB received %d bytes, then %v; want %d then EOF", received, err, size)
	}
	if r.AToB != size || r.Err != nil {
		t.Errorf("Result = %+v, want AToB=%d Err=nil", r, size)
	}
	if alloc >= 4<<20 {
		t.Errorf("moving %d bytes allocated %d bytes; want < 4 MiB (no user-space copy)", size, alloc)
	}

	// TotalAlloc alone does not prove splice: a user-space copy through one
	// reused 32 KiB buffer allocates next to nothing too. The kernel's I/O
	// accounting does: read(2) and write(2) add to rchar and wchar, splice(2)
	// does not. The test's own clients read and write size bytes with
	// read(2)/write(2); a user-space copy in Join would add size more to each.
	if !ioOK {
		t.Log("no /proc/self/io: cannot check that Join avoided read(2)/write(2)")
		return
	}
	rchar, wchar := io1.rchar-io0.rchar, io1.wchar-io0.wchar
	t.Logf("process rchar +%d, wchar +%d; the test's clients account for %d each", rchar, wchar, size)
	if rchar-size > size/4 || wchar-size > size/4 {
		t.Errorf("Join itself read %d and wrote %d bytes with read(2)/write(2); want ~0 (splice)", rchar-size, wchar-size)
	}
}

type procIO struct{ rchar, wchar int64 }

// readProcIO returns the process's rchar and wchar from /proc/self/io.
func readProcIO() (procIO, bool) {
	data, err := os.ReadFile("/proc/self/io")
	if err != nil {
		return procIO{}, false
	}
	var v procIO
	var okR, okW bool
	for _, line := range strings.Split(string(data), "\n") {
		name, val, _ := strings.Cut(line, ": ")
		n, err := strconv.ParseInt(val, 10, 64)
		switch {
		case err != nil:
		case name == "rchar":
			v.rchar, okR = n, true
		case name == "wchar":
			v.wchar, okW = n, true
		}
	}
	return v, okR && okW
}

// TestPeerWithoutCloseWrite: b is a net.Pipe end, which cannot carry a
// half-close. When a reaches EOF, Join's fallback is to close the pipe end
// (its peer sees EOF) and return.
func TestPeerWithoutCloseWrite(t *testing.T) {
	check.Leaks(t)
	clientA, a := tcpPair(t)
	p, q := net.Pipe()
	t.Cleanup(func() { p.Close(); q.Close() })
	res := make(chan Result, 1)
	go func() { res <- Join(a, p) }()
	t.Cleanup(func() {
		clientA.Close()
		a.Close()
		p.Close()
		select {
		case <-res:
		case <-time.After(timeout):
			t.Error("Join did not return after all its conns were closed")
		}
	})

	if _, err := clientA.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	if err := clientA.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := readAll(q) // net.Pipe: io.EOF once p is closed
	if err != nil || string(got) != "hello" {
		t.Fatalf("pipe peer read %q, %v; want \"hello\" then EOF", got, err)
	}
	var r Result
	select {
	case r = <-res:
		res <- r
	case <-time.After(timeout):
		t.Fatal("Join did not return")
	}
	if r.AToB != 5 || r.BToA != 0 || r.Err != nil {
		t.Errorf("Result = %+v, want AToB=5 BToA=0 Err=nil (the fallback close is not an error)", r)
	}
	if _, err := q.Write([]byte("x")); !errors.Is(err, io.ErrClosedPipe) {
		t.Errorf("pipe peer write after Join: %v, want io.ErrClosedPipe", err)
	}
	if rest, err := readAll(clientA); err != nil || len(rest) != 0 {
		t.Errorf("clientA read %q, %v; want EOF (a closed)", rest, err)
	}
	assertClosed(t, "a", a)
}

// ---------------------------------------------------------------------------
// Benchmark

// BenchmarkJoin measures one-way throughput through Join over loopback, in
// 1 MiB writes, until the last byte has been read at the far end.
func BenchmarkJoin(b *testing.B) {
	check.Leaks(b)
	const chunk = 1 << 20
	r := startRelay(b)
	buf := randomBytes(chunk, 4)
	drained := make(chan error, 1)
	go func() {
		in := make([]byte, chunk)
		for {
			if _, err := r.clientB.Read(in); err != nil {
				if err == io.EOF {
					err = nil
				}
				drained <- err
				return
			}
		}
	}()
	b.SetBytes(chunk)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := r.clientA.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	r.clientA.CloseWrite()
	if err := <-drained; err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	r.clientB.CloseWrite()
	if res := r.result(b); res.AToB != int64(b.N)*chunk || res.Err != nil {
		b.Errorf("Result = %+v, want AToB=%d Err=nil", res, int64(b.N)*chunk)
	}
}

// TestStartOnDeadConns: links whose conns are already reset or closed end
// at once, whichever direction notices first (run under -race: the failing
// direction reads the other's state while Start may still be setting it up).
func TestStartOnDeadConns(t *testing.T) {
	check.Leaks(t)
	for i := range 50 {
		clientA, a := tcpPair(t)
		b, clientB := tcpPair(t)
		if i%2 == 0 {
			clientA.SetLinger(0)
		}
		clientA.Close()
		clientB.Close()
		res := make(chan Result, 1)
		Start(a, b, func(_ *Link, r Result) { res <- r })
		select {
		case <-res:
		case <-time.After(timeout):
			t.Fatalf("link %d on dead conns did not end", i)
		}
	}
}

// TestLinkSize: a Link is one allocation, paid for by every idle relayed
// connection at the relay and again at ./expose. It was 752 bytes (the
// 768-byte size class) while its directions kept copies of what the Link
// holds (its conns, a pointer to its Result field, its rate limit's stop
// channel) and three bound callbacks each.
func TestLinkSize(t *testing.T) {
	if unsafe.Sizeof(uintptr(0)) != 8 {
		t.Skip("the bound is for 64-bit platforms")
	}
	if n := unsafe.Sizeof(Link{}); n > 416 {
		t.Errorf("a Link is %d bytes, want at most 416 (the 416-byte size class)", n)
	}
}
