package server_test

import (
	"bytes"
	"fmt"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/testutil"
	"tcprelay/server"
	"tcprelay/tunnel"
)

func scrape(t *testing.T, s *server.Server) map[string]int64 { return testutil.Metrics(t, s) }

func TestMetricsCount(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{Secret: "s"})
	// One refused agent, one garbage connection, one served agent.
	bad := tunnel.Config{Secret: "wrong", Logger: testutil.Logger(t)}
	if _, err := bad.Listen(testutil.Context(t), relay.Addr); err == nil {
		t.Fatal("wrong secret accepted")
	}
	garbage := testutil.Dial(t, relay.Addr)
	garbage.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
	expectClosed(t, garbage, 5*time.Second)

	cfg := tunnel.Config{Secret: "s", Logger: testutil.Logger(t)}
	ln, err := cfg.Listen(testutil.Context(t), relay.Addr)
	if err != nil {
		t.Fatal(err)
	}
	testutil.Serve(t, ln, testutil.Echo)
	const clients, size = 3, 1000
	for i := range clients {
		checkEcho(t, ln.Addr().String(), strings.Repeat(string(rune('a'+i)), size))
	}
	// Byte counts land when each relayed connection has ended on both sides.
	var m map[string]int64
	check.Eventually(t, 5*time.Second, func() error {
		if m = scrape(t, relay.Server); m["tcprelay_connections_total"] < clients {
			return fmt.Errorf("connections_total %d, want %d", m["tcprelay_connections_total"], clients)
		}
		return nil
	})
	want := map[string]int64{
		"tcprelay_agents":                   1,
		"tcprelay_tunnels":                  1,
		"tcprelay_agent_sessions_total":     1,
		"tcprelay_auth_failures_total":      1,
		"tcprelay_handshake_failures_total": 1,
		"tcprelay_control_dropped_total":    1,
		"tcprelay_clients_total":            clients,
		"tcprelay_connections_total":        clients,
		"tcprelay_connection_errors_total":  0,
		"tcprelay_bytes_to_agents_total":    clients * size,
		"tcprelay_bytes_from_agents_total":  clients * size,
	}
	for name, v := range want {
		if m[name] != v {
			t.Errorf("%s = %d, want %d", name, m[name], v)
		}
	}
	if hits, misses := m["tcprelay_pool_hits_total"], m["tcprelay_pool_misses_total"]; hits+misses != clients {
		t.Errorf("pool hits %d + misses %d, want %d clients", hits, misses, clients)
	}

	var status bytes.Buffer
	relay.WriteStatus(&status)
	port := strconv.Itoa(ln.Addr().(*tunnel.Addr).Port)
	if !strings.Contains(status.String(), "1 agent, ") || !strings.Contains(status.String(), "on port "+port) {
		t.Errorf("status view lacks the agent or its tunnel on port %s:\n%s", port, status.String())
	}
}

var (
	metricName = regexp.MustCompile(`^[a-zA-Z_:][a-zA-Z0-9_:]*$`)
	labelName  = regexp.MustCompile(`^[a-zA-Z_][a-zA-Z0-9_]*$`)
)

