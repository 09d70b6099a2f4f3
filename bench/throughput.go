package main

// iperf3 and redis-benchmark, direct and through ./expose.

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

func seconds(d time.Duration) int { return max(1, int(math.Round(d.Seconds()))) }

func benchIperf(cfg *config) []*Figure {
	one := &Figure{Section: "iperf3", Name: "iperf3 throughput, 1 stream", Unit: "Gbit/s",
		Target: ge(0.45), Chart: "iperf3, 1 stream: relay/direct"}
	multi := &Figure{Section: "iperf3", Name: fmt.Sprintf("iperf3 throughput, %d streams", cfg.iperfStreams), Unit: "Gbit/s",
		Target: ge(0.55), Chart: fmt.Sprintf("iperf3, %d streams: relay/direct", cfg.iperfStreams)}
	cpu := &Figure{Section: "iperf3", Name: "CPU relay+agent per GB, 1 stream", ValueUnit: "s/GB",
		DirectText: "n/a", Target: le(0.4), Chart: "CPU of relay + expose per GB"}
	figs := []*Figure{one, multi, cpu}

	bin, err := exec.LookPath("iperf3")
	if err != nil {
		msg := "iperf3 not found in PATH (install Debian package iperf3): figures skipped"
		fmt.Println("   " + msg)
		skipAll(figs, msg)
		return figs
	}
	listening := func(port int) string { return fmt.Sprintf("Server listening on %d", port) }
	srv, port, err := startService("iperf3 -s", bin, func(port int) []string {
		return []string{"-s", "-p", strconv.Itoa(port), "-B", "127.0.0.1", "--forceflush"}
	}, func(p *child.Proc, port int) bool { return strings.Count(p.Out(), listening(port)) >= 1 })
	if err != nil {
		failAll(figs, err)
		return figs
	}
	relay, ex, pub, err := startExposed(cfg, port)
	if err != nil {
		failAll(figs, err)
		return figs
	}
	fmt.Printf("   iperf3 -s on port %d; relay control port %d; ./expose announced public port %d -> %d\n", port, relay.port, pub, port)

	tests := 0
	client := func(p int, d time.Duration, streams int) (child.IperfResult, error) {
		var res child.IperfResult
		tests++
		want := tests
		// One test at a time: iperf3 -s refuses a client while busy.
		if !child.WaitFor(20*time.Second, func() bool { return strings.Count(srv.Out(), listening(port)) >= want }) {
			return res, fmt.Errorf("iperf3 -s not ready for test #%d within 20s: %s", want, clip(srv.Stderr.String(), 500))
		}
		args := []string{"-c", "127.0.0.1", "-p", strconv.Itoa(p), "-J", "-t", strconv.Itoa(seconds(d))}
		if streams > 1 {
			args = append(args, "-P", strconv.Itoa(streams))
		}
		out, err := runClient("iperf3 -c", bin, args, d+60*time.Second)
		if jerr := json.Unmarshal(out, &res); jerr != nil && err == nil {
			err = fmt.Errorf("iperf3 -c %v: stdout is not JSON: %v", args, jerr)
		}
		if err == nil && res.Error != "" {
			err = fmt.Errorf("iperf3 -c %v: %s", args, res.Error)
		}
		if err == nil && res.End.SumReceived.Bytes <= 0 {
			err = fmt.Errorf("iperf3 -c %v: end.sum_received.bytes = %d", args, res.End.SumReceived.Bytes)
		}
		return res, err
	}
	gbps := func(r child.IperfResult) float64 { return r.End.SumReceived.BitsPerSecond / 1e9 }

	var d1, r1, dP, rP, cpuRuns []float64
	var relaySecs, agentSecs, userSecs, gbs, srvCPU []float64
	for run := 1; run <= cfg.runs; run++ {
		directFirst := run%2 == 1
		var line []string
		// One stream: direct, and relayed with the CPU of relay and expose.
		err := pair(directFirst, func() error {
			sb, err := cpuTicks(srv.Pid())
			if err != nil {
				return err
			}
			r, err := client(port, cfg.iperf1Time, 1)
			if err != nil {
				return err
			}
			sa, err := cpuTicks(srv.Pid())
			if err != nil {
				return err
			}
			d1 = append(d1, gbps(r))
			srvCPU = append(srvCPU, float64(sa-sb)/float64(cfg.clkTck)/(float64(r.End.SumReceived.Bytes)/1e9))
			return nil
		}, func() error {
			rbu, rbs, err1 := cpuTicksSplit(relay.Pid())
			ebu, ebs, err2 := cpuTicksSplit(ex.Pid())
			if err := errors.Join(err1, err2); err != nil {
				return err
			}
			r, err := client(pub, cfg.iperf1Time, 1)
			if err != nil {
				return err
			}
			rau, ras, err1 := cpuTicksSplit(relay.Pid())
			eau, eas, err2 := cpuTicksSplit(ex.Pid())
			if err := errors.Join(err1, err2); err != nil {
				return err
			}
			r1 = append(r1, gbps(r))
			gb := float64(r.End.SumReceived.Bytes) / 1e9
			tck := float64(cfg.clkTck)
			rs, as := float64(rau+ras-rbu-rbs)/tck, float64(eau+eas-ebu-ebs)/tck
			userSecs = append(userSecs, float64(rau-rbu+eau-ebu)/tck)
			relaySecs, agentSecs, gbs = append(relaySecs, rs), append(agentSecs, as), append(gbs, gb)
			cpuRuns = append(cpuRuns, (rs+as)/gb)
			line = append(line, fmt.Sprintf("CPU relay %.2fs + expose %.2fs for %.2f GB = %.3f s/GB", rs, as, gb, (rs+as)/gb))
			return nil
		})
		if err != nil {
			failAll(figs, fmt.Errorf("run %d, 1 stream: %w", run, err))
			break
		}
		err = pair(directFirst, func() error {
			r, err := client(port, cfg.iperf8Time, cfg.iperfStreams)
			if err == nil {
				dP = append(dP, gbps(r))
			}
			return err
		}, func() error {
			r, err := client(pub, cfg.iperf8Time, cfg.iperfStreams)
			if err == nil {
				rP = append(rP, gbps(r))
			}
			return err
		})
		if err != nil {
			failAll(figs, fmt.Errorf("run %d, %d streams: %w", run, cfg.iperfStreams, err))
			break
		}
		i := len(d1) - 1
		fmt.Printf("   run %d/%d: 1 stream direct %.1f, relay %.1f Gbit/s (%.2f); %d streams direct %.1f, relay %.1f Gbit/s (%.2f); %s\n",
			run, cfg.runs, d1[i], r1[i], r1[i]/d1[i], cfg.iperfStreams, dP[i], rP[i], rP[i]/dP[i], strings.Join(line, ""))
	}
	one.setRatio(d1, r1)
	multi.setRatio(dP, rP)
	cpu.setValue(cpuRuns)
	if len(cpuRuns) > 0 {
		cpu.RelayText = fmt.Sprintf("relay %.3f + expose %.3f s/GB", median(relaySecs)/median(gbs), median(agentSecs)/median(gbs))
		cpu.Detail = fmt.Sprintf("utime+stime from /proc/PID/stat around the relayed 1-stream runs (-t %d): relay %s s, expose %s s, for %s GB received (per run); of which user time (both) %s s, the rest is system time",
			seconds(cfg.iperf1Time), joinNums(relaySecs), joinNums(agentSecs), joinNums(gbs), joinNums(userSecs))
		if len(srvCPU) > 0 {
			cpu.Detail += fmt.Sprintf("; for scale, the receiving iperf3 -s alone used %.3f s/GB in the direct runs (median)", median(srvCPU))
		}
	}
	return figs
}

