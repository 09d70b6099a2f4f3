package server_test

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"net"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/testutil"
	"tcprelay/server"
	"tcprelay/tunnel"
)

func statusPage(t *testing.T, s *server.Server) string {
	t.Helper()
	var b bytes.Buffer
	if err := s.WriteStatusHTML(&b); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

func statusText(t *testing.T, s *server.Server) string {
	t.Helper()
	var b bytes.Buffer
	if err := s.WriteStatus(&b); err != nil {
		t.Fatal(err)
	}
	return b.String()
}

// echoRound writes msg on c and reads its echo back.
func echoRound(t *testing.T, c net.Conn, msg []byte) {
	t.Helper()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("echo: %v (%d bytes)", err, len(got))
	}
}

// TestStatusShowsLiveClients: the status page and the text view show the
// relay, the agent, the endpoint with its member, and a client that is
// still connected with the bytes it has moved so far, growing while it
// stays open; the byte metrics count them too.
func TestStatusShowsLiveClients(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{Secret: "s", Version: `<i>v1"2</i>`, ControlTLS: true})
	cfg := tunnel.Config{Secret: "s", Logger: testutil.Logger(t)}
	ln, err := cfg.Listen(testutil.Context(t), relay.Addr)
	if err != nil {
		t.Fatal(err)
	}
	testutil.Serve(t, ln, testutil.Echo)
	port := strconv.Itoa(ln.Addr().(*tunnel.Addr).Port)

	c := testutil.Dial(t, ln.Addr().String())
	defer c.Close()
	client := c.LocalAddr().String() // the relay sees the client from here
	sent := 0
	for _, n := range []int{1000, 2500} {
		echoRound(t, c, bytes.Repeat([]byte("x"), n))
		sent += n
		// The echo came back: the relay has delivered the bytes both ways,
		// and the connection is still open.
		want := fmt.Sprintf(`<data value="%d">`, sent)
		var page string
		check.Eventually(t, 5*time.Second, func() error {
			page = statusPage(t, relay.Server)
			row := regexp.MustCompile(`<tr><td><code>` + regexp.QuoteMeta(client) + `</code></td>.*</tr>`).FindString(page)
			if row == "" {
				return fmt.Errorf("no row for client %s", client)
			}
			if strings.Count(row, want) != 2 {
				return fmt.Errorf("client row %q lacks %s twice (to and from the agent)", row, want)
			}
			return nil
		})
		m := scrape(t, relay.Server)
		for _, key := range []string{"tcprelay_bytes_to_agents_total", "tcprelay_bytes_from_agents_total",
			`tcprelay_endpoint_bytes_total{port="` + port + `",direction="to_agents"}`,
			`tcprelay_endpoint_bytes_total{port="` + port + `",direction="from_agents"}`} {
			if m[key] != int64(sent) {
				t.Errorf("%s = %d with the connection open, want %d", key, m[key], sent)
			}
		}
		if key := `tcprelay_endpoint_clients{port="` + port + `"}`; m[key] != 1 {
			t.Errorf("%s = %d, want 1", key, m[key])
		}
		for _, want := range []string{
			`<meta http-equiv="refresh" content="5">`,
			`id="port-` + port + `"`, "Port " + port,
			"&lt;i&gt;v1&#34;2&lt;/i&gt;", // the version, escaped
			"shared secret", ">TLS<", relay.Addr,
			"tunnels per agent", "link buffer", "1.8 MiB", "stalled memory limit", "pickup timeout",
			`<span class="ok">ready</span>`,
		} {
			if !strings.Contains(page, want) {
				t.Errorf("status page lacks %q", want)
			}
		}
		if strings.Contains(page, "<script") || strings.Contains(page, "<i>") {
			t.Errorf("status page has a script or an unescaped value:\n%s", page)
		}
		text := statusText(t, relay.Server)
		for _, want := range []string{"1 agent, 1 endpoint\n", "endpoint on port " + port + ": 1 connection, 0 waiting\n",
			fmt.Sprintf("  client %s via agent ", client), fmt.Sprintf(": %d bytes to the agent, %d from it\n", sent, sent), ", 1 client\n"} {
			if !strings.Contains(text, want) {
				t.Errorf("status text lacks %q:\n%s", want, text)
			}
		}
	}
	if t.Failed() {
		t.Logf("status page:\n%s", statusPage(t, relay.Server))
	}
}

