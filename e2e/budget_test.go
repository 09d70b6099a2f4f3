package e2e

import (
	"io"
	"net"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"tcprelay/internal/child"
)

// fdHeadroom skips (or, on CI, fails) a test that needs n more file
// descriptors than this process has left.
func fdHeadroom(t *testing.T, n int) {
	t.Helper()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	if need := uint64(len(fds) + n); lim.Cur < need {
		missing(t, "RLIMIT_NOFILE %d with %d open: need %d", lim.Cur, len(fds), need)
	}
	t.Logf("fd headroom: %d open, soft limit %d, %d more needed", len(fds), lim.Cur, n)
}

// openFDs counts the open file descriptors of process pid.
func openFDs(pid int) int {
	ents, _ := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/fd")
	return len(ents)
}

// TestPreAuthFloodWithLiveLinks: a flood of connections that never finish
// their handshake, from 50 addresses, as many as this process can hold,
// while 100 relayed connections echo 2 MiB each through the relay. The
// handshake budget keeps the relay far from its fd limit: no live link is
// cut, and new clients are served during the flood.
func TestPreAuthFloodWithLiveLinks(t *testing.T) {
	const flood, links, size = 15000, 100, 2 << 20
	fdHeadroom(t, flood+links+500)
	e := newEnv(t)
	r := e.startRelay(nil)
	_, pub := e.startEcho("127.0.0.1", r.port)
	ctl := child.Addr(r.port)

	// The live links: each streams 2 MiB and checks the echo.
	var cut atomic.Int64
	var wg sync.WaitGroup
	for i := range links {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := echoOnce(pub, randomBytes(size), 60*time.Second); err != nil {
				cut.Add(1)
				t.Errorf("live link %d: %v", i, err)
			}
		}()
	}
	// The flood: silent connections, held open.
	var held []net.Conn
	refused, failed := 0, 0
	start := time.Now()
	for i := range flood {
		d := net.Dialer{Timeout: 2 * time.Second, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 2, byte(1+i%50))}}
		c, err := d.Dial("tcp", ctl)
		if err != nil {
			failed++
			continue
		}
		held = append(held, c)
	}
	t.Cleanup(func() {
		for _, c := range held {
			c.Close()
		}
	})
	peak := openFDs(r.Pid())
	t.Logf("flood: %d silent connections opened in %v (%d dials failed); the relay holds %d fds (its limit: 20000 here)",
		len(held), time.Since(start).Round(time.Millisecond), failed, peak)
	// New clients during the flood.
	for i := range 20 {
		if err := echoOnce(pub, randomBytes(64<<10), 20*time.Second); err != nil {
			t.Errorf("new client %d during the flood: %v", i, err)
			t.Logf("relay log:\n%s", lastLines(r.Stderr.String(), 30))
		}
	}
	wg.Wait()
	for _, c := range held {
		c.SetReadDeadline(time.Now().Add(time.Millisecond))
		if n, _ := c.Read(make([]byte, 64)); n > 0 {
			refused++ // told "relay busy" at once
		}
	}
	t.Logf("%d of %d live links cut; 20 new clients served during the flood; %d flood connections refused at once, the rest held or made room for",
		cut.Load(), links, refused)
	if peak > 15000 {
		t.Errorf("the relay held %d fds during the flood: the handshake budget should keep it far from its limit", peak)
	}
}

// realLimit runs e's relays with the 20,000 descriptors of this machine's
// limit, whatever the limit where the test runs, and returns -metrics-addr
// flags for one.
func realLimit(t *testing.T, e *env) (maddr string) {
	t.Helper()
	e.relayWrap = []string{requireProgram(t, "prlimit", "util-linux"), "--nofile=20000:20000"}
	return child.Addr(freePort(t))
}

// echoed reports whether c, an outside client of an echo tunnel, is
// relayed: a byte written comes back. A refused client is closed at once.
func echoed(c net.Conn) bool {
	c.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write([]byte{1}); err != nil {
		return false
	}
	_, err := io.ReadFull(c, make([]byte, 1))
	return err == nil
}

// stillEchoed counts the conns that are still relayed, 64 at a time.
func stillEchoed(conns []net.Conn) int {
	var n atomic.Int64
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for _, c := range conns {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			if echoed(c) {
				n.Add(1)
			}
		})
	}
	wg.Wait()
	return int(n.Load())
}