// pair runs direct and relayed in the given order, stopping at an error.
func pair(directFirst bool, direct, relayed func() error) error {
	a, b := direct, relayed
	if !directFirst {
		a, b = relayed, direct
	}
	if err := a(); err != nil {
		return err
	}
	return b()
}

func joinNums(v []float64) string {
	var s []string
	for _, x := range v {
		s = append(s, fmtNum(x))
	}
	return strings.Join(s, ", ")
}

func benchRedis(cfg *config) []*Figure {
	set := &Figure{Section: "redis", Name: "redis-benchmark SET", Unit: "req/s", Target: ge(0.45)}
	get := &Figure{Section: "redis", Name: "redis-benchmark GET", Unit: "req/s", Target: ge(0.45)}
	mean := &Figure{Section: "redis", Name: "redis-benchmark mean of SET, GET ratios", Target: ge(0.45),
		Chart: "redis-benchmark: relay/direct"}
	figs := []*Figure{set, get, mean}
	server, err1 := exec.LookPath("redis-server")
	bench, err2 := exec.LookPath("redis-benchmark")
	if err := errors.Join(err1, err2); err != nil {
		msg := "redis-server or redis-benchmark not found in PATH (install Debian packages redis-server, redis-tools): figures skipped"
		fmt.Println("   " + msg)
		skipAll(figs, msg)
		return figs
	}
	dir, err := os.MkdirTemp("", "tcprelay-bench-redis-")
	if err != nil {
		failAll(figs, err)
		return figs
	}
	defer os.RemoveAll(dir)
	_, port, err := startService("redis-server", server, func(port int) []string {
		return []string{"--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir}
	}, nil)
	if err != nil {
		failAll(figs, err)
		return figs
	}
	_, _, pub, err := startExposed(cfg, port)
	if err != nil {
		failAll(figs, err)
		return figs
	}
	args := func(p int) []string {
		return []string{"-h", "127.0.0.1", "-p", strconv.Itoa(p), "-c", strconv.Itoa(cfg.redisClients),
			"-n", strconv.Itoa(cfg.redisN), "-t", "set,get", "-P", "1", "--csv"}
	}
	fmt.Printf("   redis-server on port %d; ./expose public port %d; redis-benchmark %s\n", port, pub, strings.Join(args(0)[4:], " "))
	run1 := func(p int) (map[string]float64, error) {
		out, err := runClient("redis-benchmark", bench, args(p), 300*time.Second)
		if err != nil {
			return nil, err
		}
		recs, err := csv.NewReader(strings.NewReader(string(out))).ReadAll()
		if err != nil || len(recs) < 1 || len(recs[0]) < 2 || recs[0][0] != "test" || recs[0][1] != "rps" {
			return nil, fmt.Errorf("redis-benchmark: stdout is not CSV with a \"test\",\"rps\" header (%v): %s", err, clip(string(out), 500))
		}
		rps := map[string]float64{}
		for _, rec := range recs[1:] {
			if len(rec) < 2 {
				continue
			}
			v, err := strconv.ParseFloat(rec[1], 64)
			if err != nil || !(v > 0) {
				return nil, fmt.Errorf("redis-benchmark: test %q reported %q requests/s", rec[0], rec[1])
			}
			rps[rec[0]] = v
		}
		for _, t := range []string{"SET", "GET"} {
			if _, ok := rps[t]; !ok {
				return nil, fmt.Errorf("redis-benchmark: no result for %s: %s", t, clip(string(out), 500))
			}
		}
		return rps, nil
	}
	var dSet, rSet, dGet, rGet, means []float64
	for run := 1; run <= cfg.runs; run++ {
		var d, r map[string]float64
		err := pair(run%2 == 1, func() (err error) {
			d, err = run1(port)
			return err
		}, func() (err error) {
			r, err = run1(pub)
			return err
		})
		if err != nil {
			failAll(figs, fmt.Errorf("run %d: %w", run, err))
			break
		}
		dSet, rSet = append(dSet, d["SET"]), append(rSet, r["SET"])
		dGet, rGet = append(dGet, d["GET"]), append(rGet, r["GET"])
		m := (r["SET"]/d["SET"] + r["GET"]/d["GET"]) / 2
		means = append(means, m)
		fmt.Printf("   run %d/%d: SET direct %.0f, relay %.0f req/s (%.2f); GET direct %.0f, relay %.0f req/s (%.2f)\n",
			run, cfg.runs, d["SET"], r["SET"], r["SET"]/d["SET"], d["GET"], r["GET"], r["GET"]/d["GET"])
	}
	set.setRatio(dSet, rSet)
	get.setRatio(dGet, rGet)
	if set.Value != nil && get.Value != nil {
		mean.ValueRuns = means
		mean.Value = ptr((*set.Value + *get.Value) / 2)
		mean.judge()
	}
	return figs
}

// startExposed starts a relay and ./expose in front of the server on port,
// and returns them with expose's public port.
func startExposed(cfg *config, port int) (*relayProc, *child.Proc, int, error) {
	relay, err := startRelay(cfg)
	if err != nil {
		return nil, nil, 0, err
	}
	ex, pub, err := startAgent(cfg, cfg.exposeBin, relay.port, child.Addr(port))
	if err != nil {
		return nil, nil, 0, err
	}
	return relay, ex, pub, nil
}
