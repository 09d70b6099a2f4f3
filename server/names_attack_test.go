package server_test

import (
	"crypto/tls"
	"fmt"
	"net"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/proto"
	"tcprelay/internal/testutil"
	"tcprelay/server"
	"tcprelay/tunnel"
)

// TestNamesControlHandoffForgetsConns: a connection that the shared port
// hands to the control listener (a ClientHello offering the ALPN
// "tcprelay", which anyone can send) must not stay in the relay's set of
// tracked connections once it is closed. Before the fix, the shared port's
// accept loop tracked the raw socket, the control listener the TLS conn
// over it, and only the latter was forgotten: every such connection, a
// stranger's or an agent's, left one entry (a closed *net.TCPConn)
// behind for the life of the process.
func TestNamesControlHandoffForgetsConns(t *testing.T) {
	check.Leaks(t)
	relay, names := testutil.StartNamesRelay(t, server.Config{HandshakeTimeout: 2 * time.Second})
	testutil.ServeNamesControl(t, relay)

	const n = 100
	for i := range n {
		raw := testutil.Dial(t, names)
		c := tls.Client(raw, &tls.Config{ServerName: "x.example", NextProtos: []string{proto.ALPN}, InsecureSkipVerify: true})
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if err := c.Handshake(); err != nil {
			t.Fatalf("connection %d: the relay's own TLS handshake on the shared port: %v", i, err)
		}
		c.Close() // a stranger that goes away after the handshake
	}
	check.Eventually(t, 10*time.Second, func() error {
		if h := relay.Stats().Handshaking; h != 0 {
			return fmt.Errorf("%d handshakes still running", h)
		}
		if got := server.TrackedConns(relay.Server); got != 0 {
			return fmt.Errorf("%d connections still tracked after %d closed handoffs, want 0", got, n)
		}
		return nil
	})
}

// TestNamesPortAgentKeepsBindAddress: -bind (the control listener's IP)
// bounds the public ports of every agent, as Serve's doc says ("Public
// listeners bind to the same IP address as ln"). An agent that comes in on
// the shared port and asks for a port gets one bound on every interface
// instead: the handoff listener's address is not a *net.TCPAddr, so its
// sessions have no bind IP. It failed before the fix.
func TestNamesPortAgentKeepsBindAddress(t *testing.T) {
	check.Leaks(t)
	relay, names := testutil.StartNamesRelay(t, server.Config{}) // control and shared port on 127.0.0.1
	pin := testutil.ServeNamesControl(t, relay)
	for _, tc := range []struct {
		name, addr string
		tls        *tls.Config
	}{{"control port", relay.Addr, nil}, {"shared port", names, pin}} {
		t.Run(tc.name, func(t *testing.T) {
			ln, err := (&tunnel.Config{TLS: tc.tls, Logger: testutil.Logger(t)}).Listen(testutil.Context(t), tc.addr)
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			testutil.Serve(t, ln, testutil.Echo)
			_, port, _ := net.SplitHostPort(ln.Addr().String())
			// 127.0.0.2 is this host too, but not the address the relay
			// was told to bind.
			c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.2", port), 2*time.Second)
			if err == nil {
				c.Close()
				t.Fatalf("public port %s of an agent that came through the %s is reachable on 127.0.0.2: bound on every interface, not on the relay's 127.0.0.1", port, tc.name)
			}
		})
	}
}
