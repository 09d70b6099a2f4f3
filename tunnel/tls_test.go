package tunnel_test

import (
	"crypto/tls"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/testutil"
	"tcprelay/server"
	"tcprelay/tunnel"
)

func TestTLSWithCA(t *testing.T) {
	check.Leaks(t)
	cert, pool := testutil.SelfSignedCert(t)
	relay := testutil.StartTLSRelay(t, server.Config{}, cert)
	ln := listen(t, relay.Addr, tunnel.Config{TLS: &tls.Config{RootCAs: pool}})
	testutil.Serve(t, ln, testutil.Echo)

	atOnce(t, 10, func(i int) error {
		return echoRoundTrip(ln.Addr().String(), int64(100+i), 512<<10)
	})
}

func TestTLSPinned(t *testing.T) {
	check.Leaks(t)
	cert, _ := testutil.SelfSignedCert(t)
	relay := testutil.StartTLSRelay(t, server.Config{}, cert)

	pin, err := tunnel.PinnedTLS(tunnel.Fingerprint(cert.Certificate[0]))
	if err != nil {
		t.Fatal(err)
	}
	ln := listen(t, relay.Addr, tunnel.Config{TLS: pin})
	testutil.Serve(t, ln, testutil.Echo)
	if err := echoRoundTrip(ln.Addr().String(), 5, 64<<10); err != nil {
		t.Fatal(err)
	}

	other, _ := testutil.SelfSignedCert(t)
	wrong, err := tunnel.PinnedTLS(tunnel.Fingerprint(other.Certificate[0]))
	if err != nil {
		t.Fatal(err)
	}
	cfg := tunnel.Config{TLS: wrong, Logger: testutil.Logger(t)}
	if _, err := cfg.Listen(testutil.Context(t), relay.Addr); err == nil || !strings.Contains(err.Error(), "fingerprint") {
		t.Fatalf("Listen with the wrong pin: %v, want a fingerprint mismatch", err)
	}
	for _, bad := range []string{"", "abc", strings.Repeat("zz", 32)} {
		if _, err := tunnel.PinnedTLS(bad); err == nil {
			t.Errorf("PinnedTLS(%q) accepted", bad)
		}
	}
}

func TestTLSRefusals(t *testing.T) {
	check.Leaks(t)
	cert, _ := testutil.SelfSignedCert(t)
	tlsRelay := testutil.StartTLSRelay(t, server.Config{HandshakeTimeout: time.Second}, cert)
	plainRelay := testutil.StartRelay(t, server.Config{})
	cases := []struct {
		name  string
		relay string
		cfg   tunnel.Config
		want  string
	}{
		{"untrusted certificate", tlsRelay.Addr, tunnel.Config{TLS: &tls.Config{}}, "certificate"},
		{"plain agent, TLS relay", tlsRelay.Addr, tunnel.Config{DialTimeout: 3 * time.Second}, "this relay speaks TLS"},
		{"TLS agent, plain relay", plainRelay.Addr, tunnel.Config{TLS: &tls.Config{}}, "the relay does not speak TLS"},
	}
	for _, tc := range cases {
		tc.cfg.Logger = testutil.Logger(t)
		ln, err := tc.cfg.Listen(testutil.Context(t), tc.relay)
		if err == nil {
			ln.Close()
			t.Errorf("%s: Listen succeeded", tc.name)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error mentioning %q", tc.name, err, tc.want)
		}
	}
}

// TestTLSResumesSessions: after the control connection's full handshake,
// the agent's other connections to the relay (the pool's pre-opened data
// connections, and their refills) resume its TLS session, pinned or
// not, instead of a full handshake each.
func TestTLSResumesSessions(t *testing.T) {
	check.Leaks(t)
	cert, _ := testutil.SelfSignedCert(t)
	relay := testutil.StartTLSRelay(t, server.Config{}, cert)
	pin, err := tunnel.PinnedTLS(tunnel.Fingerprint(cert.Certificate[0]))
	if err != nil {
		t.Fatal(err)
	}
	ln := listen(t, relay.Addr, tunnel.Config{TLS: pin})
	hs := serveNotingHandshakes(t, ln)
	held := holdClients(t, ln.Addr().String(), 40) // more than the pool holds: it refills
	for _, c := range held {
		c.Close()
	}
	m := testutil.Metrics(t, relay.Server)
	full, resumed := m["tcprelay_tls_handshakes_total"]-m["tcprelay_tls_resumed_total"], m["tcprelay_tls_resumed_total"]
	t.Logf("%d TLS handshakes: %d full, %d resumed", full+resumed, full, resumed)
	if resumed < 39 || full > 2 {
		t.Errorf("%d full handshakes and %d resumed; want the control connection's full one (or two) and the data connections' resumed", full, resumed)
	}
	if n := m["tcprelay_tls_classical_total"]; n != 0 {
		t.Errorf("%d full handshakes without a post-quantum key exchange; want none", n)
	}
	// The data connections resumed with X25519 alone: the session's key,
	// from a post-quantum full handshake, is in all of theirs.
	if got := hs.get(); got.resumedX25519 != 40 {
		t.Errorf("clients served on: %+v; want all 40 on resumed sessions with X25519 alone", got)
	}
}

