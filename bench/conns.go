package main

// Connection figures: set-up latency, the cost of idle relayed
// connections, and how many one relay holds.

import (
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"tcprelay/internal/child"
)

// echo writes back everything the client sends and half-closes after it
// does, like ./echoserver.
func echo(c net.Conn) {
	defer c.Close()
	if _, err := io.Copy(c, c); err != nil {
		return
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
}

var echoAddrRE = regexp.MustCompile(`^listening on 127\.0\.0\.1:(\d+)$`)

// startDirectEcho runs this program with -serve-echo: the direct echo
// server, a separate process like ./echoserver.
func startDirectEcho(cfg *config) (*child.Proc, int, error) {
	p, err := start("direct echo server", cfg.self, []string{"-serve-echo"}, child.Options{Scan: true})
	if err != nil {
		return nil, 0, err
	}
	line, err := p.FirstLine(10 * time.Second)
	if err != nil {
		p.Kill()
		return nil, 0, fmt.Errorf("direct echo server announced no address: %v: %s", err, clip(p.Stderr.String(), 500))
	}
	m := echoAddrRE.FindStringSubmatch(line)
	if m == nil {
		p.Kill()
		return nil, 0, fmt.Errorf("direct echo server printed %q", line)
	}
	port, _ := strconv.Atoi(m[1])
	return p, port, nil
}

// dialEcho connects to a, sends one byte and waits for it to come back,
// each step bounded by timeout. It returns the open connection.
func dialEcho(a string, timeout time.Duration) (net.Conn, error) {
	c, err := net.DialTimeout("tcp", a, timeout)
	if err != nil {
		return nil, err
	}
	if err := echoByte(c, 'e', timeout); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// echoByte writes b and reads it back within timeout.
func echoByte(c net.Conn, b byte, timeout time.Duration) error {
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write([]byte{b}); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	var got [1]byte
	if _, err := io.ReadFull(c, got[:]); err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return fmt.Errorf("no echo within %v", timeout)
		}
		return fmt.Errorf("read echo: %w", err)
	}
	if got[0] != b {
		return fmt.Errorf("echoed %q, want %q", got[0], b)
	}
	return c.SetDeadline(time.Time{})
}

// latencySamples times n sequential new connections to a, each until its
// first 1-byte echo is back, after a few untimed ones.
func latencySamples(a string, n int, timeout time.Duration) ([]time.Duration, error) {
	for range 20 {
		c, err := dialEcho(a, timeout)
		if err != nil {
			return nil, fmt.Errorf("warm-up: %w", err)
		}
		c.Close()
	}
	out := make([]time.Duration, 0, n)
	for i := range n {
		t0 := time.Now()
		c, err := dialEcho(a, timeout)
		d := time.Since(t0)
		if err != nil {
			return nil, fmt.Errorf("connection %d of %d: %w", i+1, n, err)
		}
		c.Close()
		out = append(out, d)
	}
	return out, nil
}

// percentile is the nearest-rank percentile p (0-100) of s, in µs.
func percentile(s []time.Duration, p float64) float64 {
	v := append([]time.Duration(nil), s...)
	sort.Slice(v, func(i, j int) bool { return v[i] < v[j] })
	k := max(0, int(math.Ceil(p/100*float64(len(v))))-1)
	return float64(v[k].Nanoseconds()) / 1e3
}

