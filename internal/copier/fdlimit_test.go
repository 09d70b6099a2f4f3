//go:build linux

package copier

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"tcprelay/internal/check"
)

// TestLinksOutliveFDLimit: when the process is at its fd limit, so that no
// splice pipe can be had, established links still carry every byte both
// ways (through a buffer), park again when idle holding neither pipe nor
// buffer, and end cleanly.
func TestLinksOutliveFDLimit(t *testing.T) {
	check.Leaks(t)
	const (
		nLinks = 4
		size   = 2 << 20 // each way, on each link
	)
	type link struct {
		*relay
		l *Link
	}
	links := make([]link, nLinks)
	for i := range links {
		links[i].relay, links[i].l = startLink(t)
		exchange(t, links[i].relay, []byte{byte(i)})
	}
	// Idle links hold no pipe, so none is left once exhaustFDs has had the
	// pool's closed.
	check.Eventually(t, timeout, func() error {
		for i, k := range links {
			if err := idleAndEmpty(k.l); err != nil {
				return fmt.Errorf("link %d: %w", i, err)
			}
		}
		return nil
	})
	exhaustFDs(t)

	relays := make([]*relay, nLinks)
	for i, k := range links {
		relays[i] = k.relay
	}
	bulkBothWays(t, relays, size)
	if t.Failed() {
		for i, k := range links {
			k.l.Close() // for its Result, if it has not failed
			t.Logf("link %d: %+v", i, k.result(t))
		}
		t.FailNow()
	}

	// Idle again: parked, holding neither pipe nor buffer.
	check.Eventually(t, timeout, func() error {
		for i, k := range links {
			if err := idleAndEmpty(k.l); err != nil {
				return fmt.Errorf("link %d after the bulk: %w", i, err)
			}
		}
		return nil
	})
	for i, k := range links {
		k.clientA.CloseWrite()
		k.clientB.CloseWrite()
		for _, c := range []net.Conn{k.clientA, k.clientB} {
			if rest, err := readAll(c); err != nil || len(rest) != 0 {
				t.Errorf("link %d: read %d bytes, %v; want EOF", i, len(rest), err)
			}
		}
		if res := k.result(t); res.AToB != 1+size || res.BToA != 1+size || res.Err != nil {
			t.Errorf("link %d: Result = %+v, want AToB=BToA=%d Err=nil", i, res, 1+size)
		}
	}
}

// TestCopyOutlivesFDLimit: Copy, which echoserver uses, carries every byte
// when no splice pipe can be had.
func TestCopyOutlivesFDLimit(t *testing.T) {
	check.Leaks(t)
	const size = 2 << 20
	client, server := tcpPair(t)
	exhaustFDs(t)
	type result struct {
		n   int64
		err error
	}
	done := make(chan result, 1)
	go func() {
		n, err := Copy(server, server) // an echo, as echoserver's
		server.Close()
		done <- result{n, err}
	}()
	data := randomBytes(size, 9)
	go func() {
		client.SetWriteDeadline(time.Now().Add(timeout))
		client.Write(data) // an error shows as bytes missing below
		client.CloseWrite()
	}()
	if got, err := readAll(client); err != nil || !bytes.Equal(got, data) {
		t.Errorf("echoed %d bytes (equal to those sent: %t), then %v; want the %d sent, then EOF",
			len(got), bytes.Equal(got, data[:min(len(got), size)]), err, size)
	}
	select {
	case r := <-done:
		if r.n != size || r.err != nil {
			t.Errorf("Copy = %d, %v; want %d, nil", r.n, r.err, size)
		}
	case <-time.After(timeout):
		t.Fatal("Copy did not return after EOF")
	}
}

// startLink is startRelay with Start instead of Join: the test has the Link.
func startLink(tb testing.TB) (*relay, *Link) {
	tb.Helper()
	r := &relay{res: make(chan Result, 1)}
	r.clientA, r.a = tcpPair(tb)
	r.b, r.clientB = tcpPair(tb)
	l := Start(r.a, r.b, func(_ *Link, res Result) { r.res <- res })
	tb.Cleanup(func() {
		l.Close()
		select {
		case <-r.res:
		case <-time.After(timeout):
			tb.Error("link did not end after Close")
		}
	})
	return r, l
}

// idleAndEmpty returns an error unless both of l's directions are parked,
// holding neither a pipe nor a buffer.
func idleAndEmpty(l *Link) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i := range l.dirs {
		// A parked direction's goroutine has returned, and none runs until
		// wake, under l.mu: its splicer may be read here.
		d := &l.dirs[i]
		if !l.parked[i] {
			return fmt.Errorf("direction %d is not parked", i)
		}
		if d.sp.p != nil || d.sp.buf != nil {
			return fmt.Errorf("parked direction %d holds a pipe or a buffer", i)
		}
	}
	return nil
}

