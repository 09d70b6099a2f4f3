//go:build linux

// Command bench measures the relay path against a direct connection, side
// by side in one run, on loopback: iperf3 throughput, CPU per GB in the
// relay and the agent, redis-benchmark request rates, the latency of a new
// connection's first echo, the cost of idle relayed connections, and how
// many relayed connections one relay holds under its fd limit; and, for
// each transport an agent may use (native TLS, ws://, wss://), the same
// path's throughput, CPU per GB, new-connection latency and idle memory
// against native plain TCP; a TLS service reached by its name on the
// shared TLS port against the same reached by its port; and the relay path,
// plain and over TLS, against haproxy as a one-hop TCP proxy (the anchor
// table: idle memory and CPU per connection, latency, opening many
// connections, iperf3 and redis-benchmark).
//
// It prints a table (figure, direct, relay, ratio) and writes it to
// OUT/results.json and OUT/results.tsv, from which bench/chart.gp draws
// OUT/chart.svg with gnuplot. Run it from the repository root after make
// (make bench does all three):
//
//	make bench RUNS=3
//	go run ./bench -runs 1 -only latency,idle
package main

import (
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"
)

var (
	runs         = flag.Int("runs", 3, "runs of each timing figure (iperf3, redis-benchmark, latency); the table shows medians")
	binDir       = flag.String("bin", ".", "directory holding the built relay, echoserver and expose")
	outDir       = flag.String("out", "docs/bench", "directory for results.json and results.tsv (empty: do not write)")
	only         = flag.String("only", allSections, "comma-separated sections to run")
	iperf1Time   = flag.Duration("iperf-time", 5*time.Second, "duration of each one-stream iperf3 run (the relayed one also gives CPU per GB)")
	iperfNTime   = flag.Duration("iperf-multi-time", 4*time.Second, "duration of each multi-stream iperf3 run")
	iperfStreams = flag.Int("iperf-streams", 8, "streams of the multi-stream iperf3 runs (-P)")
	redisN       = flag.Int("redis-requests", 100000, "redis-benchmark -n (requests per test)")
	redisClients = flag.Int("redis-clients", 50, "redis-benchmark -c (parallel connections)")
	latencyN     = flag.Int("latency-n", 2000, "sequential connect+echo round trips per path and run")
	idleConns    = flag.Int("idle-conns", 5000, "idle relayed connections for the per-connection fd and RSS figures, all through one tunnel (which may hold every client of the relay's budget: 9,218 under 20,000 fds); in the anchor section, also the connections whose opening is timed, on each path")
	capMax       = flag.Int("cap", 9800, "most relayed connections the capacity figure tries (the bench needs 1 fd each)")
	capAgents    = flag.Int("cap-agents", 1, "echoservers behind the relay in the capacity figure: one tunnel alone may hold every client of the relay's budget; N tunnels opened round-robin hold as many together")
	connTimeout  = flag.Duration("conn-timeout", 5*time.Second, "bound on each dial and each 1-byte echo")
	settleTime   = flag.Duration("settle-timeout", 15*time.Second, "longest wait for fd and RSS counts to settle")
	serveEcho    = flag.Int("serve-echo", 0, "internal: be the direct echo server on this port")

	relayBin, echoBin, exposeBin string
	env                          = []string{"RELAY_SECRET=" + rand.Text()} // of the relay and the agents
)

// row is one figure: its values on the direct path and on the relay path,
// one per run. A figure of the relay path alone has no direct values.
type row struct {
	Section    string    `json:"section"`
	Name       string    `json:"name"`
	Unit       string    `json:"unit"`
	Direct     *float64  `json:"direct,omitempty"` // median of DirectRuns
	Relay      *float64  `json:"relay,omitempty"`  // median of RelayRuns
	Ratio      *float64  `json:"ratio,omitempty"`  // Relay / Direct
	DirectRuns []float64 `json:"direct_runs,omitempty"`
	RelayRuns  []float64 `json:"relay_runs,omitempty"`
}

