package tunnel_test

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/testutil"
	"tcprelay/server"
	"tcprelay/tunnel"
)

// fakeServer listens on loopback and serves each connection with handle.
func fakeServer(t *testing.T, handle func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	testutil.Serve(t, ln, handle)
	return ln.Addr().String()
}

// TestNotARelay: an agent pointed at something that is not a relay's
// control port says so, within a few seconds, naming what it found.
func TestNotARelay(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	publicPort := listen(t, relay.Addr, tunnel.Config{})
	testutil.Serve(t, publicPort, testutil.Echo)
	cert, roots := testutil.SelfSignedCert(t)
	tlsRelay := testutil.StartTLSRelay(t, server.Config{}, cert)

	httpSrv := &http.Server{Handler: http.NotFoundHandler()}
	httpLn, _ := net.Listen("tcp", "127.0.0.1:0")
	go httpSrv.Serve(httpLn)
	defer httpSrv.Close()

	for _, tc := range []struct {
		name, addr string
		tls        *tls.Config
		want       string
	}{
		{"a tunnel's public port", publicPort.Addr().String(), nil, "sent back what the agent sent"},
		// An HTTP server waits for the end of a request line: silence.
		{"an HTTP server", httpLn.Addr().String(), nil, "does not look like a relay's control port"},
		{"sshd", fakeServer(t, func(c net.Conn) { c.Write([]byte("SSH-2.0-OpenSSH_9.2\r\n")); io.Copy(io.Discard, c) }), nil, `answered "SSH-2.0-OpenSSH_9.2`},
		{"redis", fakeServer(t, func(c net.Conn) { c.Read(make([]byte, 64)); c.Write([]byte("-ERR unknown command 'TRLY'\r\n")) }), nil, `answered "-ERR unknown command`},
		{"a silent server", fakeServer(t, func(c net.Conn) { io.Copy(io.Discard, c) }), nil, "no answer from"},
		{"a TLS relay, without -tls", tlsRelay.Addr, nil, "this relay speaks TLS: give the agent -tls"},
		{"a plain relay, with -tls", relay.Addr, &tls.Config{RootCAs: roots}, "the relay does not speak TLS"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := tunnel.Config{TLS: tc.tls, DialTimeout: 2 * time.Second, Logger: testutil.Logger(t)}
			start := time.Now()
			_, err := cfg.Listen(testutil.Context(t), tc.addr)
			took := time.Since(start)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Listen at %s: %v; want an error saying %q", tc.name, err, tc.want)
			}
			if tc.tls == nil && !errors.Is(err, tunnel.ErrProtocol) && !errors.Is(err, tunnel.ErrUnsupported) {
				t.Errorf("error %v is not an ErrProtocol", err)
			}
			if took > 3*time.Second {
				t.Errorf("it took %v to tell", took)
			}
			t.Logf("%s: %v (in %v)", tc.name, err, took.Round(time.Millisecond))
		})
	}
}