// checkExposition checks text against the Prometheus text exposition
// format (0.0.4), strictly, and returns its samples by series and what is
// wrong with it.
func checkExposition(text string) (samples map[string]float64, problems []string) {
	type family struct{ help, kind string }
	families := map[string]*family{}
	samples = map[string]float64{}
	current := "" // the family whose samples may follow
	done := map[string]bool{}
	if !strings.HasSuffix(text, "\n") {
		problems = append(problems, "the exposition does not end in a newline")
	}
	for i, line := range strings.Split(strings.TrimSuffix(text, "\n"), "\n") {
		bad := func(format string, a ...any) {
			problems = append(problems, fmt.Sprintf("line %d %q: %s", i+1, line, fmt.Sprintf(format, a...)))
		}
		if rest, ok := strings.CutPrefix(line, "# "); ok {
			kw, rest, _ := strings.Cut(rest, " ")
			name, arg, _ := strings.Cut(rest, " ")
			if !metricName.MatchString(name) {
				bad("bad metric name %q", name)
			}
			f := families[name]
			if f == nil {
				if done[current] = true; done[name] {
					bad("family %s resumes after another family", name)
				}
				f = &family{}
				families[name] = f
				current = name
			} else if name != current {
				bad("family %s resumes after another family", name)
			}
			switch kw {
			case "HELP":
				if f.help != "" || arg == "" {
					bad("a second or empty HELP")
				}
				if strings.Contains(strings.NewReplacer(`\\`, "", `\n`, "").Replace(arg), `\`) {
					bad("a backslash in HELP that is not an escape")
				}
				f.help = arg
			case "TYPE":
				if f.kind != "" || f.help == "" {
					bad("a second TYPE, or one before HELP")
				}
				switch arg {
				case "counter":
					if !strings.HasSuffix(name, "_total") {
						bad("counter %s does not end in _total", name)
					}
				case "gauge":
					if strings.HasSuffix(name, "_total") {
						bad("gauge %s ends in _total", name)
					}
				default:
					bad("unexpected type %q", arg)
				}
				f.kind = arg
			default:
				bad("a comment that is neither HELP nor TYPE")
			}
			continue
		}
		// name{label="value",...} value
		end := strings.IndexAny(line, "{ ")
		if end < 0 {
			bad("no value")
			continue
		}
		name, rest := line[:end], line[end:]
		if f := families[name]; f == nil || f.kind == "" || name != current {
			bad("sample of %s without its HELP and TYPE just before", name)
		}
		var labels []string
		if strings.HasPrefix(rest, "{") {
			rest = rest[1:]
			for !strings.HasPrefix(rest, "}") {
				ln, after, ok := strings.Cut(rest, `="`)
				if !ok || !labelName.MatchString(ln) {
					bad("bad label name in %q", rest)
					break
				}
				var v strings.Builder
				j := 0
				for ; j < len(after) && after[j] != '"'; j++ {
					if after[j] == '\n' {
						bad("raw newline in a label value")
					}
					if after[j] == '\\' {
						j++
						switch {
						case j >= len(after):
							bad("label value ends in a backslash")
						case after[j] == 'n':
							v.WriteByte('\n')
						case after[j] == '\\' || after[j] == '"':
							v.WriteByte(after[j])
						default:
							bad("bad escape \\%c in a label value", after[j])
						}
						continue
					}
					v.WriteByte(after[j])
				}
				if j >= len(after) {
					bad("unterminated label value")
					break
				}
				labels = append(labels, ln+"="+strconv.Quote(v.String()))
				rest = strings.TrimPrefix(after[j+1:], ",")
			}
			rest = strings.TrimPrefix(rest, "}")
		}
		value, ok := strings.CutPrefix(rest, " ")
		v, err := strconv.ParseFloat(value, 64)
		if !ok || err != nil || strings.Contains(value, " ") {
			bad("value %q is not a float", value)
		}
		sort.Strings(labels)
		series := name + "{" + strings.Join(labels, ",") + "}"
		if _, dup := samples[series]; dup {
			bad("duplicate series %s", series)
		}
		samples[series] = v
	}
	for name, f := range families {
		if f.kind == "" {
			problems = append(problems, fmt.Sprintf("family %s has no TYPE", name))
		}
	}
	return samples, problems
}

// TestMetricsFormat: the hand-written exposition keeps to the format a
// Prometheus server parses (see checkExposition), with the process and Go
// families under their usual names, and per-port series for a live relay.
func TestMetricsFormat(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{Version: "1.0\"beta\\2\nx"})
	cfg := tunnel.Config{Logger: testutil.Logger(t)}
	var ports []string
	for range 2 {
		ln, err := cfg.Listen(testutil.Context(t), relay.Addr)
		if err != nil {
			t.Fatal(err)
		}
		testutil.Serve(t, ln, testutil.Echo)
		ports = append(ports, strconv.Itoa(ln.Addr().(*tunnel.Addr).Port))
		checkEcho(t, ln.Addr().String(), "hello")
	}
	var buf bytes.Buffer
	if err := relay.WriteMetrics(&buf); err != nil {
		t.Fatal(err)
	}
	samples, problems := checkExposition(buf.String())
	for _, p := range problems {
		t.Error(p)
	}
	want := []string{
		"go_goroutines{}", "go_threads{}", "go_memstats_heap_alloc_bytes{}", "go_memstats_sys_bytes{}",
		`go_info{version="` + runtime.Version() + `"}`,
		"process_start_time_seconds{}",
		`tcprelay_build_info{version="1.0\"beta\\2\nx"}`,
		"tcprelay_start_time_seconds{}", "tcprelay_endpoints_unlabelled{}",
	}
	if runtime.GOOS == "linux" {
		want = append(want, "process_cpu_seconds_total{}", "process_open_fds{}", "process_max_fds{}",
			"process_resident_memory_bytes{}", "process_virtual_memory_bytes{}")
	}
	for _, p := range ports {
		want = append(want, `tcprelay_endpoint_clients{port="`+p+`"}`, `tcprelay_endpoint_members{port="`+p+`"}`,
			`tcprelay_endpoint_bytes_total{direction="to_agents",port="`+p+`"}`)
	}
	for _, s := range want {
		if _, ok := samples[s]; !ok {
			t.Errorf("no sample %s", s)
		}
	}
	if start := samples["process_start_time_seconds{}"]; start > float64(time.Now().Unix())+1 || start < float64(time.Now().Add(-time.Hour).Unix()) {
		t.Errorf("process_start_time_seconds %f is not within the last hour", start)
	}
	if rss := samples["process_resident_memory_bytes{}"]; runtime.GOOS == "linux" && rss < 1<<20 {
		t.Errorf("process_resident_memory_bytes %f is below 1 MiB", rss)
	}
	if t.Failed() {
		t.Logf("metrics:\n%s", buf.String())
	}

	// The checker itself catches what it is for.
	for _, broken := range []string{
		"# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 1\na_total{x=\"1\"} 2\n", // duplicate series
		"# HELP a A.\n# TYPE a counter\na 1\n",                                                // counter without _total
		"a 1\n",                                                                               // no HELP and TYPE
		"# HELP a A.\n# TYPE a gauge\na{x=\"1} 1\n",                                           // unterminated value
		"# HELP a A.\n# TYPE a gauge\na{x=\"\\q\"} 1\n",                                       // bad escape
		"# HELP a A.\n# TYPE a gauge\na one\n",                                                // not a float
		"# HELP 1a A.\n# TYPE 1a gauge\n1a 1\n",                                               // bad name
		"# HELP a A.\n# TYPE a gauge\n# HELP b B.\n# TYPE b gauge\nb 1\na 1\n",                // family split
	} {
		if _, problems := checkExposition(broken); len(problems) == 0 {
			t.Errorf("the format check passes %q", broken)
		}
	}
}