// add records one run's value on the direct or the relay path.
func (r *row) add(direct bool, v float64) {
	if direct {
		r.DirectRuns = append(r.DirectRuns, v)
	} else {
		r.RelayRuns = append(r.RelayRuns, v)
	}
}

// eachRun measures every path in every run, rotating their order from run
// to run: measure(i) measures path i (0: direct) and describes it for the
// log.
func eachRun(paths []string, measure func(i int) (string, error)) error {
	for run := 1; run <= *runs; run++ {
		var line []string
		for k := range paths {
			i := (k + run - 1) % len(paths)
			s, err := measure(i)
			if err != nil {
				return fmt.Errorf("run %d, %s: %w", run, paths[i], err)
			}
			line = append(line, paths[i]+" "+s)
		}
		fmt.Printf("   run %d/%d: %s\n", run, *runs, strings.Join(line, "; "))
	}
	return nil
}

// errSkipped marks a section that cannot run here (a tool is missing):
// noted, but not a failure.
var errSkipped = errors.New("skipped")

const allSections = "iperf,redis,latency,idle,capacity,transport,names,anchor"

var sections = []struct {
	name string
	run  func() ([]*row, error)
}{
	{"iperf", benchIperf}, {"redis", benchRedis}, {"latency", benchLatency},
	{"idle", benchIdle}, {"capacity", benchCapacity}, {"transport", benchTransports},
	{"names", benchNames}, {"anchor", benchAnchor},
}

func main() {
	flag.Parse()
	if *serveEcho != 0 {
		runEchoServer(*serveEcho)
		return
	}
	if flag.NArg() != 0 || min(*runs, *latencyN, *idleConns, *capMax, *capAgents, *iperfStreams, *redisN, *redisClients) < 1 {
		fmt.Fprintln(os.Stderr, "bench: counts must be positive, and there are no arguments; -h for help")
		os.Exit(2)
	}
	for _, s := range strings.Split(*only, ",") {
		if !strings.Contains(","+allSections+",", ","+s+",") {
			fmt.Fprintf(os.Stderr, "bench: unknown section %q in -only\n", s)
			os.Exit(2)
		}
	}
	os.Exit(run())
}

func run() int {
	started := time.Now()
	// The bench holds one fd per relayed connection: raise the soft limit
	// to the hard one. Children inherit it.
	var lim syscall.Rlimit
	syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
	lim.Cur = lim.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		fmt.Fprintf(os.Stderr, "bench: raise the fd soft limit to %d: %v\n", lim.Max, err)
	}
	defer killAll()

	res := struct {
		Date     string            `json:"date"`
		Machine  string            `json:"machine"`
		Binaries []string          `json:"binaries"` // their -version lines
		Settings map[string]string `json:"settings"` // every flag
		Rows     []*row            `json:"rows"`
		Errors   []string          `json:"errors,omitempty"`
	}{Date: started.UTC().Format(time.RFC3339), Machine: machine(), Settings: map[string]string{}}
	flag.VisitAll(func(f *flag.Flag) { res.Settings[f.Name] = f.Value.String() })
	for name, p := range map[string]*string{"relay": &relayBin, "echoserver": &echoBin, "expose": &exposeBin} {
		*p, _ = filepath.Abs(filepath.Join(*binDir, name))
		out, err := exec.Command(*p, "-version").Output()
		if err != nil {
			fmt.Fprintf(os.Stderr, "bench: %s -version: %v: build it first (make)\n", *p, err)
			return 1
		}
		res.Binaries = append(res.Binaries, strings.TrimSpace(string(out)))
	}
	slices.Sort(res.Binaries)
	fmt.Printf("tcprelay bench, %s; %s\n", res.Date, res.Machine)
	fmt.Printf("binaries: %s; bench fd limit %d; on 127.0.0.1, relay path = client -> relay -> agent (-> target for ./expose)\n\n",
		strings.Join(res.Binaries, ", "), lim.Cur)

	code := 0
	for _, s := range sections {
		if !slices.Contains(strings.Split(*only, ","), s.name) {
			continue
		}
		t0 := time.Now()
		fmt.Printf("== %s\n", s.name)
		rows, err := s.run()
		killAll() // nothing outlives its section
		res.Rows = append(res.Rows, rows...)
		if err != nil {
			fmt.Printf("   %v\n", err)
			res.Errors = append(res.Errors, s.name+": "+err.Error())
			if !errors.Is(err, errSkipped) {
				code = 1
			}
		}
		fmt.Printf("   (%v)\n\n", time.Since(t0).Round(100*time.Millisecond))
	}
	for _, r := range res.Rows {
		r.Direct, r.Relay = median(r.DirectRuns), median(r.RelayRuns)
		if r.Direct != nil && r.Relay != nil && *r.Direct != 0 {
			ratio := *r.Relay / *r.Direct
			r.Ratio = &ratio
		}
	}
	fmt.Printf("RESULTS (%s; %s; timing figures: medians of %d runs)\n", res.Date, res.Machine, *runs)
	writeTable(os.Stdout, res.Rows, false)
	for _, e := range res.Errors {
		fmt.Println("- " + e)
	}
	if *outDir != "" {
		j, _ := json.MarshalIndent(res, "", "  ")
		var tsv strings.Builder
		writeTable(&tsv, res.Rows, true)
		jp, tp := filepath.Join(*outDir, "results.json"), filepath.Join(*outDir, "results.tsv")
		err := errors.Join(os.MkdirAll(*outDir, 0o755), os.WriteFile(jp, append(j, '\n'), 0o644),
			os.WriteFile(tp, []byte(tsv.String()), 0o644))
		if err != nil {
			fmt.Fprintf(os.Stderr, "bench: %v\n", err)
			return 1
		}
		fmt.Printf("wrote %s and %s\n", jp, tp)
	}
	fmt.Printf("total time %v\n", time.Since(started).Round(time.Second))
	return code
}

