package tunnel_test

import (
	"bytes"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/proto"
	"tcprelay/internal/testutil"
	"tcprelay/server"
	"tcprelay/tunnel"
)

// cutter stands in front of a relay and kills the first n connections in
// the middle of their handshake, as a relay that evicts handshakes under a
// flood does; it forwards the others to the relay untouched.
type cutter struct {
	addr  string
	seen  atomic.Int32
	mu    sync.Mutex
	conns []net.Conn
}

func newCutter(t *testing.T, relay string, n int, cut func(agent net.Conn, relay string)) *cutter {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &cutter{addr: ln.Addr().String()}
	testutil.Serve(t, ln, func(a net.Conn) {
		if c.seen.Add(1) <= int32(n) {
			cut(a, relay)
			return
		}
		b, err := net.Dial("tcp", relay)
		if err != nil {
			return
		}
		defer b.Close()
		c.mu.Lock()
		c.conns = append(c.conns, a, b)
		c.mu.Unlock()
		done := make(chan struct{})
		go func() {
			defer close(done)
			io.Copy(b, a)
			b.(*net.TCPConn).CloseWrite()
		}()
		io.Copy(a, b)
		a.(*net.TCPConn).CloseWrite()
		<-done
	})
	t.Cleanup(func() { // before Serve's own, which waits for the handlers
		c.mu.Lock()
		defer c.mu.Unlock()
		for _, conn := range c.conns {
			conn.Close()
		}
	})
	return c
}

func (c *cutter) Addr() string { return c.addr }

// readHello reads the agent's preamble and Hello.
func readHello(agent net.Conn, tee io.Writer) error {
	agent.SetReadDeadline(time.Now().Add(5 * time.Second))
	pre := make([]byte, proto.PreambleLen)
	if _, err := io.ReadFull(agent, pre); err != nil {
		return err
	}
	tee.Write(pre)
	_, err := proto.ReadMessage(io.TeeReader(agent, tee), proto.MaxPreAuthPayload)
	return err
}

// The ways a handshake dies on the relay's side.
var cuts = []struct {
	name string
	cut  func(agent net.Conn, relay string)
}{
	{"closed after the hello", func(agent net.Conn, _ string) {
		readHello(agent, io.Discard)
	}},
	{"reset after the hello", func(agent net.Conn, _ string) {
		readHello(agent, io.Discard)
		agent.(*net.TCPConn).SetLinger(0)
	}},
	{"closed after the challenge", func(agent net.Conn, relay string) {
		// A real relay's Challenge, so the agent gets as far as its Auth.
		var hello bytes.Buffer
		if readHello(agent, &hello) != nil {
			return
		}
		r, err := net.Dial("tcp", relay)
		if err != nil {
			return
		}
		defer r.Close()
		r.SetDeadline(time.Now().Add(5 * time.Second))
		var ch bytes.Buffer
		if _, err := r.Write(hello.Bytes()); err != nil {
			return
		}
		if _, err := proto.ReadMessage(io.TeeReader(r, &ch), proto.MaxPreAuthPayload); err != nil {
			return
		}
		agent.Write(ch.Bytes())
		proto.ReadMessage(agent, proto.MaxPreAuthPayload) // the Auth
	}},
	{"silent after the hello", func(agent net.Conn, _ string) {
		readHello(agent, io.Discard)
		agent.SetReadDeadline(time.Time{})
		io.Copy(io.Discard, agent) // until the agent gives up on it
	}},
}

// TestWaitForRelayRetriesCutHandshake: at start-up, a connection that dies
// in the middle of the handshake (closed, reset, or silent: a relay that
// evicts handshakes under a flood) is retried with the backoff, like a
// relay that cannot be reached, instead of failing Listen.
func TestWaitForRelayRetriesCutHandshake(t *testing.T) {
	for _, tc := range cuts {
		t.Run(tc.name, func(t *testing.T) {
			check.Leaks(t)
			relay := testutil.StartRelay(t, server.Config{})
			const n = 2
			c := newCutter(t, relay.Addr, n, tc.cut)
			cfg := tunnel.Config{WaitForRelay: true, MaxBackoff: 100 * time.Millisecond,
				DialTimeout: time.Second, Logger: testutil.Logger(t)}
			ln, err := cfg.Listen(testutil.Context(t), c.Addr())
			if err != nil {
				t.Fatalf("Listen after %d cut handshakes: %v; want it to retry until the relay answers", n, err)
			}
			defer ln.Close()
			if got := c.seen.Load(); got <= n {
				t.Fatalf("the cutter saw %d connections, want more than the %d it cut", got, n)
			}
			testutil.Serve(t, ln, testutil.Echo)
			if err := testutil.EchoCheck(ln.Addr().String(), []byte("after "+tc.name), 5*time.Second); err != nil {
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