func benchLatency(cfg *config) []*Figure {
	const us = "µs"
	e50 := &Figure{Section: "latency", Name: "new conn + 1-byte echo p50, relay -> ./echoserver", Unit: us,
		Target: le(2.5), Chart: "new conn + echo p50, ./echoserver: relay/direct"}
	e99 := &Figure{Section: "latency", Name: "new conn + 1-byte echo p99, relay -> ./echoserver", Unit: us}
	x50 := &Figure{Section: "latency", Name: "new conn + 1-byte echo p50, relay -> ./expose -> echo", Unit: us,
		Target: le(2.5), Chart: "new conn + echo p50, ./expose: relay/direct"}
	x99 := &Figure{Section: "latency", Name: "new conn + 1-byte echo p99, relay -> ./expose -> echo", Unit: us}
	figs := []*Figure{e50, e99, x50, x99}

	_, echoPort, err := startDirectEcho(cfg)
	if err != nil {
		failAll(figs, err)
		return figs
	}
	relay, err := startRelay(cfg)
	if err != nil {
		failAll(figs, err)
		return figs
	}
	_, echoPub, err := startAgent(cfg, cfg.echoBin, relay.port)
	if err != nil {
		failAll(figs, err)
		return figs
	}
	_, exPub, err := startAgent(cfg, cfg.exposeBin, relay.port, child.Addr(echoPort))
	if err != nil {
		failAll(figs, err)
		return figs
	}
	fmt.Printf("   %d sequential dial + write 1 byte + read it back + close, per path and run; direct Go echo server (own process) on port %d, ./echoserver public port %d, ./expose public port %d -> %d\n",
		cfg.latencyN, echoPort, echoPub, exPub, echoPort)
	type path struct {
		name     string
		port     int
		p50, p99 []float64
	}
	paths := []*path{{name: "direct", port: echoPort}, {name: "relay->echoserver", port: echoPub}, {name: "relay->expose->echo", port: exPub}}
	for run := 1; run <= cfg.runs; run++ {
		var parts []string
		for k := range paths {
			p := paths[(k+run-1)%len(paths)] // rotate the order from run to run
			s, err := latencySamples(child.Addr(p.port), cfg.latencyN, cfg.connTimeout)
			if err != nil {
				failAll(figs, fmt.Errorf("run %d, %s: %w", run, p.name, err))
				return figs
			}
			p.p50, p.p99 = append(p.p50, percentile(s, 50)), append(p.p99, percentile(s, 99))
			parts = append(parts, fmt.Sprintf("%s p50 %.0f p99 %.0f", p.name, percentile(s, 50), percentile(s, 99)))
		}
		fmt.Printf("   run %d/%d (µs): %s\n", run, cfg.runs, strings.Join(parts, "; "))
	}
	e50.setRatio(paths[0].p50, paths[1].p50)
	e99.setRatio(paths[0].p99, paths[1].p99)
	x50.setRatio(paths[0].p50, paths[2].p50)
	x99.setRatio(paths[0].p99, paths[2].p99)
	return figs
}

// openEchoed opens count connections, conc at a time, to addrs in turn
// (connection i to addrs[(first+i) % len]), each proven alive by a 1-byte
// echo. After the first failure it starts no more. It returns the live
// connections and the first error.
func openEchoed(addrs []string, first, count, conc int, timeout time.Duration) ([]net.Conn, error) {
	var (
		mu       sync.Mutex
		out      []net.Conn
		firstErr error
		stop     atomic.Bool
		wg       sync.WaitGroup
	)
	sem := make(chan struct{}, conc)
	for i := 0; i < count && !stop.Load(); i++ {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			c, err := dialEcho(addrs[(first+i)%len(addrs)], timeout)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				if firstErr == nil {
					firstErr = fmt.Errorf("connection #%d: %w", first+i+1, err)
				}
				stop.Store(true)
				return
			}
			out = append(out, c)
		}()
	}
	wg.Wait()
	return out, firstErr
}

// echoAll echoes one more byte on every connection, conc at a time, and
// returns how many answered and the first error.
func echoAll(conns []net.Conn, conc int, timeout time.Duration) (int, error) {
	var (
		alive    atomic.Int64
		mu       sync.Mutex
		firstErr error
		wg       sync.WaitGroup
	)
	sem := make(chan struct{}, conc)
	for i, c := range conns {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := echoByte(c, 'v', timeout); err != nil {
				mu.Lock()
				if firstErr == nil {
					firstErr = fmt.Errorf("connection #%d: %w", i+1, err)
				}
				mu.Unlock()
				return
			}
			alive.Add(1)
		}()
	}
	wg.Wait()
	return int(alive.Load()), firstErr
}

func closeAll(conns []net.Conn) {
	for _, c := range conns {
		c.Close()
	}
}

// usage is the fd count and RSS of the relay and of the agents (summed).
type usage struct {
	relayFD, agentFD   int
	relayRSS, agentRSS int64 // KiB
}