// TestFairShareAtRealLimit: three tunnels flooded with clients that hold
// their connections, at the relay's real fd limit, and a fourth tunnel
// that comes after them is still served, every one of its 50 clients.
// Before the budget, the three took 3 x 4,096 clients, 24,576 fds: past
// the limit, and the fourth got none. Now each flood is admitted, the
// later ones taking places from the biggest until the three hold as many;
// the fourth takes its 50 from them, and never are there more clients than
// the budget.
func TestFairShareAtRealLimit(t *testing.T) {
	const perTunnel, late = 4096, 50
	// Every client admitted stays open on this side, those closed to make
	// room included.
	fdHeadroom(t, 3*perTunnel+late+1000)
	e := newEnv(t)
	maddr := realLimit(t, e)
	r := e.startRelayWith(nil, nil, "-metrics-addr", maddr)
	var pubs []int
	for range 4 {
		_, pub := e.startEcho("127.0.0.1", r.port)
		pubs = append(pubs, pub)
	}
	var all []net.Conn
	t.Cleanup(func() {
		for _, c := range all {
			c.Close()
		}
	})
	flood := func(pub, n int) (held []net.Conn) {
		for range n {
			c, err := net.DialTimeout("tcp", child.Addr(pub), 5*time.Second)
			if err != nil {
				continue
			}
			if !echoed(c) {
				c.Close()
				continue
			}
			held = append(held, c)
			all = append(all, c)
		}
		return held
	}
	var tunnels [][]net.Conn
	for i, pub := range pubs[:3] {
		held := flood(pub, perTunnel)
		tunnels = append(tunnels, held)
		t.Logf("tunnel %d, flooded: %d of %d clients admitted", i+1, len(held), perTunnel)
	}
	fourth := flood(pubs[3], late)
	tunnels = append(tunnels, fourth)
	t.Logf("tunnel 4, after the floods: %d of %d clients admitted; the relay holds %d fds", len(fourth), late, openFDs(r.Pid()))
	if len(fourth) < late {
		t.Errorf("the fourth tunnel got %d of %d clients: the three flooded ones starved it", len(fourth), late)
	}
	budget := metric(t, maddr, "tcprelay_budget_clients")
	live, total := make([]int, len(tunnels)), 0
	for i, held := range tunnels {
		live[i] = stillEchoed(held)
		total += live[i]
	}
	t.Logf("clients still relayed, by tunnel: %v, %d in all; the budget's clients %d; %d places reclaimed",
		live, total, budget, metric(t, maddr, "tcprelay_clients_reclaimed_total"))
	if int64(total) > budget {
		t.Errorf("%d clients relayed in all, past the budget of %d", total, budget)
	}
	if lo, hi := slices.Min(live[:3]), slices.Max(live[:3]); hi-lo > 2 || live[3] < late {
		t.Errorf("clients relayed by tunnel %v: want the three floods within 2 of each other, and the fourth's %d all still relayed", live, late)
	}
}

// TestCapacityOfALoneTunnel: a relay under a 20,000-fd limit, and one
// tunnel: it relays at least 9,000 idle connections at once, every
// descriptor the budget does not keep aside (the budget's 9,218 clients,
// two descriptors each: the rest is the reserve of 564 and the 500 kept
// free for each of handshakes and agents). Before, one tunnel alone held
// at most 3,734, half the clients' budget, even with
// -max-conns-per-tunnel -1. Then the tunnel takes the whole budget, and
// an agent that comes to the full relay still registers and has its
// clients served.
//
// Each process stays under its own 20,000: this test holds the 9,000
// clients; the relay two descriptors each (18,000) and its own; the agent,
// ./echoserver, one each (it serves every connection itself).
func TestCapacityOfALoneTunnel(t *testing.T) {
	const want = 9000
	fdHeadroom(t, want+500)
	e := newEnv(t)
	maddr := realLimit(t, e)
	r := e.startRelayWith(nil, nil, "-metrics-addr", maddr)
	_, pub := e.startEcho("127.0.0.1", r.port)
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	var failed atomic.Int64
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	start := time.Now()
	for range want {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			c, err := net.DialTimeout("tcp", child.Addr(pub), 10*time.Second)
			if err != nil || !echoed(c) {
				failed.Add(1)
				if c != nil {
					c.Close()
				}
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		})
	}
	wg.Wait()
	relayed := metric(t, maddr, "tcprelay_connections_relayed")
	t.Logf("%d of %d connections opened and echoed in %v (%d failed); the relay counts %d relayed and holds %d fds; the budget's clients: %d",
		len(conns), want, time.Since(start).Round(time.Millisecond), failed.Load(), relayed, openFDs(r.Pid()), metric(t, maddr, "tcprelay_budget_clients"))
	if len(conns) < want || relayed < want {
		t.Fatalf("one tunnel alone: %d connections opened, %d relayed; want %d; relay log:\n%s", len(conns), relayed, want, lastLines(r.Stderr.String(), 20))
	}
	// All at once: each is still relayed.
	if n := stillEchoed(conns); n < want {
		t.Errorf("%d of the %d connections still echo, want all", n, len(conns))
	}
	// The tunnel takes the rest of the budget, until the relay refuses it;
	// then a new agent still registers (its handshake and its session
	// find their floors), and its clients are served, in places the first
	// tunnel gives back.
	budget := int(metric(t, maddr, "tcprelay_budget_clients"))
	more := 0
	for range budget - want + 10 {
		c, err := net.DialTimeout("tcp", child.Addr(pub), 10*time.Second)
		if err != nil || !echoed(c) {
			if c != nil {
				c.Close()
			}
			break
		}
		more++
		conns = append(conns, c)
	}
	_, late := e.startEcho("127.0.0.1", r.port)
	served := 0
	for range 10 {
		c, err := net.DialTimeout("tcp", child.Addr(late), 10*time.Second)
		if err == nil && echoed(c) {
			served++
			conns = append(conns, c)
		} else if c != nil {
			c.Close()
		}
	}
	t.Logf("%d more clients until the relay refused one (%d in all, budget %d); then a new tunnel: %d of 10 served, %d places reclaimed; the relay holds %d fds",
		more, want+more, budget, served, metric(t, maddr, "tcprelay_clients_reclaimed_total"), openFDs(r.Pid()))
	if want+more < budget-8 {
		t.Errorf("one tunnel held %d clients, want the budget's %d but the few whose descriptors are in flight (8)", want+more, budget)
	}
	if served < 10 {
		t.Errorf("a tunnel registered when the relay was full got %d of 10 clients served, want all", served)
	}
}