// TestStatusWaitingAndBounded: clients waiting for their agent are listed
// with when they came, oldest first, and past 200 the views show the first
// 200 and how many more.
func TestStatusWaitingAndBounded(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{PickupTimeout: time.Minute, MaxPendingPerTunnel: -1, MaxPoolPerAgent: -1})
	agent := testutil.NewRawAgent(t, relay.Addr, "")
	defer agent.Conn.Close()
	pub := agent.Listen(t, 0)
	_, port, _ := net.SplitHostPort(pub)

	first := testutil.Dial(t, pub)
	defer first.Close()
	agent.ExpectIncoming(t)
	check.Eventually(t, 5*time.Second, func() error {
		page := statusPage(t, relay.Server)
		if !strings.Contains(page, `<table class="waiting">`) || !strings.Contains(page, "<code>"+first.LocalAddr().String()+"</code>") {
			return fmt.Errorf("the waiting client %s is not listed", first.LocalAddr())
		}
		return nil
	})
	if text := statusText(t, relay.Server); !strings.Contains(text, "  waiting: client "+first.LocalAddr().String()+" for agent ") {
		t.Errorf("status text lacks the waiting client:\n%s", text)
	}

	const more = 5
	for range 200 + more - 1 {
		c := testutil.Dial(t, pub)
		defer c.Close()
	}
	check.Eventually(t, 10*time.Second, func() error {
		if w := relay.Stats().Waiting; w != 200+more {
			return fmt.Errorf("%d clients waiting, want %d", w, 200+more)
		}
		return nil
	})
	page := statusPage(t, relay.Server)
	if n := strings.Count(page, "<tr><td><code>127.0.0.1:"); n != 200 {
		t.Errorf("the page lists %d waiting clients, want 200", n)
	}
	if want := fmt.Sprintf("and %d more waiting", more); !strings.Contains(page, want) {
		t.Errorf("the page lacks %q", want)
	}
	// Oldest first: the first client leads the list.
	if i, j := strings.Index(page, first.LocalAddr().String()), strings.Index(page, `<table class="waiting">`); i < j {
		t.Errorf("the first client is not in the waiting list")
	} else if row := page[j:]; strings.Index(row, "<code>") != strings.Index(row, "<code>"+first.LocalAddr().String()) {
		t.Errorf("the first client to come is not listed first")
	}
	text := statusText(t, relay.Server)
	if got := strings.Count(text, "  waiting: client "); got != 200 || !strings.Contains(text, fmt.Sprintf("  ... and %d more waiting\n", more)) {
		t.Errorf("status text lists %d waiting clients, want 200 and a line for %d more", got, more)
	}
	if m := scrape(t, relay.Server); m[`tcprelay_endpoint_clients_waiting{port="`+port+`"}`] != 200+more {
		t.Errorf("tcprelay_endpoint_clients_waiting for port %s = %d, want %d", port, m[`tcprelay_endpoint_clients_waiting{port="`+port+`"}`], 200+more)
	}
}