// A relay that no longer resumes the agent's session (its ticket keys
// changed) makes a data connection's handshake a full one. Offered X25519
// alone for resumption, that one is not post-quantum: the agent must not
// serve a client on it, but dial again with its full key exchanges.
func TestTLSRefusedSessionStaysPostQuantum(t *testing.T) {
	check.Leaks(t)
	cert, pool := testutil.SelfSignedCert(t)
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	scfg := &tls.Config{Certificates: []tls.Certificate{cert}}
	scfg.SetSessionTicketKeys([][32]byte{{1}})
	relay := testutil.ServeRelay(t, tls.NewListener(inner, scfg), server.Config{})
	ln := listen(t, relay.Addr, tunnel.Config{TLS: &tls.Config{RootCAs: pool}})
	hs := serveNotingHandshakes(t, ln)
	for _, c := range holdClients(t, ln.Addr().String(), 1) {
		c.Close()
	}
	scfg.SetSessionTicketKeys([][32]byte{{2}}) // the sessions the agent holds are refused from now on
	held := holdClients(t, ln.Addr().String(), 48)
	for _, c := range held {
		c.Close()
	}
	got := hs.get()
	m := testutil.Metrics(t, relay.Server)
	t.Logf("clients served on: %+v; relay: %d handshakes, %d resumed, %d full without post-quantum", got,
		m["tcprelay_tls_handshakes_total"], m["tcprelay_tls_resumed_total"], m["tcprelay_tls_classical_total"])
	if got.classical != 0 || got.total() != 49 {
		t.Errorf("clients served on: %+v; want 49, none on a full handshake without post-quantum key exchange", got)
	}
	if m["tcprelay_tls_classical_total"] == 0 {
		t.Error("no data connection offered the refused session: the test proves nothing")
	}
}

// handshakeCounts counts the clients served on each kind of data connection.
type handshakeCounts struct {
	resumedX25519, resumedOther, fullPQ, classical, notTLS int
}

func (h handshakeCounts) total() int {
	return h.resumedX25519 + h.resumedOther + h.fullPQ + h.classical + h.notTLS
}

type handshakeLog struct {
	mu sync.Mutex
	n  handshakeCounts
}

func (h *handshakeLog) get() handshakeCounts {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.n
}

// serveNotingHandshakes serves ln with testutil.Echo, and counts how the
// TLS handshake of each client's data connection went.
func serveNotingHandshakes(t *testing.T, ln *tunnel.Listener) *handshakeLog {
	h := &handshakeLog{}
	testutil.Serve(t, ln, func(c net.Conn) {
		tc, ok := c.(*tunnel.Conn).NetConn().(*tls.Conn)
		var cs tls.ConnectionState
		if ok {
			cs = tc.ConnectionState()
		}
		h.mu.Lock()
		switch {
		case !ok:
			h.n.notTLS++
		case cs.DidResume && cs.CurveID == tls.X25519:
			h.n.resumedX25519++
		case cs.DidResume:
			h.n.resumedOther++
		case cs.CurveID == tls.X25519MLKEM768:
			h.n.fullPQ++
		default:
			h.n.classical++
		}
		h.mu.Unlock()
		testutil.Echo(c)
	})
	return h
}

// holdClients connects n clients to addr, each echoed a byte, and returns
// them open: n data connections at once.
func holdClients(t *testing.T, addr string, n int) []net.Conn {
	t.Helper()
	var conns []net.Conn
	for range n {
		c, err := net.DialTimeout("tcp", addr, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(10 * time.Second))
		b := []byte{'x'}
		if _, err := c.Write(b); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, b); err != nil {
			t.Fatalf("client %d: %v", len(conns), err)
		}
	}
	return conns
}