func readUsage(relay *child.Proc, agents []*child.Proc) (usage, error) {
	var u usage
	var err error
	if u.relayFD, err = fdCount(relay.Pid()); err != nil {
		return u, err
	}
	if u.relayRSS, err = rssKiB(relay.Pid()); err != nil {
		return u, err
	}
	for _, a := range agents {
		fd, err := fdCount(a.Pid())
		if err != nil {
			return u, err
		}
		rss, err := rssKiB(a.Pid())
		if err != nil {
			return u, err
		}
		u.agentFD += fd
		u.agentRSS += rss
	}
	return u, nil
}

func (u usage) String() string {
	return fmt.Sprintf("relay %d fds, RSS %s; agent %d fds, RSS %s", u.relayFD, kib(u.relayRSS), u.agentFD, kib(u.agentRSS))
}

func kib(k int64) string {
	if k >= 10240 {
		return fmt.Sprintf("%.1f MiB", float64(k)/1024)
	}
	return fmt.Sprintf("%d KiB", k)
}

// settle polls the usage every 250ms until the fd counts are unchanged and
// each RSS moved by at most 1% (or 64 KiB) for 4 polls in a row, or until
// limit has passed. It reports whether the counts settled.
func settle(relay *child.Proc, agents []*child.Proc, limit time.Duration) (usage, bool, error) {
	prev, err := readUsage(relay, agents)
	if err != nil {
		return prev, false, err
	}
	near := func(a, b int64) bool {
		d := a - b
		if d < 0 {
			d = -d
		}
		return d <= 64 || float64(d) <= 0.01*float64(b)
	}
	stable := 0
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		time.Sleep(250 * time.Millisecond)
		cur, err := readUsage(relay, agents)
		if err != nil {
			return prev, false, err
		}
		if cur.relayFD == prev.relayFD && cur.agentFD == prev.agentFD && near(cur.relayRSS, prev.relayRSS) && near(cur.agentRSS, prev.agentRSS) {
			stable++
		} else {
			stable = 0
		}
		prev = cur
		if stable >= 4 {
			return cur, true, nil
		}
	}
	return prev, false, nil
}

// limitFlags let one tunnel hold every connection the bench opens.
var limitFlags = []string{"-max-conns-per-tunnel", "-1", "-max-pending-per-tunnel", "20000"}