// TestStatusTellsSessionsApart: two sessions of one agent (the same
// secret, so the same name) are told apart in both views by their remote
// addresses: each pool member shows its own, and each agent row shows the
// ports its session serves, with the pool's name in the text view too.
// Counts are in the singular for one ("1 client") and the plural
// otherwise, and neither view, nor the relay's log, says <nil>.
func TestStatusTellsSessionsApart(t *testing.T) {
	check.Leaks(t)
	var logs testutil.LockedBuffer
	relay := testutil.StartRelay(t, server.Config{Secret: "s", Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	listen := func(pool string) *tunnel.Listener {
		cfg := tunnel.Config{Secret: "s", Pool: pool, Logger: testutil.Logger(t)}
		ln, err := cfg.Listen(testutil.Context(t), relay.Addr)
		if err != nil {
			t.Fatal(err)
		}
		testutil.Serve(t, ln, testutil.Echo)
		return ln
	}
	a, b, own := listen("web"), listen("web"), listen("")
	pool := strconv.Itoa(a.Addr().(*tunnel.Addr).Port)
	ownPort := strconv.Itoa(own.Addr().(*tunnel.Addr).Port)
	// Two clients of the pool, one of the other port.
	for _, addr := range []string{a.Addr().String(), b.Addr().String(), own.Addr().String()} {
		c := testutil.Dial(t, addr)
		defer c.Close()
		echoRound(t, c, []byte("hello"))
	}

	// The remote addresses of the three sessions, from the agents table.
	page := statusPage(t, relay.Server)
	text := statusText(t, relay.Server)
	rows := regexp.MustCompile(`(?m)^agent (\S+) from (\S+) \(software .*\), connected \S+ ago, ports (.*), (\d+ parked data connections?)$`).FindAllStringSubmatch(text, -1)
	if len(rows) != 3 {
		t.Fatalf("status text: %d agent lines, want 3:\n%s", len(rows), text)
	}
	remotes := map[string]string{} // remote address: its ports
	for _, r := range rows {
		remotes[r[2]] = r[3]
	}
	if len(remotes) != 3 {
		t.Errorf("the three sessions do not have three remote addresses: %v", remotes)
	}
	var inPool, ownRemote []string
	for remote, ports := range remotes {
		switch ports {
		case pool + ` (pool "web")`:
			inPool = append(inPool, remote)
		case ownPort:
			ownRemote = append(ownRemote, remote)
		default:
			t.Errorf("agent from %s: ports %q, want %s (pool \"web\") or %s", remote, ports, pool, ownPort)
		}
	}
	if len(inPool) != 2 || len(ownRemote) != 1 {
		t.Fatalf("sessions by ports: %v in the pool, %v on port %s; text:\n%s", inPool, ownRemote, ownPort, text)
	}
	for _, remote := range inPool {
		if !regexp.MustCompile(`(?m)^  member: agent \S+ from ` + regexp.QuoteMeta(remote) + ` tunnel \d+, (1 client|2 clients|0 clients)$`).MatchString(text) {
			t.Errorf("status text has no member line from %s:\n%s", remote, text)
		}
		// The page: the member's row and the agent's ports.
		if !regexp.MustCompile(`<tr><td>[^<]*</td><td><code>` + regexp.QuoteMeta(remote) + `</code></td><td class="num">\d+</td>`).MatchString(page) {
			t.Errorf("status page has no member row with remote address %s", remote)
		}
		if !regexp.MustCompile(`<code>` + regexp.QuoteMeta(remote) + `</code></td>.*<td class="ports"><a href="#port-` + pool + `">` + pool + `</a> <span class="muted">pool web</span></td>`).MatchString(page) {
			t.Errorf("status page's agent row from %s does not show port %s of pool web", remote, pool)
		}
	}
	for _, want := range []string{"3 agents, 2 endpoints\n", `endpoint on port ` + pool + ` (pool "web"): 2 connections, 0 waiting`,
		`endpoint on port ` + ownPort + `: 1 connection, 0 waiting`} {
		if !strings.Contains(text, want) {
			t.Errorf("status text lacks %q:\n%s", want, text)
		}
	}
	if !strings.Contains(page, "<title>tcprelay unknown: 3 agents, 2 endpoints</title>") {
		t.Errorf("status page title is not in the plural for 3 agents and 2 endpoints")
	}
	for _, re := range []string{`\b1 (agents|endpoints|connections|clients|bytes)\b`, `\b([02-9]|\d\d+) (agent|endpoint|connection|client)\b[^s]`} {
		if m := regexp.MustCompile(re).FindString(text); m != "" {
			t.Errorf("status text: %q is not in the right number:\n%s", m, text)
		}
	}
	// A client closed: its line in the log has no err=<nil>.
	c := testutil.Dial(t, own.Addr().String())
	echoRound(t, c, []byte("bye"))
	c.Close()
	check.Eventually(t, 5*time.Second, func() error {
		if !strings.Contains(logs.String(), "connection closed") {
			return fmt.Errorf("no \"connection closed\" line in the relay's log")
		}
		return nil
	})
	for name, s := range map[string]string{"status page": page, "status text": text, "relay log": logs.String()} {
		if strings.Contains(s, "<nil>") {
			t.Errorf("%s says <nil>:\n%s", name, s)
		}
	}
}
