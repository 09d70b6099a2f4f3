package tunnel_test

import (
	"crypto/tls"
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

	var wg sync.WaitGroup
	errs := make(chan error, 10)
	for i := range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- echoRoundTrip(ln.Addr().String(), int64(100+i), 512<<10)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
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
	testutil.Serve(t, ln, testutil.Echo)
	for i := range 40 { // more than the pool holds: it refills
		if err := echoRoundTrip(ln.Addr().String(), int64(i), 1024); err != nil {
			t.Fatal(err)
		}
	}
	m := testutil.Metrics(t, relay.Server)
	full, resumed := m["tcprelay_tls_handshakes_total"]-m["tcprelay_tls_resumed_total"], m["tcprelay_tls_resumed_total"]
	t.Logf("%d TLS handshakes: %d full, %d resumed", full+resumed, full, resumed)
	if resumed < 32 || full > 2 {
		t.Errorf("%d full handshakes and %d resumed; want the control connection's full one (or two) and the data connections' resumed", full, resumed)
	}
}
