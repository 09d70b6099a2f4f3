package transport

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/testutil"
)

// relayListener is Listen on loopback, with TLS if cert is set; accepted
// conns go to the channel, and are closed when the test ends.
func relayListener(t *testing.T, cert *tls.Certificate) (addr string, conns chan net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var cfg *tls.Config
	if cert != nil {
		cfg = &tls.Config{Certificates: []tls.Certificate{*cert}}
	}
	conns = make(chan net.Conn, 10)
	l := Listen(ln, cfg)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				close(conns)
				return
			}
			conns <- c
		}
	}()
	t.Cleanup(func() {
		l.Close()
		for c := range conns {
			c.Close()
		}
	})
	return ln.Addr().String(), conns
}

func wsDial(t *testing.T, rawURL string, tlsCfg *tls.Config) (net.Conn, error) {
	t.Helper()
	addr, u, err := ParseRelay(rawURL)
	if err != nil {
		t.Fatal(err)
	}
	d, err := WebSocket(u, tlsCfg, Direct)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel() // as the tunnel does once its handshake is done
	return d(ctx, addr)
}

// wsPair dials rawURL while the relay's end reads, as the relay does at
// once: the upgrade is answered inside the relay's first Read.
func wsPair(t *testing.T, conns chan net.Conn, rawURL string, tlsCfg *tls.Config) (agent, relay net.Conn, err error) {
	t.Helper()
	type result struct {
		c   net.Conn
		err error
	}
	done := make(chan result, 1)
	go func() {
		c, err := wsDial(t, rawURL, tlsCfg)
		done <- result{c, err}
	}()
	select {
	case relay = <-conns:
		t.Cleanup(func() { relay.Close() })
	case r := <-done:
		return nil, nil, r.err
	}
	relay.SetDeadline(time.Now().Add(5 * time.Second))
	relay.Read(nil) // decides, and answers the upgrade
	r := <-done
	return r.c, relay, r.err
}

func accepted(t *testing.T, conns chan net.Conn) *Conn {
	t.Helper()
	select {
	case c := <-conns:
		t.Cleanup(func() { c.Close() })
		if tc, ok := c.(*TLSConn); ok {
			return tc.Conn
		}
		return c.(*Conn)
	case <-time.After(5 * time.Second):
		t.Fatal("nothing accepted")
	}
	return nil
}

func exchange(t *testing.T, agent, relay net.Conn, msg string) {
	t.Helper()
	relay.SetDeadline(time.Now().Add(5 * time.Second))
	agent.SetDeadline(time.Now().Add(5 * time.Second))
	wrote := make(chan error, 1)
	go func() { // a TLS agent's first write waits for the relay's first read
		_, err := io.WriteString(agent, msg)
		wrote <- err
	}()
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(relay, buf); err != nil || string(buf) != msg {
		t.Fatalf("relay read %q, %v; want %q", buf, err, msg)
	}
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(relay, "re:"+msg); err != nil {
		t.Fatal(err)
	}
	buf = make([]byte, len("re:"+msg))
	if _, err := io.ReadFull(agent, buf); err != nil || string(buf) != "re:"+msg {
		t.Fatalf("agent read %q, %v; want %q", buf, err, "re:"+msg)
	}
}

