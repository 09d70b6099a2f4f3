package tunnel_test

import (
	"crypto/tls"
	"io"
	"net"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/testutil"
	"tcprelay/server"
	"tcprelay/tunnel"
)

// TestBurstPastTheHandshakeLimit: a burst of outside clients makes the
// agent open a data connection for each at once, from its one address,
// far past the relay's limit of connections in handshake for one source
// (8 here, 16 in a burst). Every client is served, with its own bytes: a
// data connection the relay would turn away is served all the same once it
// shows an Attach, and one the relay closes unread is dialed again. Before,
// the relay answered such an Attach with an Error frame, which reached the
// agent's server as its client's first bytes, and the client waited for the
// pickup timeout.
func TestBurstPastTheHandshakeLimit(t *testing.T) {
	check.Leaks(t)
	for _, useTLS := range []bool{false, true} {
		t.Run(map[bool]string{false: "tcp", true: "tls"}[useTLS], func(t *testing.T) {
			var cert *tls.Certificate
			cfg := tunnel.Config{DisablePool: true}
			if useTLS {
				c, pool := testutil.SelfSignedCert(t)
				cert, cfg.TLS = &c, &tls.Config{RootCAs: pool}
			}
			// 400 descriptors: 40 handshakes in all, 8 from one source.
			relay := startRelayAs(t, "127.0.0.1:0", server.Config{MaxFDs: 400, PickupTimeout: 5 * time.Second}, cert)
			ln := listen(t, relay.Addr, cfg)
			testutil.Serve(t, ln, testutil.Echo)
			atOnce(t, 60, func(i int) error {
				return echoBack(ln.Addr().String(), byte(i), 1000+i)
			})
		})
	}
}

// TestAttachDialedAgain: a data connection for an announced client that
// fails, here closed before its TLS handshake as a relay at its limits
// closes one unread, is dialed again, and the client is served.
func TestAttachDialedAgain(t *testing.T) {
	check.Leaks(t)
	cert, pool := testutil.SelfSignedCert(t)
	relay := startRelayAs(t, "127.0.0.1:0", server.Config{}, &cert)
	// Connection 0 is the control connection, forwarded; 1 to 3, the first
	// data connections, are closed unread.
	proxy := testutil.NewCuttingProxy(t, relay.Addr, 4, func(i int, agent net.Conn, target string) {
		if i > 0 {
			return
		}
		c, err := net.Dial("tcp", target)
		if err != nil {
			return
		}
		defer c.Close()
		go io.Copy(c, agent)
		io.Copy(agent, c)
	})
	ln := listen(t, proxy.Addr(), tunnel.Config{TLS: &tls.Config{RootCAs: pool}, DisablePool: true})
	testutil.Serve(t, ln, testutil.Echo)
	if err := echoBack(ln.Addr().String(), 1, 1000); err != nil {
		t.Fatal(err)
	}
	if n := proxy.Seen(); n != 5 {
		t.Errorf("the proxy saw %d connections; want 5: the control connection, three data connections closed and the fourth", n)
	}
}
