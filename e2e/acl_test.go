package e2e

import (
	"bytes"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"tcprelay/internal/child"
)

// TestAccessListsWithNC: an agents file gives a tenant allow= and deny=,
// and its agent narrows them with -deny. Real nc clients from several
// loopback addresses: those allowed are echoed, the others are closed
// without a byte; the relay counts them in /metrics and the access log
// says "denied".
func TestAccessListsWithNC(t *testing.T) {
	requireNC(t)
	e := newEnv(t)
	keyFile, key := e.agentKey("web")
	agents := writeAgents(t, "", "web "+key+" allow=127.0.0.0/29 deny=127.0.0.3\n")
	maddr := child.Addr(freePort(t))
	accessLog := filepath.Join(t.TempDir(), "access.log")
	r := e.startRelayWith(nil, nil, "-agents", agents, "-metrics-addr", maddr, "-access-log", accessLog)
	_, pub := e.startAgent(echoBin, []string{"-key", keyFile, "-deny", "127.0.0.4", "-allow", "127.0.0.0/8",
		"127.0.0.1", strconv.Itoa(r.port)}, "127.0.0.1")

	ncFrom := func(src string) *proc {
		p := e.start("nc", []string{"-N", "-s", src, "127.0.0.1", strconv.Itoa(pub)}, procOpts{stdin: strings.NewReader("hello from " + src + "\n")})
		p.mustExit(clientTimeout)
		return p
	}
	for _, src := range []string{"127.0.0.1", "127.0.0.2"} {
		if p := ncFrom(src); !bytes.Equal(p.Stdout.Bytes(), []byte("hello from "+src+"\n")) {
			t.Errorf("nc from %s, allowed: got %q, want its line echoed", src, p.Stdout.Bytes())
		}
	}
	// Denied by the agents file, by the agent, and outside the file's
	// allow= (which the agent's wider -allow does not widen).
	for _, src := range []string{"127.0.0.3", "127.0.0.4", "127.0.0.9"} {
		if p := ncFrom(src); len(p.Stdout.Bytes()) != 0 {
			t.Errorf("nc from %s, denied: got %q, want nothing", src, p.Stdout.Bytes())
		}
	}
	if n := metric(t, maddr, "tcprelay_clients_denied_total"); n != 3 {
		t.Errorf("tcprelay_clients_denied_total %d, want 3", n)
	}
	r.stop()
	denied := map[string]bool{}
	for _, rec := range readAccessLog(t, accessLog) {
		if rec["reason"] == "denied" {
			denied[strings.Split(rec["client"].(string), ":")[0]] = true
		}
	}
	if len(denied) != 3 || !denied["127.0.0.3"] || !denied["127.0.0.4"] || !denied["127.0.0.9"] {
		t.Errorf("the access log's denied clients: %v, want 127.0.0.3, .4 and .9", denied)
	}
}