// TestWebSocketCarriesTheStream: an agent's ws:// conn reaches the relay's
// listener, which tells it from the native protocol and passes the bytes
// both ways; neither end exposes a socket to splice (the bytes on it are
// framed), and the relay's conn cannot half-close.
func TestWebSocketCarriesTheStream(t *testing.T) {
	check.Leaks(t)
	addr, conns := relayListener(t, nil)
	agent, rc, err := wsPair(t, conns, "ws://"+addr+"/relay", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer agent.Close()
	relay := rc.(*Conn)
	if _, ok := agent.(syscall.Conn); ok {
		t.Error("the agent's WebSocket conn is a syscall.Conn: a copier would splice past the framing")
	}
	if agent.RemoteAddr().String() != addr {
		t.Errorf("RemoteAddr = %s, want %s (the address dialed)", agent.RemoteAddr(), addr)
	}
	exchange(t, agent, relay, "TRLY and then some")
	if !relay.WebSocket() {
		t.Error("the relay's conn does not say it is a WebSocket")
	}
	if _, err := relay.SyscallConn(); err == nil {
		t.Error("the relay's WebSocket conn gave its socket to splice")
	}
	if err := relay.CloseWrite(); !errors.Is(err, ErrNoHalfClose) {
		t.Errorf("CloseWrite over WebSocket = %v, want ErrNoHalfClose", err)
	}
	big := strings.Repeat("0123456789abcdef", 1<<14) // many frames, both ways
	exchange(t, agent, relay, big)

	// Close is seen as EOF by the peer, after every byte sent before it.
	io.WriteString(agent, "last")
	agent.Close()
	got, err := io.ReadAll(relay)
	if string(got) != "last" || err != nil {
		t.Errorf("after the agent's Close the relay read %q, %v; want \"last\" then EOF", got, err)
	}
}

// TestNativePassesThroughUntouched: a native agent's bytes arrive as sent,
// the first ones (read to decide) included, and once they are read the
// relay's conn gives its socket to splice; a half-close reaches the agent.
func TestNativePassesThroughUntouched(t *testing.T) {
	check.Leaks(t)
	addr, conns := relayListener(t, nil)
	agent, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer agent.Close()
	relay := accepted(t, conns)
	if _, err := relay.SyscallConn(); err == nil {
		t.Error("the socket was given before the first bytes were read")
	}
	io.WriteString(agent, "TRLY\x01rest")
	relay.SetDeadline(time.Now().Add(5 * time.Second))
	// As the relay reads: exact lengths, the preamble first.
	pre := make([]byte, 5)
	if _, err := io.ReadFull(relay, pre); err != nil || string(pre) != "TRLY\x01" {
		t.Fatalf("preamble %q, %v", pre, err)
	}
	if _, err := relay.SyscallConn(); err != nil {
		t.Errorf("a plain native conn with nothing buffered does not give its socket: %v", err)
	}
	rest := make([]byte, 4)
	if _, err := io.ReadFull(relay, rest); err != nil || string(rest) != "rest" {
		t.Fatalf("then %q, %v", rest, err)
	}
	if relay.WebSocket() {
		t.Error("a native conn says it is a WebSocket")
	}
	if err := relay.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	agent.SetDeadline(time.Now().Add(5 * time.Second))
	if b, err := io.ReadAll(agent); err != nil || len(b) != 0 {
		t.Errorf("after CloseWrite the agent read %q, %v; want EOF", b, err)
	}

	// A stream shorter than the bytes that decide: what came, then EOF.
	agent2, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	relay2 := accepted(t, conns)
	io.WriteString(agent2, "TR")
	agent2.Close()
	relay2.SetDeadline(time.Now().Add(5 * time.Second))
	if b, err := io.ReadAll(relay2); string(b) != "TR" || err != nil {
		t.Errorf("short stream: read %q, %v; want \"TR\" then EOF", b, err)
	}
}

// TestWSSVerifiesTheRelayAsNativeTLSDoes: wss:// runs TLS with the agent's
// configuration: a relay certificate it does not trust is refused, a
// trusted one (by CA, or by pin) carries the stream, and the relay's conn
// over WebSocket offers no TLS state to bind a session to (its TLS may end
// at a reverse proxy); a native TLS agent at the same listener still gets
// one.
func TestWSSVerifiesTheRelayAsNativeTLSDoes(t *testing.T) {
	check.Leaks(t)
	cert, roots := testutil.SelfSignedCert(t)
	addr, conns := relayListener(t, &cert)
	_, port, _ := net.SplitHostPort(addr)

	if c, rc, err := wsPair(t, conns, "wss://localhost:"+port+"/", nil); err == nil {
		c.Close()
		t.Fatal("the system's roots trusted the test certificate")
	} else if !strings.Contains(err.Error(), "TLS handshake with relay wss://localhost:"+port+"/") {
		t.Errorf("error %q: want a TLS handshake failure naming the relay", err)
	} else if rc != nil {
		rc.Close()
	}

	agent, relay, err := wsPair(t, conns, "wss://localhost:"+port+"/", &tls.Config{RootCAs: roots})
	if err != nil {
		t.Fatal(err)
	}
	defer agent.Close()
	exchange(t, agent, relay, "TRLY over wss")
	if cs := relay.(*TLSConn).ConnectionState(); cs.HandshakeComplete {
		t.Error("a WebSocket conn offers its TLS state for channel binding")
	}

	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	native := tls.Client(nc, &tls.Config{RootCAs: roots, ServerName: "localhost"})
	defer native.Close()
	relay2 := <-conns
	defer relay2.Close()
	exchange(t, native, relay2, "TRLY native over TLS")
	if cs := relay2.(*TLSConn).ConnectionState(); !cs.HandshakeComplete {
		t.Error("a native TLS conn hides its TLS state")
	}
	if _, err := relay2.(*TLSConn).SyscallConn(); err == nil {
		t.Error("a TLS conn gave its socket to splice")
	}
}

// TestSilentOrSlowUpgradeEndsAtTheDeadline: Accept returns without waiting
// for a byte, and a conn that sends nothing, or half an upgrade request,
// ends at the deadline its reader set.
func TestSilentOrSlowUpgradeEndsAtTheDeadline(t *testing.T) {
	check.Leaks(t)
	for _, sent := range []string{"", "GET / HTTP/1.1\r\nHost: x\r\n"} {
		addr, conns := relayListener(t, nil)
		agent, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer agent.Close()
		relay := accepted(t, conns) // nothing sent yet
		io.WriteString(agent, sent)
		start := time.Now()
		relay.SetDeadline(start.Add(200 * time.Millisecond))
		_, err = relay.Read(make([]byte, 5))
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("sent %q: Read = %v, want a deadline error", sent, err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("sent %q: Read returned after %v, long past its deadline", sent, d)
		}
	}
}

// TestBadUpgradeIsRefused: an HTTP GET that is not a WebSocket upgrade is
// answered with an HTTP error and closed; the relay's Read fails saying so.
func TestBadUpgradeIsRefused(t *testing.T) {
	check.Leaks(t)
	addr, conns := relayListener(t, nil)
	agent, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer agent.Close()
	relay := accepted(t, conns)
	io.WriteString(agent, "GET / HTTP/1.1\r\nHost: relay\r\n\r\n")
	relay.SetDeadline(time.Now().Add(5 * time.Second))
	_, err = relay.Read(make([]byte, 5))
	if err == nil || !strings.Contains(err.Error(), "WebSocket upgrade") {
		t.Errorf("Read = %v, want a WebSocket upgrade error", err)
	}
	relay.Close()
	agent.SetDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(agent), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode < 400 {
		t.Errorf("answer %s, want a 4xx", resp.Status)
	}
}

// TestWebSocketCloseDoesNotWaitForThePeer: Close returns at once even when
// the peer does not read (a parked pooled connection is such a peer).
func TestWebSocketCloseDoesNotWaitForThePeer(t *testing.T) {
	check.Leaks(t)
	addr, conns := relayListener(t, nil)
	agent, relay, err := wsPair(t, conns, "ws://"+addr+"/", nil)
	if err != nil {
		t.Fatal(err)
	}
	exchange(t, agent, relay, "TRLY")
	start := time.Now()
	agent.Close()
	if d := time.Since(start); d > time.Second {
		t.Errorf("Close took %v with a peer that does not read", d)
	}
}

func TestParseRelay(t *testing.T) {
	for _, tc := range []struct{ in, addr, url, err string }{
		{in: "relay.example:8080", addr: "relay.example:8080"},
		{in: "wss://relay.example/", addr: "relay.example:443", url: "wss://relay.example/"},
		{in: "wss://relay.example", addr: "relay.example:443", url: "wss://relay.example/"},
		{in: "ws://relay.example:8080/tunnel?x=1", addr: "relay.example:8080", url: "ws://relay.example:8080/tunnel?x=1"},
		{in: "ws://[::1]:9/", addr: "[::1]:9", url: "ws://[::1]:9/"},
		{in: "http://relay.example/", err: "want ws:// or wss://"},
		{in: "wss://u:p@relay.example/", err: "no user"},
		{in: "wss:///x", err: "no host"},
		{in: "relay.example", err: "missing port"},
	} {
		addr, u, err := ParseRelay(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("ParseRelay(%q) = %v, want an error with %q", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil || addr != tc.addr || (u == nil) != (tc.url == "") || u != nil && u.String() != tc.url {
			t.Errorf("ParseRelay(%q) = %q, %v, %v; want %q, %q", tc.in, addr, u, err, tc.addr, tc.url)
		}
	}
	if _, u, _ := ParseRelay("ws://relay.example/"); u != nil {
		if _, err := WebSocket(u, &tls.Config{}, nil); err == nil || !strings.Contains(err.Error(), "wss://") {
			t.Errorf("TLS with ws:// = %v, want an error that says wss://", err)
		}
	}
}
