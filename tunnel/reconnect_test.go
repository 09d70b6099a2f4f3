package tunnel_test

import (
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/testutil"
	"tcprelay/server"
	"tcprelay/tunnel"
)

// reconnecting returns a Config that reconnects fast and reports each new
// address on the returned channel.
func reconnecting() (tunnel.Config, <-chan net.Addr) {
	addrs := make(chan net.Addr, 8)
	return tunnel.Config{MaxBackoff: 100 * time.Millisecond, OnAddr: func(a net.Addr) { addrs <- a }}, addrs
}

// listenReconnecting registers a reconnecting listener with the relay at
// addr; the channel reports the addresses of its later registrations
// (OnAddr's report of the first one is checked and consumed).
func listenReconnecting(t *testing.T, addr string) (*tunnel.Listener, <-chan net.Addr) {
	t.Helper()
	cfg, addrs := reconnecting()
	ln := listen(t, addr, cfg)
	if a := nextAddr(t, addrs); a.String() != ln.Addr().String() {
		t.Fatalf("OnAddr reported %s first, Addr() is %s", a, ln.Addr())
	}
	return ln, addrs
}

func nextAddr(t *testing.T, addrs <-chan net.Addr) net.Addr {
	t.Helper()
	select {
	case a := <-addrs:
		return a
	case <-time.After(10 * time.Second):
		t.Fatal("the listener did not register again")
		return nil
	}
}

// echoOnce writes msg on c and reads it back.
func echoOnce(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("write %q: %v", msg, err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
		t.Fatalf("read back %q, %v; want %q", buf, err, msg)
	}
}

// TestReconnectAfterRelayRestart: the relay restarts on the same address;
// the listener comes back on its old public port by itself.
func TestReconnectAfterRelayRestart(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	ln, addrs := listenReconnecting(t, relay.Addr)
	testutil.Serve(t, ln, testutil.Echo)
	pub := ln.Addr().String()
	if err := echoRoundTrip(pub, 1, 10<<10); err != nil {
		t.Fatal(err)
	}

	relay.Close()
	testutil.StartRelayAt(t, relay.Addr, server.Config{})
	if a := nextAddr(t, addrs); a.String() != pub {
		t.Errorf("re-registered on %s, want the old port back: %s", a, pub)
	}
	if ln.Addr().String() != pub {
		t.Errorf("Addr() = %s after reconnecting, want %s", ln.Addr(), pub)
	}
	if err := echoRoundTrip(pub, 2, 10<<10); err != nil {
		t.Fatalf("after the restart: %v", err)
	}
}

// TestControlLossKeepsRelayedConns: the control connection is cut (a reset
// on the path); the agent re-registers on the same port, and a connection
// relayed before the cut keeps flowing, since its own path still exists.
func TestControlLossKeepsRelayedConns(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	proxy := testutil.NewFaultProxy(t, relay.Addr)
	ln, addrs := listenReconnecting(t, proxy.Addr())
	testutil.Serve(t, ln, testutil.Echo)
	pub := ln.Addr().String()

	client := testutil.Dial(t, pub)
	echoOnce(t, client, "before the cut")
	proxy.Cut(t, 0) // connection 0 is the control connection

	if a := nextAddr(t, addrs); a.String() != pub {
		t.Errorf("re-registered on %s, want %s", a, pub)
	}
	echoOnce(t, client, "after the cut, same connection")
	if err := echoRoundTrip(pub, 3, 10<<10); err != nil {
		t.Fatalf("new client after the cut: %v", err)
	}
}

// TestFrozenRelayDetected: the path to the relay goes silent without
// closing (a frozen relay, a pulled cable). The agent's heartbeat notices
// within three intervals and it registers again.
func TestFrozenRelayDetected(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{Heartbeat: 50 * time.Millisecond})
	proxy := testutil.NewFaultProxy(t, relay.Addr)
	ln, addrs := listenReconnecting(t, proxy.Addr())
	testutil.Serve(t, ln, testutil.Echo)

	proxy.Freeze(t, 0)
	a := nextAddr(t, addrs)
	if err := echoRoundTrip(a.String(), 4, 10<<10); err != nil {
		t.Fatalf("after re-registering: %v", err)
	}
}

// TestSecretChangedIsFinal: a relay that refuses the secret on reconnection
// ends Accept with ErrAuthFailed instead of retrying forever.
func TestSecretChangedIsFinal(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{Secret: "old"})
	cfg, _ := reconnecting()
	cfg.Secret = "old"
	ln := listen(t, relay.Addr, cfg)
	relay.Close()
	testutil.StartRelayAt(t, relay.Addr, server.Config{Secret: "new"})

	errc := make(chan error, 1)
	go func() {
		_, err := ln.Accept()
		errc <- err
	}()
	select {
	case err := <-errc:
		if !errors.Is(err, tunnel.ErrAuthFailed) {
			t.Fatalf("Accept: %v, want ErrAuthFailed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Accept still waiting after the relay refused the secret")
	}
}

// TestCloseWhileReconnecting: Close returns promptly while the relay is
// gone, and Accept reports net.ErrClosed.
func TestCloseWhileReconnecting(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	cfg, _ := reconnecting()
	ln := listen(t, relay.Addr, cfg)
	relay.Close()
	closed := make(chan struct{})
	go func() { ln.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("Close blocked while reconnecting")
	}
	if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept after Close: %v, want net.ErrClosed", err)
	}
}

// TestGracefulRestartQuickReturn: a relay that shuts down gracefully asks
// its agents to come back soon; they retry at its short interval instead
// of backing off, and are registered again within a second of the relay's
// return, however long it was gone (here long enough for the backoff to
// have grown to seconds).
func TestGracefulRestartQuickReturn(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	addrs := make(chan net.Addr, 4)
	listen(t, relay.Addr, tunnel.Config{OnAddr: func(a net.Addr) { addrs <- a }})
	<-addrs
	relay.Shutdown(context.Background())
	time.Sleep(3 * time.Second) // the relay is away: what the test is about
	back := time.Now()
	testutil.StartRelayAt(t, relay.Addr, server.Config{})
	select {
	case a := <-addrs:
		took := time.Since(back)
		t.Logf("registered again on %v, %v after the relay came back", a, took.Round(time.Millisecond))
		if took > time.Second {
			t.Errorf("registered again %v after the relay came back, want within a second", took)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the listener did not register again")
	}
}