// splicePipes counts the pipes that have both ends open in this process:
// the copier's. (A pipe to the test's parent, such as stdout, has only its
// write end here.)
func splicePipes(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("no /proc/self/fd: %v", err)
	}
	type ends struct{ r, w bool }
	seen := make(map[string]ends)
	for _, e := range ents {
		target, err := os.Readlink("/proc/self/fd/" + e.Name())
		if err != nil || !strings.HasPrefix(target, "pipe:") {
			continue
		}
		info, err := os.ReadFile("/proc/self/fdinfo/" + e.Name())
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(info), "\n") {
			if v, ok := strings.CutPrefix(line, "flags:"); ok {
				flags, _ := strconv.ParseUint(strings.TrimSpace(v), 8, 32)
				e := seen[target]
				if flags&syscall.O_ACCMODE == syscall.O_WRONLY {
					e.w = true
				} else {
					e.r = true
				}
				seen[target] = e
			}
		}
	}
	n := 0
	for _, e := range seen {
		if e.r && e.w {
			n++
		}
	}
	return n
}

// exhaustFDs waits for the collector to close the pipes in the pool, then
// lowers the soft RLIMIT_NOFILE to a few fds above those open now and takes
// every fd left under it, so that no pipe can be had; t.Cleanup gives the
// fds and the limit back. Until then nothing may open an fd, not even
// check.FDs. Call it when no link holds a pipe.
func exhaustFDs(t *testing.T) {
	t.Helper()
	check.Eventually(t, timeout, func() error {
		// After two rounds the pool has dropped its pipes, and finalizers
		// close them.
		runtime.GC()
		if n := splicePipes(t); n > 0 {
			return fmt.Errorf("%d splice pipes still open", n)
		}
		return nil
	})
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	lim := old
	lim.Cur = uint64(check.FDs() + 16)
	if lim.Cur > old.Cur {
		t.Skipf("%d fds open, soft limit %d: too close to the limit already", lim.Cur-16, old.Cur)
	}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	var held []int
	t.Cleanup(func() {
		for _, fd := range held {
			syscall.Close(fd)
		}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
			t.Errorf("restore RLIMIT_NOFILE: %v", err)
		}
	})
	// No fd numbered lim.Cur or more can be opened: at most lim.Cur opens.
	for range lim.Cur {
		fd, err := syscall.Open(os.DevNull, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
		if err == syscall.EMFILE {
			break
		}
		if err != nil {
			t.Fatalf("open %s: %v", os.DevNull, err)
		}
		held = append(held, fd)
	}
	var p [2]int
	if err := syscall.Pipe2(p[:], syscall.O_CLOEXEC); err != syscall.EMFILE {
		if err == nil {
			syscall.Close(p[0])
			syscall.Close(p[1])
		}
		t.Fatalf("pipe2 at the fd limit: %v, want EMFILE", err)
	}
	t.Logf("soft RLIMIT_NOFILE %d, %d fds taken to reach it", lim.Cur, len(held))
}

// bulkBothWays sends size random bytes each way on every relay's link at
// once, and checks that exactly those bytes arrive.
func bulkBothWays(t *testing.T, relays []*relay, size int) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, 4*len(relays))
	for i, k := range relays {
		for j, ends := range [][2]*net.TCPConn{{k.clientA, k.clientB}, {k.clientB, k.clientA}} {
			data := randomBytes(size, uint64(2*i+j))
			wg.Add(2)
			go func() {
				defer wg.Done()
				ends[0].SetWriteDeadline(time.Now().Add(timeout))
				if _, err := ends[0].Write(data); err != nil {
					errs <- fmt.Errorf("link %d, way %d: write: %w", i, j, err)
				}
			}()
			go func() {
				defer wg.Done()
				got := make([]byte, size)
				ends[1].SetReadDeadline(time.Now().Add(timeout))
				if n, err := io.ReadFull(ends[1], got); err != nil {
					errs <- fmt.Errorf("link %d, way %d: read %d bytes, then %w", i, j, n, err)
				} else if !bytes.Equal(got, data) {
					errs <- fmt.Errorf("link %d, way %d: bytes differ from those sent", i, j)
				}
			}()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestLinksBeyondPipeBound: with the splice pipes bounded to one (as a
// relay bounds them from its budget of descriptors), four links moving
// bulk both ways at once carry every byte, those without a pipe through a
// buffer, and the pipes alive never pass the bound.
func TestLinksBeyondPipeBound(t *testing.T) {
	check.Leaks(t)
	// The pipes pooled by earlier tests are closed by the collector.
	check.Eventually(t, timeout, func() error {
		runtime.GC()
		if n := PipesAlive(); n != 0 {
			return fmt.Errorf("%d pipes alive", n)
		}
		return nil
	})
	SetMaxPipes(1)
	t.Cleanup(func() { SetMaxPipes(0) })
	const nLinks, size = 4, 2 << 20
	relays := make([]*relay, nLinks)
	for i := range relays {
		relays[i], _ = startLink(t)
	}
	most := 0
	stop := make(chan struct{})
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		for {
			most = max(most, PipesAlive())
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	bulkBothWays(t, relays, size)
	close(stop)
	<-watched
	if most > 1 {
		t.Errorf("%d pipes alive at once, past the bound of 1", most)
	}
	t.Logf("at most %d pipe alive while %d links moved %d MiB each way", most, nLinks, size>>20)
}
