package server_test

import (
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/proto"
	"tcprelay/internal/testutil"
	"tcprelay/server"
	"tcprelay/tunnel"
)

// member registers a library agent in pool, serving with handle, and
// returns it.
func member(t *testing.T, relayAddr, pool string, port int, handle func(net.Conn)) *tunnel.Listener {
	t.Helper()
	cfg := tunnel.Config{Pool: pool, Port: port, Logger: testutil.Logger(t)}
	ln, err := cfg.Listen(testutil.Context(t), relayAddr)
	if err != nil {
		t.Fatalf("join pool %q: %v", pool, err)
	}
	t.Cleanup(func() { ln.Close() })
	testutil.Serve(t, ln, handle)
	return ln
}

// tagged echoes after writing its tag, so a client knows which member
// served it.
func tagged(tag string) func(net.Conn) {
	return func(c net.Conn) {
		c.Write([]byte(tag))
		testutil.Echo(c)
	}
}

// servedBy connects to addr and returns the one-byte tag of the member
// that served it.
func servedBy(t *testing.T, addr string) (string, error) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	b := make([]byte, 1)
	if _, err := c.Read(b); err != nil {
		return "", err
	}
	return string(b), nil
}

// TestPoolDispatch: agents giving the same pool name serve one endpoint on
// one port, and clients are spread over them.
func TestPoolDispatch(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	a := member(t, relay.Addr, "web", 0, tagged("a"))
	b := member(t, relay.Addr, "web", 0, tagged("b"))
	if a.Addr().String() != b.Addr().String() {
		t.Fatalf("pool members on %v and %v, want one port", a.Addr(), b.Addr())
	}
	if st := relay.Stats(); st.Tunnels != 1 || st.Members != 2 {
		t.Fatalf("%+v, want 1 endpoint with 2 members", st)
	}
	count := map[string]int{}
	for range 100 {
		tag, err := servedBy(t, a.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		count[tag]++
	}
	t.Logf("100 clients: %v", count)
	if count["a"] < 10 || count["b"] < 10 {
		t.Errorf("100 clients served %v, want both members to take a share", count)
	}
	// An agent without the pool name cannot have the pool's port, and a
	// member cannot move the pool to another port.
	other := tunnel.Config{Port: portOf(a), PortRequired: true, Logger: testutil.Logger(t)}
	if _, err := other.Listen(testutil.Context(t), relay.Addr); !errors.Is(err, tunnel.ErrPortUnavailable) || !strings.Contains(err.Error(), `serves pool "web"`) {
		t.Errorf("exclusive agent asking for the pool's port: %v", err)
	}
	moved := tunnel.Config{Pool: "web", Port: portOf(a) + 1, Logger: testutil.Logger(t)}
	if _, err := moved.Listen(testutil.Context(t), relay.Addr); !errors.Is(err, tunnel.ErrPortUnavailable) || !strings.Contains(err.Error(), "is on port") {
		t.Errorf("member asking for another port: %v", err)
	}
}

// TestPoolOutlivesMembers: the endpoint stays open while any member is
// registered; a member that leaves takes only itself away.
func TestPoolOutlivesMembers(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	a := member(t, relay.Addr, "web", 0, tagged("a"))
	member(t, relay.Addr, "web", 0, tagged("b"))
	pub := a.Addr().String()
	a.Close()
	check.Eventually(t, 5*time.Second, func() error {
		if st := relay.Stats(); st.Members != 1 {
			return fmt.Errorf("%+v, want one member left", st)
		}
		return nil
	})
	for i := range 20 {
		if tag, err := servedBy(t, pub); err != nil || tag != "b" {
			t.Fatalf("client %d after a member left: served by %q, %v; want b", i, tag, err)
		}
	}
}

// TestPoolReadiness: an unready member gets no new clients; the clients
// waiting for a member that leaves go to another member, without noticing;
// with no member ready, a client is refused at once.
func TestPoolReadiness(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{PickupTimeout: 30 * time.Second})
	b := member(t, relay.Addr, "web", 0, tagged("b"))
	pub := b.Addr().String()

	// A raw member that takes clients but never picks them up.
	raw := testutil.NewRawAgentWith(t, relay.Addr, "", proto.FeaturePools|proto.FeatureReady)
	raw.Send(t, proto.Append(nil, &proto.Listen{ID: 1, Pool: "web"}))
	raw.Expect(t, proto.TypeListenOK)

	ready := func(n int) {
		t.Helper()
		check.Eventually(t, 5*time.Second, func() error {
			if st := relay.Stats(); st.Ready != n {
				return fmt.Errorf("%+v, want %d members ready", st, n)
			}
			return nil
		})
	}
	ready(2)
	b.SetReady(false)
	ready(1)
	// A client for the raw member waits; it sends a request first.
	raw.Conn.SetDeadline(time.Now().Add(10 * time.Second))
	client := testutil.Dial(t, pub)
	client.Write([]byte("waited"))
	raw.ExpectIncoming(t)

	// b is ready again and the raw member leaves: its waiting client goes
	// to b, request and all.
	b.SetReady(true)
	ready(2)
	if n := relay.Stats().Waiting; n != 1 {
		t.Fatalf("%d clients waiting, want 1", n)
	}
	raw.Conn.Close()
	client.SetReadDeadline(time.Now().Add(10 * time.Second))
	got := make([]byte, len("bwaited"))
	if _, err := io.ReadFull(client, got); err != nil || string(got) != "bwaited" {
		t.Fatalf("the waiting client got %q, %v; want b's tag and its request echoed", got, err)
	}

	// No member ready: refused at once, not held for the pickup timeout.
	b.SetReady(false)
	ready(0)
	check.Eventually(t, 5*time.Second, func() error {
		start := time.Now()
		c := testutil.Dial(t, pub)
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err := c.Read(make([]byte, 1))
		if err == nil || time.Since(start) > time.Second {
			return fmt.Errorf("with no member ready: read %v after %v, want a close at once", err, time.Since(start))
		}
		return nil
	})
}
