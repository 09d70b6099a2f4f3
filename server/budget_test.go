package server

import (
	"bytes"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// addrConn is a net.Conn that only has a remote address.
type addrConn struct {
	net.Conn
	remote net.Addr
}

func (c addrConn) RemoteAddr() net.Addr { return c.remote }

// TestSourceGroupsIPv6By64: one host holds a whole IPv6 /64, so every
// per-source limit counts a /64 as one source; IPv4 addresses (and IPv4
// in IPv6) stay one each.
func TestSourceGroupsIPv6By64(t *testing.T) {
	src := func(ip string) netip.Addr {
		return sourceOf(addrConn{remote: &net.TCPAddr{IP: net.ParseIP(ip), Port: 1}})
	}
	same := [][2]string{
		{"2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:ffff"},
		{"2001:db8:1:2:aaaa::5", "2001:db8:1:2::"},
		{"::ffff:192.0.2.1", "192.0.2.1"},
	}
	for _, p := range same {
		if a, b := src(p[0]), src(p[1]); a != b {
			t.Errorf("%s and %s are sources %v and %v, want one", p[0], p[1], a, b)
		}
	}
	differ := [][2]string{
		{"2001:db8:1:2::1", "2001:db8:1:3::1"},
		{"192.0.2.1", "192.0.2.2"},
	}
	for _, p := range differ {
		if a, b := src(p[0]), src(p[1]); a == b {
			t.Errorf("%s and %s are one source %v, want two", p[0], p[1], a)
		}
	}
}

// TestAuthThrottleCountsChecks: each check spends a token before it runs,
// and only a success gives it back, so an address has at most the burst
// plus the refill in checks however it spreads them.
func TestAuthThrottleCountsChecks(t *testing.T) {
	var th authThrottle
	src := netip.MustParseAddr("192.0.2.1")
	now := time.Now()
	checks := 0
	for range 100 {
		if th.takeLocked(src, now) {
			checks++
		}
	}
	if checks != authBurst {
		t.Fatalf("%d checks at once, want the burst of %d", checks, authBurst)
	}
	if th.takeLocked(src, now.Add(400*time.Millisecond)) {
		t.Fatal("a check 0.4 s later, before a token came back at 2 a second")
	}
	if !th.takeLocked(src, now.Add(time.Second)) {
		t.Fatal("no check a second later, with two tokens back")
	}
	// A success gives its token back: honest agents are never slowed.
	other := netip.MustParseAddr("192.0.2.2")
	for i := range 100 {
		if !th.takeLocked(other, now) {
			t.Fatalf("check %d of an address whose checks all succeed was refused", i)
		}
		th.refundLocked(other, now)
	}
}

// stuckWriter blocks every Write until released.
type stuckWriter struct{ release chan struct{} }

func (w stuckWriter) Write(p []byte) (int, error) {
	<-w.release
	return len(p), nil
}

// TestQuietLogNeverBlocksTheCaller: the refusals and drops of strangers are
// logged from the accept loop, so counting one must never wait on the
// log's output, even one that is stuck (a full pipe to a logger that
// stopped reading). The counts are all written once it moves again.
func TestQuietLogNeverBlocksTheCaller(t *testing.T) {
	w := stuckWriter{release: make(chan struct{})}
	var out lockedBuffer
	var wg sync.WaitGroup
	q := &quietLog{log: slog.New(slog.NewTextHandler(io.MultiWriter(w, &out), nil)), wg: &wg}
	done := make(chan struct{})
	go func() {
		for range 1000 {
			q.Warn("dropped connection", "remote", "192.0.2.1:1")
			q.Warn("refused connection", "remote", "192.0.2.2:2")
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("2,000 events were not counted within 5 s while the log's output was stuck")
	}
	close(w.release)
	q.flush()
	wg.Wait()
	total := 0
	for _, l := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		_, c, _ := strings.Cut(l, "count=")
		n, _ := strconv.Atoi(c)
		total += n
	}
	if total != 2000 {
		t.Errorf("the lines count %d events, want 2,000:\n%s", total, out.String())
	}
}

// lockedBuffer is a bytes.Buffer safe for concurrent use.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestBudgetFloorsAndClients: the budget's figures under 20,000 fds (those
// the docs give), and its rule: with clients at the most the budget
// allows, handshakes and agents each still have their floor free, and no
// more; a class above its floor takes room from the clients, not from the
// other's floor.
func TestBudgetFloorsAndClients(t *testing.T) {
	b := newBudget(20000)
	want := budget{fds: 20000, handshakes: 2000, perSource: 62, agents: 2500, pipes: 250, reserve: 564,
		handshakeFloor: 500, agentFloor: 500, clients: 9218}
	if b != want {
		t.Fatalf("newBudget(20000) = %+v, want %+v", b, want)
	}
	c := 2 * b.clients
	for _, tc := range []struct {
		what    string
		h, a, c int
		fits    bool
	}{
		{"every client, handshakes and agents idle", 0, 0, c, true},
		{"one client more", 0, 0, c + 2, false},
		{"every client, handshakes at their floor", b.handshakeFloor, 0, c, true},
		{"every client, one handshake past the floor", b.handshakeFloor + 1, 0, c, false},
		{"every client, both at their floors", b.handshakeFloor, b.agentFloor, c, true},
		{"every client, one agent's descriptor past the floor", b.handshakeFloor, b.agentFloor + 1, c, false},
		{"handshakes at their cap, agents keep their floor", b.handshakes, b.agentFloor, c - (b.handshakes - b.handshakeFloor), true},
		{"handshakes at their cap, one agent's past the floor", b.handshakes, b.agentFloor + 1, c - (b.handshakes - b.handshakeFloor), false},
	} {
		if got := b.fits(tc.h, tc.a, tc.c); got != tc.fits {
			t.Errorf("%s (%d handshakes, %d agents' fds, %d clients' fds): fits %v, want %v", tc.what, tc.h, tc.a, tc.c, got, tc.fits)
		}
	}
	// Small limits still make a relay that serves.
	for _, fds := range []int{200, 400, 2048} {
		b := newBudget(fds)
		if b.clients < 16 || b.handshakeFloor < 2*b.perSource || b.agentFloor < 16 || b.reserve+b.handshakeFloor+b.agentFloor+2*b.clients > fds {
			t.Errorf("newBudget(%d) = %+v: want room for 16 clients, a floor of two sources' handshakes and 16 agents' fds, all within the limit", fds, b)
		}
	}
}