// diagnose describes the state of the relay and the agents after a failure:
// fds against their limits, and their last warning.
func diagnose(relay *child.Proc, agents []*child.Proc) string {
	var parts []string
	for _, p := range append([]*child.Proc{relay}, agents...) {
		if p.Exited() {
			parts = append(parts, fmt.Sprintf("%s pid %d EXITED (%s): %s", p.Name, p.Pid(), p.Status(), clip(p.Stderr.String(), 300)))
			continue
		}
		fd, _ := fdCount(p.Pid())
		soft, _, _ := fdLimit(p.Pid())
		s := fmt.Sprintf("%s pid %d: %d fds open, limit %s", p.Name, p.Pid(), fd, soft)
		if l := lastLog(p, "level=WARN", "level=ERROR"); l != "" {
			s += "; last warning: " + l
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, "; ")
}

// benchIdle measures idle relayed connections twice: through ./expose,
// where the agent is nothing but relay machinery (the target it forwards
// to is a separate process, not counted), and through ./echoserver, where
// the agent is also the application and its own per-connection cost (a
// goroutine and its buffers, as in any Go server) counts too.
func benchIdle(cfg *config) []*Figure {
	_, echoPort, err := startDirectEcho(cfg)
	if err != nil {
		f := &Figure{Section: "idle", Name: "idle relayed conns"}
		failAll([]*Figure{f}, err)
		return []*Figure{f}
	}
	figs := idleRun(cfg, "./expose", cfg.exposeBin, child.Addr(echoPort))
	return append(figs, idleRun(cfg, "./echoserver", cfg.echoBin)...)
}

// idleRun opens cfg.idleConns idle connections through a relay and one
// agent (bin with extra arguments), and reports fds and RSS per connection.
func idleRun(cfg *config, agentName string, bin string, extra ...string) []*Figure {
	n := cfg.idleConns
	count := &Figure{Section: "idle", Name: "idle conns established, relay -> " + agentName, Unit: "conns",
		Target: ge(float64(n))}
	relayFD := &Figure{Section: "idle", Name: "relay fds per idle conn, relay -> " + agentName, DirectText: "n/a",
		Target: eq(2), Chart: "relay fds per idle conn, " + agentName}
	agentFD := &Figure{Section: "idle", Name: "agent (" + agentName + ") fds per idle conn", DirectText: "n/a"}
	rss := &Figure{Section: "idle", Name: "RSS relay+" + agentName + " per idle conn", ValueUnit: "KiB", DirectText: "n/a",
		Target: le(8), Chart: "RSS of relay + " + agentName + " per idle conn"}
	figs := []*Figure{count, relayFD, agentFD, rss}

	relay, err := startRelay(cfg, limitFlags...)
	if err != nil {
		failAll(figs, err)
		return figs
	}
	defer relay.Kill()
	agent, pub, err := startAgent(cfg, bin, relay.port, extra...)
	if err != nil {
		failAll(figs, err)
		return figs
	}
	defer agent.Kill()
	agents := []*child.Proc{agent}
	fmt.Printf("   relay (%s) and one %s %s, public port %d\n", strings.Join(limitFlags, " "), agentName, strings.Join(extra, " "), pub)
	fmt.Printf("   %s\n   %s\n", limitsLine(relay.Proc), limitsLine(agent))
	warm, err := openEchoed([]string{child.Addr(pub)}, 0, 20, 20, cfg.connTimeout)
	closeAll(warm)
	if err != nil {
		failAll(figs, fmt.Errorf("warm-up: %w", err))
		return figs
	}
	before, ok, err := settle(relay.Proc, agents, cfg.settle)
	if err != nil {
		failAll(figs, err)
		return figs
	}
	fmt.Printf("   before: %s (settled: %v)\n", before, ok)
	relayKinds0, err1 := fdKinds(relay.Pid())
	agentKinds0, err2 := fdKinds(agent.Pid())
	if err := errors.Join(err1, err2); err != nil {
		failAll(figs, err)
		return figs
	}

	var conns []net.Conn
	defer func() { closeAll(conns) }()
	var openErr error
	t0 := time.Now()
	for len(conns) < n {
		got, err := openEchoed([]string{child.Addr(pub)}, len(conns), min(500, n-len(conns)), 64, cfg.connTimeout)
		conns = append(conns, got...)
		if err != nil {
			openErr = err
			break
		}
	}
	fmt.Printf("   opened %d of %d connections in %v, each echoed 1 byte\n", len(conns), n, time.Since(t0).Round(time.Millisecond))
	if openErr != nil {
		diag := diagnose(relay.Proc, agents)
		fmt.Printf("   stopped at the first failure: %v\n   %s\n", openErr, diag)
		count.Detail = fmt.Sprintf("stopped after %d: %v; %s", len(conns), openErr, diag)
	}
	count.setValue([]float64{float64(len(conns))})
	count.RelayText = thousands(int64(len(conns))) + " of " + thousands(int64(n))
	if len(conns) == 0 {
		failAll(figs, fmt.Errorf("no connection established: %v", openErr))
		return figs
	}
	after, ok, err := settle(relay.Proc, agents, cfg.settle)
	if err != nil {
		failAll(figs, err)
		return figs
	}
	fmt.Printf("   after (idle): %s (settled: %v)\n", after, ok)
	relayKinds1, err1 := fdKinds(relay.Pid())
	agentKinds1, err2 := fdKinds(agent.Pid())
	if err := errors.Join(err1, err2); err != nil {
		failAll(figs, err)
		return figs
	}
	fmt.Printf("   fd changes: relay %s; agent %s\n", kindsDelta(relayKinds0, relayKinds1), kindsDelta(agentKinds0, agentKinds1))
	k := float64(len(conns))
	relayFD.setValue([]float64{float64(after.relayFD-before.relayFD) / k})
	relayFD.RelayText = fmt.Sprintf("%s -> %s fds", thousands(int64(before.relayFD)), thousands(int64(after.relayFD)))
	relayFD.Detail = fmt.Sprintf("over %d idle conns: %s (\"= 2\" is met within ±0.05/conn, so that a constant such as a pool of pipes does not count)",
		len(conns), kindsDelta(relayKinds0, relayKinds1))
	agentFD.setValue([]float64{float64(after.agentFD-before.agentFD) / k})
	agentFD.RelayText = fmt.Sprintf("%s -> %s fds", thousands(int64(before.agentFD)), thousands(int64(after.agentFD)))
	agentFD.Detail = fmt.Sprintf("over %d idle conns: %s", len(conns), kindsDelta(agentKinds0, agentKinds1))
	perConn := float64(after.relayRSS+after.agentRSS-before.relayRSS-before.agentRSS) / k
	rss.setValue([]float64{perConn})
	rss.RelayText = fmt.Sprintf("relay %.1f + agent %.1f KiB", float64(after.relayRSS-before.relayRSS)/k, float64(after.agentRSS-before.agentRSS)/k)
	rss.Detail = fmt.Sprintf("over %d idle conns: relay RSS %s -> %s, agent RSS %s -> %s", len(conns),
		kib(before.relayRSS), kib(after.relayRSS), kib(before.agentRSS), kib(after.agentRSS))
	if !ok {
		rss.Detail += fmt.Sprintf(" (counts still moving after %v)", cfg.settle)
	}
	return figs
}

func benchCapacity(cfg *config) []*Figure {
	f := &Figure{Section: "capacity", Name: "relayed conns one relay holds, all alive", Unit: "conns",
		DirectText: "n/a", Target: ge(9000), Chart: "relayed conns one relay holds (fd limit)"}
	figs := []*Figure{f}
	relay, err := startRelay(cfg, limitFlags...)
	if err != nil {
		failAll(figs, err)
		return figs
	}
	var agents []*child.Proc
	var addrs []string
	for range cfg.capAgents {
		a, pub, err := startAgent(cfg, cfg.echoBin, relay.port)
		if err != nil {
			failAll(figs, err)
			return figs
		}
		agents = append(agents, a)
		addrs = append(addrs, child.Addr(pub))
	}
	fmt.Printf("   relay (%s) and %d ./echoserver (connections spread over them, so that the relay's limit is reached first); up to %d connections in batches of %d\n",
		strings.Join(limitFlags, " "), cfg.capAgents, cfg.capMax, cfg.capBatch)
	for _, p := range append([]*child.Proc{relay.Proc}, agents...) {
		fmt.Printf("   %s\n", limitsLine(p))
	}
	var conns []net.Conn
	defer func() { closeAll(conns) }()
	var openErr error
	t0 := time.Now()
	next := 1000
	for len(conns) < cfg.capMax {
		got, err := openEchoed(addrs, len(conns), min(cfg.capBatch, cfg.capMax-len(conns)), 64, cfg.connTimeout)
		conns = append(conns, got...)
		if len(conns) >= next || err != nil || len(conns) >= cfg.capMax {
			u, _ := readUsage(relay.Proc, agents)
			fmt.Printf("   %5d conns after %5.1fs: %s\n", len(conns), time.Since(t0).Seconds(), u)
			for next <= len(conns) {
				next += 1000
			}
		}
		if err != nil {
			openErr = err
			break
		}
	}
	opened := len(conns)
	var details []string
	if openErr != nil {
		diag := diagnose(relay.Proc, agents)
		fmt.Printf("   stopped at the first failure: %v\n   %s\n", openErr, diag)
		details = append(details, fmt.Sprintf("stopped at %d: %v; %s", opened, openErr, diag))
	}
	alive, verr := echoAll(conns, 64, 2*cfg.connTimeout)
	fmt.Printf("   verified: %d of %d still echo\n", alive, opened)
	if verr != nil {
		details = append(details, fmt.Sprintf("verification: %d of %d dead, first: %v", opened-alive, opened, verr))
	}
	f.setValue([]float64{float64(alive)})
	f.RelayText = fmt.Sprintf("%s opened, %s alive", thousands(int64(opened)), thousands(int64(alive)))
	if alive != opened {
		m := false
		f.Met = &m
	}
	if opened >= cfg.capMax {
		details = append(details, fmt.Sprintf("reached the bench's cap of %d (the bench itself holds one fd per connection)", cfg.capMax))
	}
	f.Detail = strings.Join(details, "; ")
	return figs
}
