package e2e

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"tcprelay/internal/child"
	"tcprelay/internal/testutil"
)

// taggedEcho is a TCP server in the test process, the TARGET of one
// ./expose: it writes its tag, then echoes, honouring half-close.
func taggedEcho(t *testing.T, tag byte) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	testutil.Serve(t, ln, func(c net.Conn) {
		c.Write([]byte{tag})
		testutil.Echo(c)
	})
	return ln.Addr().String()
}

// attempt is one short client through the load balancer.
type attempt struct {
	start, end time.Time
	tag        byte // the agent that served it
	err        error
}

// tryClient connects to addr, reads the serving agent's tag, sends 16 KiB
// of random bytes, half-closes, and checks the echo byte for byte.
func tryClient(addr string) (a attempt) {
	a.start = time.Now()
	defer func() { a.end = time.Now() }()
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		a.err = err
		return a
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	tag := make([]byte, 1)
	if _, err := io.ReadFull(c, tag); err != nil {
		a.err = fmt.Errorf("no tag: %w", err)
		return a
	}
	a.tag = tag[0]
	data := make([]byte, 16<<10)
	rand.Read(data)
	go func() {
		c.Write(data)
		c.(*net.TCPConn).CloseWrite()
	}()
	got, err := io.ReadAll(c)
	switch {
	case err != nil:
		a.err = fmt.Errorf("after %d bytes: %w", len(got), err)
	case !bytes.Equal(got, data):
		a.err = fmt.Errorf("echo of %d bytes differs (got %d)", len(data), len(got))
	}
	return a
}

// load runs workers clients at a time through addr until stop is closed.
type load struct {
	mu       sync.Mutex
	attempts []attempt
	wg       sync.WaitGroup
	stop     chan struct{}
}

func startLoad(addr string, workers int) *load {
	l := &load{stop: make(chan struct{})}
	for range workers {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for {
				select {
				case <-l.stop:
					return
				default:
				}
				a := tryClient(addr)
				l.mu.Lock()
				l.attempts = append(l.attempts, a)
				l.mu.Unlock()
			}
		}()
	}
	return l
}

func (l *load) finish() []attempt {
	close(l.stop)
	l.wg.Wait()
	return l.attempts
}

// phase sums up the clients that ran wholly within [from, to): how many,
// how many failed, and the span from the first failure's start to the last
// one's.
func phase(as []attempt, from, to time.Time) (n, failed int, gap time.Duration, first error) {
	var fs []time.Time
	for _, a := range as {
		if a.start.Before(from) || !a.end.Before(to) {
			continue
		}
		n++
		if a.err != nil {
			fs = append(fs, a.start)
			if first == nil {
				first = a.err
			}
		}
	}
	if len(fs) > 0 {
		sort.Slice(fs, func(i, j int) bool { return fs[i].Before(fs[j]) })
		gap = fs[len(fs)-1].Sub(fs[0])
	}
	return n, len(fs), gap, first
}

