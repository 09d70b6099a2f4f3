//go:build linux

package main

// iperf3 (and the CPU it costs) and redis-benchmark, direct and through
// ./expose.

import (
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"tcprelay/internal/child"
)

// iperfServer is one iperf3 -s on 127.0.0.1. It takes one test at a
// time.
type iperfServer struct {
	bin   string
	proc  *child.Proc
	port  int
	tests int // started so far
}

func iperfListening(port int) string { return fmt.Sprintf("Server listening on %d", port) }

// startIperf starts iperf3 -s on a free port. Its error wraps errSkipped
// if iperf3 is not in PATH.
func startIperf() (*iperfServer, error) {
	bin, err := exec.LookPath("iperf3")
	if err != nil {
		return nil, fmt.Errorf("%w: iperf3 not in PATH (Debian package iperf3)", errSkipped)
	}
	s := &iperfServer{bin: bin}
	s.proc, s.port, err = serve("iperf3 -s", bin, func(port int) []string {
		return []string{"-s", "-p", strconv.Itoa(port), "-B", "127.0.0.1", "--forceflush"}
	}, func(p *child.Proc, port int) bool { return strings.Contains(p.Out(), iperfListening(port)) })
	return s, err
}

// test runs one iperf3 client against 127.0.0.1:to (the server, or a path
// to it) for d with streams streams, and returns its Gbit/s, the GB
// received, and what ps spent meanwhile (sub of two snapshots).
func (s *iperfServer) test(to int, d time.Duration, streams int, ps ...*child.Proc) (gbps, gb float64, spent []map[string]float64, err error) {
	s.tests++
	want := s.tests // wait until it listens again after the test before
	if !child.WaitFor(20*time.Second, func() bool { return strings.Count(s.proc.Out(), iperfListening(s.port)) >= want }) {
		return 0, 0, nil, fmt.Errorf("iperf3 -s not ready for test %d within 20s: %s", want, clip(s.proc.Stderr.String(), 500))
	}
	before, err1 := snapshot(ps...)
	out, err := runClient("iperf3 -c", s.bin, []string{"-c", "127.0.0.1", "-p", strconv.Itoa(to), "-J",
		"-t", strconv.Itoa(max(1, int(math.Round(d.Seconds())))), "-P", strconv.Itoa(streams)}, d+60*time.Second)
	after, err2 := snapshot(ps...)
	var res child.IperfResult
	if err = errors.Join(err, err1, err2); err == nil {
		err = json.Unmarshal(out, &res)
	}
	if err == nil && (res.Error != "" || res.End.SumReceived.Bytes <= 0) {
		err = fmt.Errorf("iperf3: error %q, %d bytes received", res.Error, res.End.SumReceived.Bytes)
	}
	if err != nil {
		return 0, 0, nil, err
	}
	return res.End.SumReceived.BitsPerSecond / 1e9, float64(res.End.SumReceived.Bytes) / 1e9, sub(after, before), nil
}

func benchIperf() ([]*row, error) {
	one := &row{Section: "iperf", Name: "iperf3, 1 stream", Unit: "Gbit/s"}
	multi := &row{Section: "iperf", Name: fmt.Sprintf("iperf3, %d streams", *iperfStreams), Unit: "Gbit/s"}
	cpuSrv := &row{Section: "cpu", Name: "CPU of iperf3 -s (receiver), 1 stream", Unit: "s/GB"}
	cpuRelay := &row{Section: "cpu", Name: "CPU of relay, 1 stream", Unit: "s/GB"}
	cpuExpose := &row{Section: "cpu", Name: "CPU of expose, 1 stream", Unit: "s/GB"}
	cpuBoth := &row{Section: "cpu", Name: "CPU of relay+expose, 1 stream", Unit: "s/GB"}
	rows := []*row{one, multi, cpuSrv, cpuRelay, cpuExpose, cpuBoth}
	srv, err := startIperf()
	if err != nil {
		return rows, err
	}
	relay, agents, pub, err := startRelay(nil, []string{exposeBin, child.Addr(srv.port)})
	if err != nil {
		return rows, err
	}
	ps := []*child.Proc{srv.proc, relay, agents[0]}
	ports := []int{srv.port, pub[0]}
	return rows, eachRun([]string{"direct", "relay"}, func(i int) (string, error) {
		to, direct := ports[i], i == 0
		gbps, gb, spent, err := srv.test(to, *iperf1Time, 1, ps...)
		if err != nil {
			return "", fmt.Errorf("1 stream: %w", err)
		}
		one.add(direct, gbps)
		cpuSrv.add(direct, spent[0]["cpu"]/gb)
		cpu := ""
		if !direct {
			r, x := spent[1], spent[2]
			cpuRelay.add(false, r["cpu"]/gb)
			cpuExpose.add(false, x["cpu"]/gb)
			cpuBoth.add(false, (r["cpu"]+x["cpu"])/gb)
			cpu = fmt.Sprintf(" (relay+expose: %.2f s CPU, %.2f s of it user, for %.2f GB)", r["cpu"]+x["cpu"], r["user"]+x["user"], gb)
		}
		gbpsN, _, _, err := srv.test(to, *iperfNTime, *iperfStreams)
		if err != nil {
			return "", fmt.Errorf("%d streams: %w", *iperfStreams, err)
		}
		multi.add(direct, gbpsN)
		return fmt.Sprintf("%.1f / %.1f Gbit/s (1 / %d streams)%s", gbps, gbpsN, *iperfStreams, cpu), nil
	})
}

