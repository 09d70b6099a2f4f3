package tunnel_test

import (
	"errors"
	"net"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/testutil"
	"tcprelay/server"
	"tcprelay/tunnel"
)

// TestWaitForRelayRetriesCutHandshake: at start-up, a connection that dies
// in the middle of the handshake (closed, reset, or silent: a relay that
// evicts handshakes under a flood) is retried with the backoff, like a
// relay that cannot be reached, instead of failing Listen.
func TestWaitForRelayRetriesCutHandshake(t *testing.T) {
	for _, tc := range testutil.HandshakeCuts {
		t.Run(tc.Name, func(t *testing.T) {
			check.Leaks(t)
			relay := testutil.StartRelay(t, server.Config{})
			const n = 2
			c := testutil.NewCuttingProxy(t, relay.Addr, n, func(_ int, agent net.Conn, target string) { tc.Cut(agent, target) })
			cfg := tunnel.Config{WaitForRelay: true, MaxBackoff: 100 * time.Millisecond,
				DialTimeout: time.Second, Logger: testutil.Logger(t)}
			ln, err := cfg.Listen(testutil.Context(t), c.Addr())
			if err != nil {
				t.Fatalf("Listen after %d cut handshakes: %v; want it to retry until the relay answers", n, err)
			}
			defer ln.Close()
			if got := c.Seen(); got <= n {
				t.Fatalf("the cutter saw %d connections, want more than the %d it cut", got, n)
			}
			testutil.Serve(t, ln, testutil.Echo)
			if err := testutil.EchoCheck(ln.Addr().String(), []byte("after "+tc.Name), 5*time.Second); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestWaitForRelayRefusalsAreFinal: what the relay itself refuses, in its
// own words, is not retried: Listen fails at once even with WaitForRelay.
func TestWaitForRelayRefusalsAreFinal(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{Secret: "s3cret", PortMin: 20000, PortMax: 20010})
	for _, tc := range []struct {
		name string
		cfg  tunnel.Config
		want error
	}{
		{"wrong secret", tunnel.Config{Secret: "wrong"}, tunnel.ErrAuthFailed},
		{"required port outside the range", tunnel.Config{Secret: "s3cret", Port: 20011, PortRequired: true}, tunnel.ErrPortUnavailable},
	} {
		tc.cfg.WaitForRelay = true
		tc.cfg.Logger = testutil.Logger(t)
		start := time.Now()
		ln, err := tc.cfg.Listen(testutil.Context(t), relay.Addr)
		if err == nil {
			ln.Close()
			t.Errorf("%s: Listen succeeded", tc.name)
			continue
		}
		if !errors.Is(err, tc.want) || time.Since(start) > 3*time.Second {
			t.Errorf("%s: %v after %v; want %v at once", tc.name, err, time.Since(start), tc.want)
		}
	}
}
