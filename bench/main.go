// Command bench measures the relay path against a direct connection, side
// by side in one run, on loopback: iperf3 throughput, CPU per GB in the
// relay and the agent, redis-benchmark request rates, the latency of a new
// connection's first echo, the cost of idle relayed connections, and how
// many relayed connections one relay holds under its fd limit. It prints a
// table of every figure next to its target, and writes docs/bench/results.json
// and docs/bench/chart.svg.
//
// Run it from the repository root after make (make bench does both):
//
//	make bench RUNS=3
//	go run ./bench -runs 1 -only latency,idle
package main

import (
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

type config struct {
	runs         int
	binDir       string
	outDir       string
	iperf1Time   time.Duration
	iperf8Time   time.Duration
	iperfStreams int
	redisN       int
	redisClients int
	latencyN     int
	idleConns    int
	capMax       int
	capBatch     int
	capAgents    int
	connTimeout  time.Duration
	settle       time.Duration
	only         map[string]bool

	relayBin, echoBin, exposeBin string
	self                         string // this program, for the direct echo server
	secret                       string
	clkTck                       int64
}

// agentEnv is the environment of the relay and the agents: one random
// secret, so the relay runs as in production (not open).
func (c *config) agentEnv() []string { return []string{"RELAY_SECRET=" + c.secret} }

var sections = []string{"iperf", "redis", "latency", "idle", "capacity"}

func main() {
	cfg := &config{}
	flag.IntVar(&cfg.runs, "runs", 3, "runs of each timing figure (iperf3, redis-benchmark, latency); medians are reported")
	flag.StringVar(&cfg.binDir, "bin", ".", "directory holding the built relay, echoserver and expose")
	flag.StringVar(&cfg.outDir, "out", "docs/bench", "directory for results.json and chart.svg (empty: do not write)")
	flag.DurationVar(&cfg.iperf1Time, "iperf-time", 5*time.Second, "duration of each one-stream iperf3 run (the relayed one also gives CPU per GB)")
	flag.DurationVar(&cfg.iperf8Time, "iperf-multi-time", 4*time.Second, "duration of each multi-stream iperf3 run")
	flag.IntVar(&cfg.iperfStreams, "iperf-streams", 8, "streams of the multi-stream iperf3 runs (-P)")
	flag.IntVar(&cfg.redisN, "redis-requests", 100000, "redis-benchmark -n (requests per test)")
	flag.IntVar(&cfg.redisClients, "redis-clients", 50, "redis-benchmark -c (parallel connections)")
	flag.IntVar(&cfg.latencyN, "latency-n", 2000, "sequential connect+echo round trips per path and run")
	flag.IntVar(&cfg.idleConns, "idle-conns", 5000, "idle relayed connections for the per-connection RSS and fd figures")
	flag.IntVar(&cfg.capMax, "cap", 9800, "most relayed connections the capacity figure tries (the bench needs 1 fd each)")
	flag.IntVar(&cfg.capBatch, "cap-batch", 200, "connections opened per batch in the capacity figure")
	flag.IntVar(&cfg.capAgents, "cap-agents", 2, "echoservers behind the relay in the capacity figure, so that the relay's limit is the one reached")
	flag.DurationVar(&cfg.connTimeout, "conn-timeout", 5*time.Second, "bound on each dial and each 1-byte echo in the connection figures")
	flag.DurationVar(&cfg.settle, "settle-timeout", 15*time.Second, "longest wait for fd and RSS counts to settle")
	only := flag.String("only", strings.Join(sections, ","), "comma-separated sections to run: "+strings.Join(sections, ", "))
	serveEcho := flag.Bool("serve-echo", false, "internal: run the direct echo server (prints its address) instead of the bench")
	redraw := flag.String("chart-from", "", "only redraw OUT/chart.svg from this results.json, running nothing")
	flag.Parse()
	if *serveEcho {
		runEchoServer()
		return
	}
	if *redraw != "" {
		if err := redrawChart(*redraw, filepath.Join(cfg.outDir, "chart.svg")); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
		return
	}
	if flag.NArg() != 0 || cfg.runs < 1 || cfg.latencyN < 1 || cfg.idleConns < 1 || cfg.capMax < 1 ||
		cfg.capBatch < 1 || cfg.capAgents < 1 || cfg.iperfStreams < 1 || cfg.redisN < 1 || cfg.redisClients < 1 {
		fmt.Fprintln(os.Stderr, "bench: bad arguments (counts must be positive, no positional arguments); -h for help")
		os.Exit(2)
	}
	cfg.only = map[string]bool{}
	for _, s := range strings.Split(*only, ",") {
		s = strings.TrimSpace(s)
		if s == "" {
			continue
		}
		known := false
		for _, k := range sections {
			known = known || k == s
		}
		if !known {
			fmt.Fprintf(os.Stderr, "bench: unknown section %q in -only; want some of %s\n", s, strings.Join(sections, ","))
			os.Exit(2)
		}
		cfg.only[s] = true
	}
	os.Exit(run(cfg))
}

func run(cfg *config) int {
	started := time.Now()
	// The bench holds one fd per relayed connection: raise the soft limit
	// to the hard one. Children inherit it.
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil {
		lim.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			fmt.Fprintf(os.Stderr, "bench: raise the fd soft limit to %d: %v\n", lim.Max, err)
		}
		syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
	}

	// Ctrl-C, SIGTERM, SIGHUP: kill every child, then exit.
	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	go func() {
		s := <-sigc
		fmt.Fprintf(os.Stderr, "\nbench: %v: killing %d processes\n", s, runningCount())
		killAll()
		os.Exit(130)
	}()
	defer killAll()

	for name, p := range map[string]*string{"relay": &cfg.relayBin, "echoserver": &cfg.echoBin, "expose": &cfg.exposeBin} {
		*p = filepath.Join(cfg.binDir, name)
		if abs, err := filepath.Abs(*p); err == nil {
			*p = abs
		}
		if st, err := os.Stat(*p); err != nil || st.IsDir() || st.Mode()&0o111 == 0 {
			fmt.Fprintf(os.Stderr, "bench: %s is not an executable: build it first (make)\n", *p)
			return 1
		}
	}
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		return 1
	}
	cfg.self = self
	var sec [16]byte
	rand.Read(sec[:])
	cfg.secret = hex.EncodeToString(sec[:])
	cfg.clkTck = 100
	if out, err := exec.Command("getconf", "CLK_TCK").Output(); err == nil {
		if v, err := strconv.ParseInt(strings.TrimSpace(string(out)), 10, 64); err == nil && v > 0 {
			cfg.clkTck = v
		}
	}

	m := machineInfo()
	res := &results{
		Date:    started.Format(time.RFC3339),
		Machine: m,
		Runs:    cfg.runs,
		Settings: map[string]string{
			"iperf_time": cfg.iperf1Time.String(), "iperf_multi_time": cfg.iperf8Time.String(),
			"iperf_streams": strconv.Itoa(cfg.iperfStreams), "redis_requests": strconv.Itoa(cfg.redisN),
			"redis_clients": strconv.Itoa(cfg.redisClients), "latency_n": strconv.Itoa(cfg.latencyN),
			"idle_conns": strconv.Itoa(cfg.idleConns), "cap": strconv.Itoa(cfg.capMax),
			"cap_agents": strconv.Itoa(cfg.capAgents), "clk_tck": strconv.FormatInt(cfg.clkTck, 10),
			"sections": strings.Join(sortedKeys(cfg.only), ","),
		},
	}
	fmt.Printf("tcprelay bench, %s\n", res.Date)
	fmt.Printf("machine: %d CPUs (nproc), %s, kernel %s, %s\n", m.NProc, m.CPUModel, m.Kernel, m.GoVersion)
	fmt.Printf("runs: %d (timing figures are medians over the runs; ratios are relay-path median / direct median)\n", cfg.runs)
	var versions []string
	for _, b := range []string{cfg.relayBin, cfg.echoBin, cfg.exposeBin} {
		out, err := exec.Command(b, "-version").Output()
		if err != nil {
			out = []byte(filepath.Base(b) + " (-version: " + err.Error() + ")")
		}
		versions = append(versions, strings.TrimSpace(string(out)))
	}
	res.Binaries = versions
	fmt.Printf("binaries: %s (from %s)\n", strings.Join(versions, ", "), cfg.binDir)
	fmt.Printf("bench fd limit: soft %d, hard %d; CLK_TCK %d\n", lim.Cur, lim.Max, cfg.clkTck)
	fmt.Println("everything on 127.0.0.1; relay path = client -> relay public port -> agent (-> target for ./expose)")
	fmt.Println()

	type section struct {
		name string
		fn   func(*config) []*Figure
	}
	for _, s := range []section{
		{"iperf", benchIperf},
		{"redis", benchRedis},
		{"latency", benchLatency},
		{"idle", benchIdle},
		{"capacity", benchCapacity},
	} {
		if !cfg.only[s.name] {
			continue
		}
		t0 := time.Now()
		fmt.Printf("== %s\n", s.name)
		figs := s.fn(cfg)
		res.Figures = append(res.Figures, figs...)
		fmt.Printf("   (%s: %v)\n\n", s.name, time.Since(t0).Round(100*time.Millisecond))
		killAll() // nothing outlives its section
		registry.Lock()
		registry.closing = false
		registry.procs = nil
		registry.Unlock()
	}

	res.DurationSeconds = time.Since(started).Seconds()
	code := 0
	for _, f := range res.Figures {
		if f.Error != "" && !f.Skipped {
			code = 1
		}
	}
	printTable(os.Stdout, res)
	if cfg.outDir != "" {
		if err := os.MkdirAll(cfg.outDir, 0o755); err != nil {
			fmt.Fprintf(os.Stderr, "bench: %v\n", err)
			return 1
		}
		jp, sp := filepath.Join(cfg.outDir, "results.json"), filepath.Join(cfg.outDir, "chart.svg")
		if err := writeJSON(jp, res); err != nil {
			fmt.Fprintf(os.Stderr, "bench: %v\n", err)
			return 1
		}
		if err := os.WriteFile(sp, []byte(chartSVG(res)), 0o644); err != nil {
			fmt.Fprintf(os.Stderr, "bench: %v\n", err)
			return 1
		}
		fmt.Printf("wrote %s and %s\n", jp, sp)
	}
	fmt.Printf("total time %v\n", time.Since(started).Round(time.Second))
	return code
}

type machine struct {
	NProc     int    `json:"nproc"`
	CPUModel  string `json:"cpu_model"`
	Kernel    string `json:"kernel"`
	GoVersion string `json:"go_version"`
}

func machineInfo() machine {
	m := machine{NProc: runtime.NumCPU(), CPUModel: "unknown", Kernel: "unknown", GoVersion: runtime.Version()}
	if out, err := exec.Command("nproc").Output(); err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(out))); err == nil {
			m.NProc = n
		}
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	var u syscall.Utsname // uname -r
	if err := syscall.Uname(&u); err == nil {
		var b []byte
		for _, c := range u.Release {
			if c == 0 {
				break
			}
			b = append(b, byte(c))
		}
		m.Kernel = string(b)
	}
	return m
}

// runEchoServer is the direct echo server (-serve-echo): a plain Go TCP
// echo server on 127.0.0.1, port 0, in its own process like ./echoserver.
// It echoes the way ./echoserver does, and prints its address on stdout.
func runEchoServer() {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, "echo server:", err)
		os.Exit(1)
	}
	fmt.Printf("listening on %s\n", ln.Addr())
	for {
		c, err := ln.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, "echo server:", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go echo(c)
	}
}
