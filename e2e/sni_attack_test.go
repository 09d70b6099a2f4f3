package e2e

import (
	"io"
	"net"
	"net/http"
	"strconv"
	"testing"
	"time"

	"tcprelay/internal/child"
)

// The attacks and demands of a review of issue 19 (names on a shared TLS
// port) that need the real binaries. Each test says what it shows; those
// marked FAILS fail on the code they were written against.

// TestSNIAttackMetricsWithAgentsOn443: a relay with -sni-addr and its own
// TLS (here -tls-self-signed) serves agents on the shared port, as
// OPERATING.md's "Agents on 443 alone" says. Its /metrics must answer
// like any relay's, and the relay must go on serving agents after a
// scrape. On main the first scrape deadlocks the relay (takeStatus holds
// the relay's lock while it asks each control listener for its address,
// and the shared port's control listener takes that lock to answer): the
// scrape never answers, and no agent can register after it. FAILS on
// main.
func TestSNIAttackMetricsWithAgentsOn443(t *testing.T) {
	e := newEnv(t)
	maddr := child.Addr(freePort(t))
	r := e.startSNIRelay(nil, "-tls-self-signed", "-state-dir", t.TempDir(), "-metrics-addr", maddr)
	fp := fingerprint(t, r.relay)
	sni := strconv.Itoa(r.sni)
	e.startNamed(echoBin, r, fqdn("before"), nil, "-tls-fingerprint", fp, "-hostname", "before", "127.0.0.1", sni)

	hc := &http.Client{Timeout: 5 * time.Second}
	var resp *http.Response
	var err error
	if !child.WaitFor(readyTimeout, func() bool {
		resp, err = hc.Get("http://" + maddr + "/metrics")
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			return true // an answer that never comes: no use retrying
		}
		return err == nil
	}) || err != nil {
		r.kill() // a deadlocked relay does not stop on SIGTERM
		t.Fatalf("GET /metrics of a relay serving agents on its shared port: %v (the relay is deadlocked)", err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %s", resp.Status)
	}
	// Still alive: a new agent registers through the shared port.
	e.startNamed(echoBin, r, fqdn("after"), nil, "-tls-fingerprint", fp, "-hostname", "after", "127.0.0.1", sni)
}

// TestSNIAttackBindOn443: `relay -bind 127.0.0.1` binds the control port
// and the public ports on 127.0.0.1 only (OPERATING.md: "IP address for
// the control port and the public ports"). An agent that registers a port
// (not a name) through the shared TLS port gets it bound on every
// interface instead: the shared port's control listener has no IP for
// the session to bind to. On a host whose -bind keeps tunnels off an
// internal interface, an agent on 443 puts them there. It failed before the fix.
func TestSNIAttackBindOn443(t *testing.T) {
	e := newEnv(t)
	r := e.startSNIRelay(nil, "-tls-self-signed", "-state-dir", t.TempDir())
	fp := fingerprint(t, r.relay)
	for _, tc := range []struct {
		how  string
		args []string
	}{
		{"the control port", []string{"-tls-fingerprint", fp, "127.0.0.1", strconv.Itoa(r.port)}},
		{"the shared port", []string{"-tls-fingerprint", fp, "127.0.0.1", strconv.Itoa(r.sni)}},
	} {
		_, port := e.startAgent(echoBin, tc.args, "127.0.0.1")
		// 127.0.0.2 is this host, but not the address the relay binds.
		c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.2", strconv.Itoa(port)), 2*time.Second)
		if err == nil {
			c.Close()
			t.Errorf("an agent on %s: its public port %d answers on 127.0.0.2, outside -bind 127.0.0.1", tc.how, port)
		}
	}
}