// skmem sums, over the TCP sockets of process pid, the kernel memory ss
// reports for each: received and not read (r), queued to send (w), and
// reserved ahead (f).
func skmem(t *testing.T, pid int) int64 {
	t.Helper()
	out, err := exec.Command("ss", "-tmnpH").Output()
	if err != nil {
		t.Fatalf("ss -tmnp: %v", err)
	}
	owner := regexp.MustCompile(`pid=` + strconv.Itoa(pid) + `,`)
	mem := regexp.MustCompile(`skmem:\(r(\d+),rb\d+,t\d+,tb\d+,f(\d+),w(\d+)`)
	var sum int64
	lines := strings.Split(string(out), "\n")
	for i, l := range lines {
		if !owner.MatchString(l) {
			continue
		}
		// ss prints skmem on the socket's line, or on the next one.
		m := mem.FindStringSubmatch(l)
		if m == nil && i+1 < len(lines) {
			m = mem.FindStringSubmatch(lines[i+1])
		}
		for _, f := range m[1:] {
			v, _ := strconv.ParseInt(f, 10, 64)
			sum += v
		}
	}
	return sum
}

// TestStalledClientMemory: outside clients of an echo server that echo
// fast, then stop reading while they go on writing, until both directions
// of each link are stalled. Each such link holds a bounded amount of the
// relay's kernel memory, measured with ss -tm, against what the kernel's
// autotuning lets it hold (-link-buffer off).
func TestStalledClientMemory(t *testing.T) {
	requireProgram(t, "ss", "iproute2")
	const stalled = 3
	perLink := map[string]int64{}
	for _, mode := range []string{"default", "off"} {
		t.Run("link-buffer "+mode, func(t *testing.T) {
			e := newEnv(t)
			flags := []string{"-max-stalled-memory", "off"}
			if mode == "off" {
				flags = append(flags, "-link-buffer", "off")
			}
			r := e.startRelayWith(nil, nil, flags...)
			_, pub := e.startEcho("127.0.0.1", r.port)
			before := skmem(t, r.Pid())
			for range stalled {
				c, err := net.DialTimeout("tcp", child.Addr(pub), 5*time.Second)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				// It writes without end; it reads 64 MiB of the echo as
				// fast as it can, long enough for the kernel to grow
				// buffers that autotune, then no more. Its writes then
				// stop once every buffer on the way is full.
				go func() {
					chunk := make([]byte, 256<<10)
					for {
						c.SetWriteDeadline(time.Now().Add(30 * time.Second))
						if _, err := c.Write(chunk); err != nil {
							return
						}
					}
				}()
				c.SetReadDeadline(time.Now().Add(30 * time.Second))
				if _, err := io.CopyN(io.Discard, c, 64<<20); err != nil {
					t.Fatal(err)
				}
			}
			// Until the relay's buffers are full: memory stops growing.
			var last, now int64
			child.WaitFor(30*time.Second, func() bool {
				last, now = now, skmem(t, r.Pid())
				time.Sleep(500 * time.Millisecond) // a sample every half second
				return now > before && now == last
			})
			per := (now - before) / stalled
			perLink[mode] = per
			t.Logf("-link-buffer %s: %d clients stalled both ways hold %.1f MiB of the relay's socket memory, %.1f MiB each",
				mode, stalled, float64(now-before)/(1<<20), float64(per)/(1<<20))
			if mode == "default" && per > 8<<20 {
				t.Errorf("a stalled client holds %.1f MiB of the relay's socket memory, want at most 8 MiB", float64(per)/(1<<20))
			}
		})
	}
	t.Logf("per stalled client: %.1f MiB with the default -link-buffer, %.1f MiB with the kernel's autotuning",
		float64(perLink["default"])/(1<<20), float64(perLink["off"])/(1<<20))
}

// lastLines is the last n lines of s.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(len(lines)-n, 0):], "\n")
}
