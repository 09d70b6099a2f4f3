package server_test

import (
	"bytes"
	"fmt"
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
	if !strings.Contains(status.String(), "1 agents") || !strings.Contains(status.String(), "on port "+port) {
		t.Errorf("status view lacks the agent or its tunnel on port %s:\n%s", port, status.String())
	}
}
