package server_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/testutil"
	"tcprelay/server"
)

// accessLines decodes the access log's lines so far.
func accessLines(t *testing.T, log *testutil.LockedBuffer) []map[string]any {
	t.Helper()
	var recs []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(log.String()), "\n") {
		if line == "" {
			continue
		}
		var rec map[string]any
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("access log line %q: %v", line, err)
		}
		recs = append(recs, rec)
	}
	return recs
}

// TestAccessLog: one JSON line per outside connection when it ends, with
// who served it, the bytes each way and why it ended (the client closed,
// the agent closed, refused at a limit), and one per agent session, with
// its ports.
func TestAccessLog(t *testing.T) {
	check.Leaks(t)
	var log testutil.LockedBuffer
	relay := testutil.StartRelay(t, server.Config{AccessLog: &log, MaxConnsPerTunnel: 1})
	agent := testutil.NewRawAgent(t, relay.Addr, "")
	pub := agent.Listen(t, 0)
	_, port, _ := net.SplitHostPort(pub)
	p, _ := strconv.Atoi(port)
	portNum := float64(p)

	// A client that sends 5 bytes, reads 3 back and closes first.
	client := testutil.Dial(t, pub)
	client.Write([]byte("hello"))
	in := agent.ExpectIncoming(t)
	data := agent.Attach(t, in.Token)
	buf := make([]byte, 5)
	data.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(data, buf); err != nil {
		t.Fatal(err)
	}
	// A second client, past the tunnel's limit of 1, is refused.
	testutil.ReadAllTimeout(t, testutil.Dial(t, pub), 5*time.Second)
	data.Write([]byte("abc"))
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(client, buf[:3]); err != nil {
		t.Fatal(err)
	}
	client.Close()
	testutil.ReadAllTimeout(t, data, 5*time.Second) // the close crossed the relay
	data.Close()

	// A client whose agent closes first, once the first is gone.
	check.Eventually(t, 5*time.Second, func() error {
		if n := relay.Stats().Clients; n != 0 {
			return fmt.Errorf("%d clients", n)
		}
		return nil
	})
	client2 := testutil.Dial(t, pub)
	in = agent.ExpectIncoming(t)
	data = agent.Attach(t, in.Token)
	data.Close()
	testutil.ReadAllTimeout(t, client2, 5*time.Second)
	client2.Close()
	check.Eventually(t, 5*time.Second, func() error {
		if n := relay.Stats().Clients; n != 0 {
			return fmt.Errorf("%d clients", n)
		}
		return nil
	})
	agent.Conn.Close()

	var recs []map[string]any
	check.Eventually(t, 5*time.Second, func() error {
		recs = accessLines(t, &log)
		if len(recs) < 4 {
			return fmt.Errorf("%d access log lines, want 4:\n%s", len(recs), log.String())
		}
		return nil
	})
	// Lines come as things end; the refusal and the first client's end
	// race, so they are found by what they say.
	byReason := map[string]map[string]any{}
	for i, r := range recs {
		byReason[r["event"].(string)+" "+r["reason"].(string)] = r
		if _, err := time.Parse(time.RFC3339Nano, r["start"].(string)); err != nil {
			t.Errorf("line %d: start %v: %v", i+1, r["start"], err)
		}
	}
	for _, want := range []string{"connection refused: tunnel at its connection limit", "connection client closed",
		"connection agent closed", "session agent closed"} {
		if byReason[want] == nil {
			t.Errorf("no line for %s in:\n%s", want, log.String())
		}
	}
	if len(recs) != 4 || recs[3]["event"] != "session" {
		t.Errorf("%d lines, the session's not last:\n%s", len(recs), log.String())
	}
	if r := byReason["connection client closed"]; r["bytes_in"] != 5.0 || r["bytes_out"] != 3.0 || r["port"] != portNum ||
		r["client"] != client.LocalAddr().String() || r["agent"] == "" {
		t.Errorf("the first client's line: %v, want 5 bytes in, 3 out, port %s, its address and the agent", r, port)
	}
	if r := recs[3]; len(r["ports"].([]any)) != 1 || r["ports"].([]any)[0] != portNum {
		t.Errorf("the session's line: %v, want its port %s", r, port)
	}
}
