//go:build linux

package main

// Connection figures: set-up latency, the cost of idle relayed
// connections, and how many one relay holds.

import (
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"tcprelay/internal/child"
)

// runEchoServer is the direct echo server (-serve-echo PORT): a plain Go
// TCP echo server on 127.0.0.1, in its own process like ./echoserver.
func runEchoServer(port int) {
	ln, err := net.Listen("tcp", child.Addr(port))
	for err == nil {
		var c net.Conn
		if c, err = ln.Accept(); err == nil {
			go func() { // echo, half-closing after the client does, like ./echoserver
				defer c.Close()
				if _, err := io.Copy(c, c); err == nil {
					c.(*net.TCPConn).CloseWrite()
				}
			}()
		}
	}
	fmt.Fprintln(os.Stderr, "echo server:", err)
	os.Exit(1)
}

// startDirectEcho runs this program with -serve-echo and returns its port.
func startDirectEcho() (int, error) {
	self, _ := os.Executable()
	_, port, err := serve("direct echo server", self, func(port int) []string { return []string{"-serve-echo", strconv.Itoa(port)} }, nil)
	return port, err
}

// dialEcho connects to addr and echoes one byte, and returns the open
// connection (closed on an error).
func dialEcho(addr string) (net.Conn, error) {
	c, err := net.DialTimeout("tcp", addr, *connTimeout)
	if err == nil {
		if err = echoByte(c, 'e'); err != nil {
			c.Close()
		}
	}
	return c, err
}

// echoByte writes b and reads it back, within -conn-timeout.
func echoByte(c net.Conn, b byte) error {
	c.SetDeadline(time.Now().Add(*connTimeout))
	got := []byte{b}
	if _, err := c.Write(got); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if _, err := io.ReadFull(c, got); err != nil || got[0] != b {
		return fmt.Errorf("read the echo of %q: %q, %v", b, got, err)
	}
	return c.SetDeadline(time.Time{})
}

// latencyWarmup is how many untimed new connections come before the
// timed ones.
const latencyWarmup = 20

// latency times -latency-n sequential new connections to addr, each until
// its first 1-byte echo is back, after latencyWarmup untimed ones, and
// returns the p50 and p99 (nearest rank) in µs.
func latency(addr string) (p50, p99 float64, err error) {
	var us []float64
	for i := range *latencyN + latencyWarmup {
		t0 := time.Now()
		c, err := dialEcho(addr)
		if err != nil {
			return 0, 0, fmt.Errorf("connection %d: %w", i+1, err)
		}
		if i >= latencyWarmup {
			us = append(us, float64(time.Since(t0).Nanoseconds())/1e3)
		}
		c.Close()
	}
	slices.Sort(us)
	rank := func(p float64) float64 { return us[int(math.Ceil(p/100*float64(len(us))))-1] }
	return rank(50), rank(99), nil
}

func benchLatency() ([]*row, error) {
	paths := []string{"direct", "relay -> ./echoserver", "relay -> ./expose -> echo"}
	var rows []*row // p50 and p99 of each relayed path
	for _, path := range paths[1:] {
		for _, p := range []string{"p50", "p99"} {
			rows = append(rows, &row{Section: "latency", Name: "new conn + 1-byte echo " + p + ", " + path, Unit: "µs"})
		}
	}
	echo, err := startDirectEcho()
	if err != nil {
		return rows, err
	}
	_, _, pub, err := startRelay(nil, []string{echoBin}, []string{exposeBin, child.Addr(echo)})
	if err != nil {
		return rows, err
	}
	fmt.Printf("   %d sequential dial + 1-byte echo + close per path and run, timed\n", *latencyN)
	ports := []int{echo, pub[0], pub[1]}
	return rows, eachRun(paths, func(i int) (string, error) {
		p50, p99, err := latency(child.Addr(ports[i]))
		for j := 1; j < len(paths) && err == nil; j++ {
			if i == 0 || i == j { // direct is the baseline of every relayed path
				rows[2*j-2].add(i == 0, p50)
				rows[2*j-1].add(i == 0, p99)
			}
		}
		return fmt.Sprintf("p50 %.0f, p99 %.0f µs", p50, p99), err
	})
}

