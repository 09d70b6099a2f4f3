package server_test

import (
	"bytes"
	"fmt"
	"io"
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
		for _, want := range []string{"1 agents, 1 endpoints\n", "endpoint on port " + port + ": 1 connections, 0 waiting\n",
			fmt.Sprintf("  client %s via agent ", client), fmt.Sprintf(": %d bytes to the agent, %d from it\n", sent, sent)} {
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