// TestFleetBehindHAProxy: three relays (127.0.0.1, .2, .3) behind haproxy,
// two ./expose agents in one pool, each registered with all three relays.
// A stream of real clients goes through haproxy, checked byte for byte,
// while one relay and one agent are killed with SIGKILL, and then while
// all three relays are restarted one after another (SIGTERM, restart,
// next). Every client that starts once haproxy's check has had time to
// see a relay gone is served intact, and streams on paths that did not
// fail lose nothing.
func TestFleetBehindHAProxy(t *testing.T) {
	requireProgram(t, "haproxy", "haproxy")
	e := newEnv(t)
	ctlPort := freePort(t)
	ips := []string{"127.0.0.1", "127.0.0.2", "127.0.0.3"}
	var relays []*relay
	for _, ip := range ips {
		r := e.tryRelay(ip, ctlPort, nil, []string{"-heartbeat", "1s"})
		if r == nil {
			t.Skipf("control port %d is taken on %s", ctlPort, ip)
		}
		relays = append(relays, r)
	}
	hosts := strings.Join(ips, ",")
	agentArgs := func(target string) []string {
		return []string{"-pool", "web", "-health-check", "500ms", hosts, strconv.Itoa(ctlPort), target}
	}
	startAgent := func(tag byte, target string) (*proc, int) {
		p := e.start(exposeBin, agentArgs(target), procOpts{scanStdout: true, daemon: true})
		var port int
		for i := 1; i <= len(ips); i++ {
			line, ok := p.waitLine(i, announceTimeout)
			if !ok {
				t.Fatalf("agent %c: %d announcements, want one per relay; stderr:\n%s", tag, i-1, p.Stderr)
			}
			pt, ok := child.AnnouncedPort(line, ips[0])
			for _, ip := range ips[1:] {
				if !ok {
					pt, ok = child.AnnouncedPort(line, ip)
				}
			}
			if !ok || port != 0 && pt != port {
				t.Fatalf("agent %c: announcement %q, want every relay on one port (%d)", tag, line, port)
			}
			port = pt
		}
		p.expectLines(len(ips))
		return p, port
	}
	targetA, targetB := taggedEcho(t, 'A'), taggedEcho(t, 'B')
	agentA, pub := startAgent('A', targetA)
	agentB, pubB := startAgent('B', targetB)
	if pubB != pub {
		t.Fatalf("pool members on ports %d and %d, want one", pub, pubB)
	}

	// haproxy in front, checking each relay's public port.
	servers := "  balance roundrobin\n"
	for i, ip := range ips {
		servers += fmt.Sprintf("  server relay%d %s:%d check inter 250ms fall 2 rise 2\n", i+1, ip, pub)
	}
	lbPort := e.startHAProxy("", servers)
	lbAddr := child.Addr(lbPort)
	const detect = time.Second // haproxy: 2 failed checks 250 ms apart, and slack

	// Streams straight to relays 1 and 3, which never fail by SIGKILL.
	type tagged struct {
		s   *stream
		tag byte
	}
	// Two through each agent, on relays 1 and 3.
	var streams []tagged
	perAgent := map[byte]int{}
	for i := 0; len(streams) < 4 && i < 100; i++ {
		ip := ips[2*(i%2)]
		c, err := net.DialTimeout("tcp", net.JoinHostPort(ip, strconv.Itoa(pub)), 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		tag := make([]byte, 1)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, tag); err != nil {
			t.Fatalf("stream through %s: %v", ip, err)
		}
		c.SetReadDeadline(time.Time{})
		if perAgent[tag[0]] == 2 {
			c.Close()
			continue
		}
		perAgent[tag[0]]++
		// 16 KiB every 10 ms: enough to lose a byte in, not so much that
		// it starves the rest of the test of CPU.
		streams = append(streams, tagged{streamOn(t, c, 10*time.Millisecond), tag[0]})
	}
	if len(streams) < 4 {
		t.Fatalf("100 connections did not give two streams through each agent: %v", perAgent)
	}

	l := startLoad(lbAddr, 4)
	t0 := time.Now()
	time.Sleep(2 * time.Second) // the fleet under load, before any fault

	t1 := time.Now()
	relays[1].kill()
	time.Sleep(3 * time.Second) // load runs through the fault

	t2 := time.Now()
	agentA.kill()
	time.Sleep(3 * time.Second)

	// Streams: those through agent B (on relays 1 and 3) lost nothing; those
	// through agent A ended with its SIGKILL. (A rolling restart ends every
	// stream after its drain: it is a fault of every path.)
	for i, st := range streams {
		if st.tag == 'A' {
			if !st.s.waitEnd(5 * time.Second) {
				t.Errorf("stream %d through the killed agent A still open", i)
			}
			t.Logf("stream %d (agent A, killed): %d bytes sent, %d echoed before the end", i, st.s.sent.Load(), st.s.recv.Load())
			continue
		}
		if err := st.s.finish(20 * time.Second); err != nil {
			t.Errorf("stream %d through agent B: %v", i, err)
		} else {
			t.Logf("stream %d (agent B): %d bytes sent and echoed, 0 lost, across both kills", i, st.s.sent.Load())
		}
	}

	// Back to full strength: relay 2 and agent A return.
	back := time.Now()
	linesB := len(agentB.Lines())
	relays[1] = e.restartRelay(relays[1])
	agentA, _ = startAgent('A', targetA)
	// Agent B registers with relay 2 again at its next reconnection
	// attempt, after a backoff of up to some seconds: the rolling restart
	// below counts each agent's announcements, so it starts once this one
	// is in (a late one was counted as relay 1's, and the agent ended with
	// one line more than expected).
	agentB.expectLines(linesB + 1)
	if _, ok := agentB.waitLine(linesB+1, 20*time.Second); !ok {
		t.Fatalf("agent B did not register again with relay 2 within 20s of its restart; stderr:\n%s", agentB.Stderr)
	}

	// Rolling restart of the three relays, under the same load.
	t3 := time.Now()
	var rolling []string
	var terms []time.Time
	for i, r := range relays {
		start := time.Now()
		lines := []int{len(agentA.Lines()), len(agentB.Lines())}
		terms = append(terms, time.Now())
		r.sigterm()
		r.mustExit(20 * time.Second)
		relays[i] = e.restartRelay(r)
		for j, a := range []*proc{agentA, agentB} {
			// Each agent prints one more announcement for the relay.
			a.expectLines(lines[j] + 1)
			if _, ok := a.waitLine(lines[j]+1, 10*time.Second); !ok {
				t.Fatalf("an agent did not register again with relay %d within 10s of its restart; stderr:\n%s", i+1, a.Stderr)
			}
		}
		rolling = append(rolling, fmt.Sprintf("relay %d: back with both agents %v after SIGTERM", i+1, time.Since(start).Round(time.Millisecond)))
	}
	t4 := time.Now()
	time.Sleep(time.Second)
	as := l.finish()
	end := time.Now()

	report := func(name string, from, to time.Time) (int, int) {
		n, failed, gap, first := phase(as, from, to)
		served := map[byte]int{}
		for _, a := range as {
			if !a.start.Before(from) && a.end.Before(to) && a.err == nil {
				served[a.tag]++
			}
		}
		t.Logf("%s: %d clients, %d failed (span of failures %v; first: %v); served by A %d, B %d",
			name, n, failed, gap.Round(time.Millisecond), first, served['A'], served['B'])
		return n, failed
	}
	// The clients in flight through a relay or an agent that is killed end
	// with it; the gap is how long clients that start after a fault still
	// fail.
	inFlight := func(name string, at time.Time) {
		failed, last := 0, time.Duration(0)
		for _, a := range as {
			if a.err != nil && a.end.After(at) && a.start.Before(at.Add(detect)) {
				failed++
				last = max(last, a.start.Sub(at))
			}
		}
		t.Logf("%s: %d clients failed, the last one started %v after the fault", name, failed, last.Round(time.Millisecond))
	}
	if n, failed := report("before the faults", t0, t1); failed > 0 || n == 0 {
		t.Errorf("before any fault: %d of %d clients failed", failed, n)
	}
	inFlight("relay 2 killed", t1)
	if n, failed := report("relay 2 killed, after haproxy's check", t1.Add(detect), t2); failed > 0 || n == 0 {
		t.Errorf("after relay 2's SIGKILL and haproxy's check interval: %d of %d clients failed", failed, n)
	}
	inFlight("agent A killed", t2)
	if n, failed := report("agent A killed, after a second", t2.Add(detect), back); failed > 0 || n == 0 {
		t.Errorf("a second after agent A's SIGKILL: %d of %d clients failed", failed, n)
	}
	if n, failed := report("relay 2 and agent A back", back, t3); failed > 0 || n == 0 {
		t.Errorf("while relay 2 and agent A came back: %d of %d clients failed", failed, n)
	}
	// A relay that stops closes its public port at once, so haproxy sends
	// new clients elsewhere; but a client the kernel has just accepted for
	// it, and the relay not yet, is reset with the port: haproxy, already
	// connected, cannot retry it. Those are the only failures allowed, in
	// the instant a relay stops.
	report("rolling restart of the three relays", t3, t4)
	for _, a := range as {
		if a.err == nil || a.start.Before(t3) || !a.start.Before(t4) {
			continue
		}
		near := time.Duration(1 << 62)
		for _, term := range terms {
			near = min(near, max(a.start.Sub(term), term.Sub(a.start)))
		}
		if near > 100*time.Millisecond {
			t.Errorf("rolling restart: a client that started %v from the nearest SIGTERM failed: %v", near.Round(time.Millisecond), a.err)
		} else {
			t.Logf("rolling restart: a client that started %v from a relay's SIGTERM failed: %v", near.Round(time.Millisecond), a.err)
		}
	}
	report("after", t4, end)
	for _, line := range rolling {
		t.Log(line)
	}
	if t.Failed() {
		for _, a := range as {
			if a.err != nil {
				t.Logf("failed client at t0+%v: %v", a.start.Sub(t0).Round(time.Millisecond), a.err)
			}
		}
		t.Logf("t1 (relay 2 killed) = t0+%v, t2 (agent A killed) = t0+%v, t3 (rolling restart) = t0+%v", t1.Sub(t0).Round(time.Millisecond), t2.Sub(t0).Round(time.Millisecond), t3.Sub(t0).Round(time.Millisecond))
		for i, r := range relays {
			for _, l := range linesWith(r.Stderr.String(), "closed outside client") {
				t.Logf("relay %d: %s", i+1, l)
			}
		}
		for name, a := range map[string]*proc{"A": agentA, "B": agentB} {
			for _, l := range linesWith(a.Stderr.String(), "level=WARN") {
				t.Logf("agent %s: %s", name, l)
			}
		}
	}
}