// median is nil for no values.
func median(v []float64) *float64 {
	if len(v) == 0 {
		return nil
	}
	s := slices.Sorted(slices.Values(v))
	m := (s[(len(s)-1)/2] + s[len(s)/2]) / 2
	return &m
}

// writeTable writes the rows as a table for people, or as TSV for
// gnuplot. A missing value is "-" in both. The table for people also
// shows the spread of each figure's runs, min-max, where it has more than
// one (the TSV keeps its columns: bench/chart.gp reads them).
func writeTable(w io.Writer, rows []*row, tsv bool) {
	num := func(v *float64) string { // 3 significant digits, or all of the integer part
		if v == nil {
			return "-"
		}
		return strconv.FormatFloat(*v, 'f', max(0, 2-int(math.Floor(math.Log10(max(1, math.Abs(*v)))))), 64)
	}
	spread := func(v []float64) string {
		if len(v) < 2 {
			return "-"
		}
		lo, hi := slices.Min(v), slices.Max(v)
		return num(&lo) + "-" + num(&hi)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	line := func(c ...string) {
		if tsv {
			fmt.Fprintln(w, strings.Join(c[:6], "\t"))
		} else {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%8s %8s %6s\t%s\n", c[0], c[1], c[2], c[3], c[4], c[5], c[6])
		}
	}
	line("section", "figure", "unit", "direct", "relay", "ratio", "runs min-max: direct / relay")
	for _, r := range rows {
		s := ""
		if len(r.DirectRuns) > 1 || len(r.RelayRuns) > 1 {
			s = spread(r.DirectRuns) + " / " + spread(r.RelayRuns)
		}
		line(r.Section, r.Name, r.Unit, num(r.Direct), num(r.Relay), num(r.Ratio), s)
	}
	tw.Flush()
}

// machine describes the CPUs, kernel and Go version.
func machine() string {
	model, kernel := "unknown CPU", "unknown"
	if f := procLine("/proc/cpuinfo", "model name"); len(f) > 1 {
		model = strings.Join(f[1:], " ")
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		kernel = strings.TrimSpace(string(b))
	}
	return fmt.Sprintf("%d CPUs, %s, Linux %s, %s", runtime.NumCPU(), model, kernel, runtime.Version())
}
