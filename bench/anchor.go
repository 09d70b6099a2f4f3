//go:build linux

package main

// The anchor table: our relay path, plain and with TLS between agent and
// relay, against haproxy as a one-hop TCP proxy, in one run. Every path
// leads to the same targets: the bench's echo server, iperf3 -s and
// redis-server.
//
//	ours plain  client -> relay public port -> ./expose -> target
//	ours TLS    the same, agent <-> relay over TLS
//	haproxy     client -> haproxy (mode tcp) -> target
//	ours library  client -> relay public port -> ./echoserver (the library
//	            in a Go server: the connection figures only)
//	direct      client -> target (iperf3 and redis only)
//
// Per-connection figures (idle memory, CPU per new connection, latency,
// opening many connections) are ours against haproxy: haproxy's value is
// the "direct" column of those rows. Throughput figures (iperf3,
// redis-benchmark) are each path against the direct connection. Every
// path's processes are started afresh in each run, so that no run inherits
// the memory or the caches of another; the targets stay.

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"tcprelay/internal/child"
)

// anchorFront is what one path puts in front of the targets: the port a
// client dials for each (0: the target is missing), the processes whose
// CPU and memory the path costs, and every process it started.
type anchorFront struct {
	echo, iperf, redis int
	measured, all      []*child.Proc
}

func (f *anchorFront) stop() {
	for _, p := range f.all {
		p.Kill()
	}
}