// parallelConns is how many connections parallel opens at a time.
const parallelConns = 64

// parallel runs f(0), ..., f(n-1), parallelConns at a time. After the
// first error it starts no more, and returns that error.
func parallel(n int, f func(i int) error) error {
	var first atomic.Pointer[error]
	var wg sync.WaitGroup
	sem := make(chan struct{}, parallelConns)
	for i := 0; i < n && first.Load() == nil; i++ {
		sem <- struct{}{}
		wg.Go(func() {
			if err := f(i); err != nil {
				first.CompareAndSwap(nil, &err)
			}
			<-sem
		})
	}
	wg.Wait()
	if err := first.Load(); err != nil {
		return *err
	}
	return nil
}

// openEchoed opens count more connections to addrs in turn, each proven
// alive by a 1-byte echo, and adds them to *conns. It stops at the first
// failure, and returns it.
func openEchoed(conns *[]net.Conn, addrs []string, count int) error {
	var mu sync.Mutex
	base := len(*conns)
	return parallel(count, func(i int) error {
		c, err := dialEcho(addrs[(base+i)%len(addrs)])
		if err != nil {
			return fmt.Errorf("connection %d: %w", base+i+1, err)
		}
		mu.Lock()
		*conns = append(*conns, c)
		mu.Unlock()
		return nil
	})
}

func closeAll(conns []net.Conn) {
	for _, c := range conns {
		c.Close()
	}
}

// settle measures ps every 250ms until the fd counts are unchanged and
// each RSS moved by at most 1% (or 64 KiB) for 4 polls in a row, or until
// -settle-timeout has passed, and returns the last measurement.
func settle(ps ...*child.Proc) ([]map[string]float64, error) {
	prev, err := snapshot(ps...)
	stable := 0
	for deadline := time.Now().Add(*settleTime); err == nil && stable < 4 && time.Now().Before(deadline); {
		time.Sleep(250 * time.Millisecond)
		var cur []map[string]float64
		if cur, err = snapshot(ps...); err != nil {
			break
		}
		stable++
		for i := range cur {
			if cur[i]["fds"] != prev[i]["fds"] || math.Abs(cur[i]["rss"]-prev[i]["rss"]) > max(64, prev[i]["rss"]/100) {
				stable = 0
			}
		}
		prev = cur
	}
	if err == nil && stable < 4 {
		fmt.Printf("   (fd and RSS counts still moving after %v)\n", *settleTime)
	}
	return prev, err
}

// benchIdle measures idle relayed connections twice: through ./expose,
// where the agent is nothing but relay machinery (the echo server it
// forwards to is a separate process, not counted), and through
// ./echoserver, where the agent is also the application and its own
// per-connection cost (a goroutine, as in any Go server) counts too.
func benchIdle() ([]*row, error) {
	echoPort, err := startDirectEcho()
	if err != nil {
		return nil, err
	}
	rows, err1 := idleRun("expose", exposeBin, child.Addr(echoPort))
	more, err2 := idleRun("echoserver", echoBin)
	return append(rows, more...), errors.Join(err1, err2)
}