// TestByteCountersNeverDip: the byte counters include open connections,
// and never go down as connections end (their bytes move from the live sum
// to the finished total at once), scraped while many connections come and
// go; once all have ended they are exact.
func TestByteCountersNeverDip(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	cfg := tunnel.Config{Logger: testutil.Logger(t)}
	ln, err := cfg.Listen(testutil.Context(t), relay.Addr)
	if err != nil {
		t.Fatal(err)
	}
	testutil.Serve(t, ln, testutil.Echo)

	const conns, size = 300, 20_000
	stop := make(chan struct{})
	scraped := make(chan error, 1)
	go func() {
		var last [2]int64
		n := 0
		for {
			m := testutil.Metrics(t, relay.Server)
			now := [2]int64{m["tcprelay_bytes_to_agents_total"], m["tcprelay_bytes_from_agents_total"]}
			if now[0] < last[0] || now[1] < last[1] {
				scraped <- fmt.Errorf("after %d scrapes the byte counters went from %v to %v", n, last, now)
				return
			}
			last = now
			n++
			select {
			case <-stop:
				scraped <- nil
				return
			default:
			}
		}
	}()
	msg := bytes.Repeat([]byte("y"), size)
	for range conns {
		c := testutil.Dial(t, ln.Addr().String())
		echoRound(t, c, msg)
		c.Close()
	}
	close(stop)
	if err := <-scraped; err != nil {
		t.Fatal(err)
	}
	check.Eventually(t, 5*time.Second, func() error {
		m := scrape(t, relay.Server)
		if m["tcprelay_connections_total"] < conns {
			return fmt.Errorf("%d connections ended, want %d", m["tcprelay_connections_total"], conns)
		}
		if to, from := m["tcprelay_bytes_to_agents_total"], m["tcprelay_bytes_from_agents_total"]; to != conns*size || from != conns*size {
			return fmt.Errorf("bytes %d to agents, %d from, want %d each", to, from, conns*size)
		}
		return nil
	})
}