func benchAnchor() ([]*row, error) {
	dir, cert, key, err := tempSelfSigned("tcprelay-bench-anchor-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)

	// The targets, and what is missing here.
	var skipped []error
	echo, err := startDirectEcho()
	if err != nil {
		return nil, err
	}
	iperf, err := startIperf()
	if errors.Is(err, errSkipped) {
		skipped, iperf = append(skipped, fmt.Errorf("%w: no iperf3 rows", err)), nil
	} else if err != nil {
		return nil, err
	}
	redis, err := startRedis(dir)
	if errors.Is(err, errSkipped) {
		skipped = append(skipped, fmt.Errorf("%w: no redis rows", err))
	} else if err != nil {
		return nil, err
	}
	targets := []int{echo, 0, redis} // echo first: haproxy's readiness is its echo port's
	if iperf != nil {
		targets[1] = iperf.port
	}
	paths := []string{"direct", "ours plain", "ours TLS", "haproxy", "ours library"}
	haproxy, err := exec.LookPath("haproxy")
	if err != nil {
		skipped = append(skipped, fmt.Errorf("%w: haproxy not in PATH (Debian package haproxy): no haproxy column", errSkipped))
		paths = slices.Delete(paths, 3, 4)
	} else if v, err := exec.Command(haproxy, "-v").Output(); err == nil {
		fmt.Printf("   %s; nbthread: its default (one per CPU: %d, as Go's GOMAXPROCS in relay and expose)\n",
			strings.TrimSpace(strings.SplitN(string(v), "\n", 2)[0]), runtime.NumCPU())
	}

	// Rows: per-connection figures for ours plain and ours TLS, and the
	// connection figures of ours library, haproxy their baseline;
	// throughput figures for every path but direct and ours library,
	// direct their baseline (path 0).
	hap := slices.Index(paths, "haproxy") // -1: none
	var rows []*row
	figure := func(name, unit string, of []string) []*row {
		var rs []*row
		for _, p := range of {
			rs = append(rs, &row{Section: "anchor", Name: p + ": " + name, Unit: unit})
		}
		rows = append(rows, rs...)
		return rs
	}
	ours := paths[1:3]
	rss := figure("RSS per idle conn, relay+expose (direct: haproxy's)", "KiB", ours)
	cpu := figure("CPU per new conn, relay+expose (direct: haproxy's)", "µs", ours)
	p50 := figure("new conn + 1-byte echo p50 (direct: haproxy)", "µs", ours)
	open := figure(fmt.Sprintf("open %d conns, %d at a time, each echoed (direct: haproxy)", *idleConns, parallelConns), "s", ours)
	lib := []string{"ours library"}
	libCPU := figure("CPU per new conn, relay+echoserver (direct: haproxy's)", "µs", lib)
	libP50 := figure("new conn + 1-byte echo p50, relay+echoserver (direct: haproxy)", "µs", lib)
	var gbps, rps []*row
	through := slices.DeleteFunc(slices.Clone(paths[1:]), func(p string) bool { return p == "ours library" })
	if iperf != nil {
		gbps = figure("iperf3, 1 stream", "Gbit/s", through)
	}
	if redis != 0 {
		rps = figure(fmt.Sprintf("redis-benchmark -t ping (inline and mbulk), %d clients", *redisClients), "req/s", through)
	}
	add := func(rs []*row, baseline, i int, v float64) { // path i's value; the baseline's goes to every row
		if i == baseline {
			for _, r := range rs {
				r.add(true, v)
			}
		} else {
			rs[i-1].add(false, v)
		}
	}

	plan := fmt.Sprintf("%d sequential new connections (CPU over them and %d untimed), %d idle connections", *latencyN, latencyWarmup, *idleConns)
	if iperf != nil {
		plan += fmt.Sprintf(", iperf3 %v 1 stream", *iperf1Time)
	}
	if redis != 0 {
		plan += fmt.Sprintf(", redis-benchmark -t ping -n %d", *redisN)
	}
	fmt.Printf("   per path and run: %s\n", plan)
	err = eachRun(paths, func(i int) (string, error) {
		var f *anchorFront
		var err error
		switch paths[i] {
		case "direct":
			f = &anchorFront{echo: targets[0], iperf: targets[1], redis: targets[2]}
		case "ours plain":
			f, err = startOurs(nil, nil, targets)
		case "ours TLS":
			f, err = startOurs([]string{"-tls-cert", cert, "-tls-key", key}, []string{"-tls-ca", cert}, targets)
		case "haproxy":
			f, err = startHAProxy(haproxy, dir, targets)
		case "ours library":
			f, err = startLibrary()
		}
		if err != nil {
			return "", err
		}
		defer f.stop()
		var line []string

		if i != 0 { // per-connection figures
			before, err := snapshot(f.measured...)
			if err != nil {
				return "", err
			}
			l50, _, err := latency(child.Addr(f.echo))
			if err != nil {
				return "", err
			}
			after, err := snapshot(f.measured...)
			if err != nil {
				return "", err
			}
			perConn := total(sub(after, before), "cpu") / float64(*latencyN+latencyWarmup) * 1e6
			if paths[i] == "ours library" {
				libP50[0].add(false, l50)
				libCPU[0].add(false, perConn)
				return fmt.Sprintf("p50 %.0f µs, %.0f µs CPU/conn", l50, perConn), nil
			}
			if i == hap {
				libP50[0].add(true, l50)
				libCPU[0].add(true, perConn)
			}
			add(p50, hap, i, l50)
			add(cpu, hap, i, perConn)

			if before, err = settle(f.measured...); err != nil {
				return "", err
			}
			var conns []net.Conn
			t0 := time.Now()
			err = openEchoed(&conns, []string{child.Addr(f.echo)}, *idleConns)
			took := time.Since(t0).Seconds()
			if err != nil {
				closeAll(conns)
				return "", fmt.Errorf("opened %d of %d conns: %w; %s", len(conns), *idleConns, err, diagnose(f.measured...))
			}
			after, err = settle(f.measured...)
			var cut atomic.Int64 // each echoes once more: no timeout cut them while measured
			parallel(len(conns), func(k int) error {
				if echoByte(conns[k], 'i') != nil {
					cut.Add(1)
				}
				return nil
			})
			closeAll(conns)
			if err == nil && cut.Load() > 0 {
				err = fmt.Errorf("%d of %d idle conns no longer echo", cut.Load(), len(conns))
			}
			if err != nil {
				return "", err
			}
			perIdle := total(sub(after, before), "rss") / float64(len(conns))
			add(open, hap, i, took)
			add(rss, hap, i, perIdle)
			line = append(line, fmt.Sprintf("p50 %.0f µs, %.0f µs CPU/conn, %d open in %.2f s, %.2f KiB/idle conn (RSS %.1f -> %.1f MiB)",
				l50, perConn, len(conns), took, perIdle, total(before, "rss")/1024, total(after, "rss")/1024))
			if _, err := settle(f.measured...); err != nil { // the closes done before the throughput tests
				return "", err
			}
		}

		if iperf != nil {
			rate, _, _, err := iperf.test(f.iperf, *iperf1Time, 1)
			if err != nil {
				return "", fmt.Errorf("iperf3: %w", err)
			}
			add(gbps, 0, i, rate)
			line = append(line, fmt.Sprintf("%.1f Gbit/s", rate))
		}
		if redis != 0 {
			r, err := redisBench(f.redis, "ping")
			if err != nil {
				return "", err
			}
			in, mb := r["PING_INLINE"], r["PING_MBULK"]
			both := 2 / (1/in + 1/mb) // both tests' requests over both tests' time
			add(rps, 0, i, both)
			line = append(line, fmt.Sprintf("PING %.0f req/s (inline %.0f, mbulk %.0f)", both, in, mb))
		}
		return strings.Join(line, ", "), nil
	})
	return rows, errors.Join(append([]error{err}, skipped...)...)
}

// total sums key over the processes of a snapshot (or of its sub).
func total(m []map[string]float64, key string) float64 {
	t := 0.0
	for _, p := range m {
		t += p[key]
	}
	return t
}

// startOurs starts a relay (limitFlags and relayFlags) and one ./expose
// (agentFlags) for each target; measured are the relay and the echo
// target's agent.
func startOurs(relayFlags, agentFlags []string, targets []int) (*anchorFront, error) {
	var specs [][]string
	for _, t := range targets {
		if t != 0 {
			specs = append(specs, slices.Concat([]string{exposeBin}, agentFlags, []string{"127.0.0.1", "{RELAYPORT}", child.Addr(t)}))
		}
	}
	relay, agents, pub, err := startRelayURL(slices.Concat(limitFlags, relayFlags), specs...)
	f := &anchorFront{}
	for _, p := range append(agents, relay) {
		if p != nil {
			f.all = append(f.all, p)
		}
	}
	if err != nil {
		f.stop()
		return nil, err
	}
	f.measured = []*child.Proc{relay, agents[0]}
	for i, port := range []*int{&f.echo, &f.iperf, &f.redis} {
		if targets[i] != 0 {
			*port, pub = pub[0], pub[1:]
		}
	}
	return f, nil
}

// startLibrary starts a relay and one ./echoserver; both are measured.
func startLibrary() (*anchorFront, error) {
	relay, agents, pub, err := startRelay(limitFlags, []string{echoBin})
	f := &anchorFront{all: slices.DeleteFunc(append(agents, relay), func(p *child.Proc) bool { return p == nil })}
	if err != nil {
		f.stop()
		return nil, err
	}
	f.measured, f.echo = f.all, pub[0]
	return f, nil
}

// startHAProxy starts haproxy in the foreground with one TCP listener on a
// free port for each target: no logging, maxconn for -idle-conns and more,
// and client and server timeouts far longer than the idle measurement.
// Its fds (2 a connection) must fit under the limit it inherits.
func startHAProxy(bin, dir string, targets []int) (*anchorFront, error) {
	conf := filepath.Join(dir, "haproxy.cfg")
	var ports []int
	p, _, err := serve("haproxy", bin, func(port int) []string {
		ports = []int{port}
		cfg := fmt.Sprintf("global\n    maxconn %[1]d\n\ndefaults\n    mode tcp\n    maxconn %[1]d\n"+
			"    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n", *idleConns+1000)
		for i, t := range targets {
			if i > 0 {
				free, err := child.FreePort()
				if err != nil {
					free = 1 // haproxy will fail to bind, and say so
				}
				ports = append(ports, free)
			}
			if t != 0 {
				cfg += fmt.Sprintf("\nlisten t%d\n    bind %s\n    server t%d %s\n", i, child.Addr(ports[i]), i, child.Addr(t))
			}
		}
		os.WriteFile(conf, []byte(cfg), 0o600)
		return []string{"-db", "-f", conf}
	}, nil)
	if err != nil {
		return nil, err
	}
	f := &anchorFront{measured: []*child.Proc{p}, all: []*child.Proc{p}}
	for i, port := range []*int{&f.echo, &f.iperf, &f.redis} {
		if targets[i] != 0 {
			*port = ports[i]
		}
	}
	return f, nil
}