// startRedis starts redis-server on a free port, saving nothing (dir: its
// working directory). Its error wraps errSkipped if redis-server or
// redis-benchmark is not in PATH.
func startRedis(dir string) (int, error) {
	server, err1 := exec.LookPath("redis-server")
	_, err2 := exec.LookPath("redis-benchmark")
	if errors.Join(err1, err2) != nil {
		return 0, fmt.Errorf("%w: redis-server or redis-benchmark not in PATH (Debian packages redis-server, redis-tools)", errSkipped)
	}
	_, port, err := serve("redis-server", server, func(port int) []string {
		return []string{"--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir}
	}, nil)
	return port, err
}

// redisBench runs redis-benchmark's tests (-t: "set,get", "ping") against
// 127.0.0.1:port with -redis-clients connections and -redis-requests
// requests per test, and returns each test's req/s by its name in the CSV
// ("SET", "PING_INLINE"). A test it did not answer for is an error.
func redisBench(port int, tests ...string) (map[string]float64, error) {
	bin, err := exec.LookPath("redis-benchmark")
	if err != nil {
		return nil, err
	}
	out, err := runClient("redis-benchmark", bin, []string{"-h", "127.0.0.1", "-p", strconv.Itoa(port),
		"-c", strconv.Itoa(*redisClients), "-n", strconv.Itoa(*redisN), "-t", strings.Join(tests, ","), "-P", "1", "--csv"}, 300*time.Second)
	if err != nil {
		return nil, err
	}
	recs, _ := csv.NewReader(strings.NewReader(string(out))).ReadAll()
	rps := map[string]float64{}
	for _, rec := range recs {
		if len(rec) >= 2 {
			rps[rec[0]], _ = strconv.ParseFloat(rec[1], 64)
		}
	}
	for _, t := range tests {
		names := []string{strings.ToUpper(t)}
		if t == "ping" { // two tests: PING inline, and as a RESP array
			names = []string{"PING_INLINE", "PING_MBULK"}
		}
		for _, name := range names {
			if rps[name] <= 0 {
				return nil, fmt.Errorf("no %s rate in redis-benchmark's CSV: %s", name, clip(string(out), 500))
			}
		}
	}
	return rps, nil
}

func benchRedis() ([]*row, error) {
	set := &row{Section: "redis", Name: fmt.Sprintf("redis-benchmark SET, %d clients", *redisClients), Unit: "req/s"}
	get := &row{Section: "redis", Name: fmt.Sprintf("redis-benchmark GET, %d clients", *redisClients), Unit: "req/s"}
	rows := []*row{set, get}
	dir, err := os.MkdirTemp("", "tcprelay-bench-redis-")
	if err != nil {
		return rows, err
	}
	defer os.RemoveAll(dir)
	port, err := startRedis(dir)
	if err != nil {
		return rows, err
	}
	_, _, pub, err := startRelay(nil, []string{exposeBin, child.Addr(port)})
	if err != nil {
		return rows, err
	}
	ports := []int{port, pub[0]}
	return rows, eachRun([]string{"direct", "relay"}, func(i int) (string, error) {
		rps, err := redisBench(ports[i], "set", "get")
		if err != nil {
			return "", err
		}
		set.add(i == 0, rps["SET"])
		get.add(i == 0, rps["GET"])
		return fmt.Sprintf("SET %.0f, GET %.0f req/s", rps["SET"], rps["GET"]), nil
	})
}