// idleRun opens -idle-conns idle connections through a relay and one agent
// (spec: its binary and extra arguments), and measures fds and RSS per
// connection.
func idleRun(name string, spec ...string) ([]*row, error) {
	r := func(what, unit string) *row {
		return &row{Section: "idle", Name: what + " per idle conn, via ./" + name, Unit: unit}
	}
	relayFD, agentFD := r("relay fds", "fds"), r(name+" fds", "fds")
	relayRSS, agentRSS, bothRSS := r("relay RSS", "KiB"), r(name+" RSS", "KiB"), r("relay+"+name+" RSS", "KiB")
	rows := []*row{relayFD, agentFD, relayRSS, agentRSS, bothRSS}
	relay, agents, pub, err := startRelay(limitFlags, spec)
	if err != nil {
		return rows, err
	}
	ps := []*child.Proc{relay, agents[0]}
	defer func() { relay.Kill(); agents[0].Kill() }()
	var warm, conns []net.Conn
	err = openEchoed(&warm, []string{child.Addr(pub[0])}, 20)
	closeAll(warm)
	if err != nil {
		return rows, fmt.Errorf("warm-up: %w", err)
	}
	before, err := settle(ps...)
	if err != nil {
		return rows, err
	}
	openErr := openEchoed(&conns, []string{child.Addr(pub[0])}, *idleConns)
	defer closeAll(conns)
	if openErr != nil {
		openErr = fmt.Errorf("via ./%s, opened %d of %d idle conns: %w; %s", name, len(conns), *idleConns, openErr, diagnose(ps...))
		if len(conns) == 0 {
			return rows, openErr
		}
	}
	after, err := settle(ps...)
	if err != nil {
		return rows, errors.Join(openErr, err)
	}
	d, n := sub(after, before), float64(len(conns))
	relayFD.add(false, d[0]["fds"]/n)
	agentFD.add(false, d[1]["fds"]/n)
	relayRSS.add(false, d[0]["rss"]/n)
	agentRSS.add(false, d[1]["rss"]/n)
	bothRSS.add(false, (d[0]["rss"]+d[1]["rss"])/n)
	for i, p := range ps {
		s := fmt.Sprintf("   via ./%s, %d idle conns: %s %.0f -> %.0f fds (limit %.0f), RSS %.0f -> %.0f KiB;", name, len(conns), p.Name,
			before[i]["fds"], after[i]["fds"], after[i]["limit"], before[i]["rss"], after[i]["rss"])
		for _, k := range []string{"socket", "pipe", "anon_inode", "file"} {
			s += fmt.Sprintf(" %+.0f %ss", d[i][k], k)
		}
		fmt.Println(s)
	}
	return rows, openErr
}

func benchCapacity() ([]*row, error) {
	held := &row{Section: "capacity", Name: "relayed conns one relay holds, all echoing", Unit: "conns"}
	relay, agents, pub, err := startRelay(limitFlags, slices.Repeat([][]string{{echoBin}}, *capAgents)...)
	if err != nil {
		return []*row{held}, err
	}
	var addrs []string
	for _, p := range pub {
		addrs = append(addrs, child.Addr(p))
	}
	fmt.Printf("   %d ./echoserver behind one relay (%s), up to %d conns\n", *capAgents, strings.Join(limitFlags, " "), *capMax)
	var conns []net.Conn
	t0 := time.Now()
	openErr := openEchoed(&conns, addrs, *capMax)
	defer closeAll(conns)
	if u, err := snapshot(relay); err == nil {
		fmt.Printf("   %d conns opened in %.1fs: relay %.0f fds, RSS %.0f KiB\n", len(conns), time.Since(t0).Seconds(), u[0]["fds"], u[0]["rss"])
		held.Name = fmt.Sprintf("relayed conns one relay holds under a %.0f-fd limit, all echoing", u[0]["limit"])
	}
	if openErr != nil {
		fmt.Printf("   stopped at the first failure: %v; %s\n", openErr, diagnose(append(agents, relay)...))
	}
	var alive atomic.Int64 // each connection echoes once more: held means still relayed
	parallel(len(conns), func(i int) error {
		if echoByte(conns[i], 'v') == nil {
			alive.Add(1)
		}
		return nil
	})
	fmt.Printf("   %d of them still echo\n", alive.Load())
	held.add(false, float64(alive.Load()))
	return []*row{held}, nil
}