// TestPoolTargetDown: two ./expose agents in a pool, with a health check
// too slow to matter here (30 s). When one agent's target goes down, the
// first client sent to it fails, and the agent, on that failed dial,
// checks at once and tells the relay it is unready: the clients after it
// go to the other member.
func TestPoolTargetDown(t *testing.T) {
	e := newEnv(t)
	r := e.startRelay(nil)
	lnA, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	testutil.Serve(t, lnA, func(c net.Conn) {
		c.Write([]byte{'A'})
		testutil.Echo(c)
	})
	_, pub := e.startExpose("127.0.0.1", r.port, lnA.Addr().String(), "-pool", "web", "-health-check", "30s")
	_, pubB := e.startExpose("127.0.0.1", r.port, taggedEcho(t, 'B'), "-pool", "web", "-health-check", "30s")
	if pubB != pub {
		t.Fatalf("pool members on ports %d and %d, want one", pub, pubB)
	}
	addr := child.Addr(pub)
	seen := map[byte]bool{}
	for i := 0; i < 100 && !(seen['A'] && seen['B']); i++ {
		a := tryClient(addr)
		if a.err != nil {
			t.Fatalf("client %d with both targets up: %v", i, a.err)
		}
		seen[a.tag] = true
	}
	if !seen['A'] || !seen['B'] {
		t.Fatalf("100 clients reached only %v: want both members", seen)
	}

	lnA.Close() // target A goes down; its agent stays
	failed := 0
	for i := range 40 {
		a := tryClient(addr)
		switch {
		case a.err != nil:
			failed++
		case a.tag != 'B':
			t.Errorf("client %d served by %c, whose target is down", i, a.tag)
		}
	}
	t.Logf("target A down: %d of 40 clients failed, the rest served by B", failed)
	if failed > 3 {
		t.Errorf("%d of 40 clients failed after target A went down: its agent should stop taking clients after its first failed dial", failed)
	}
}
