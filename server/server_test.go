package server_test

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/proto"
	"tcprelay/internal/testutil"
	"tcprelay/server"
	"tcprelay/tunnel"
)

// expectClosed fails unless the peer closes c (EOF or reset) within d,
// without sending anything.
func expectClosed(t *testing.T, c net.Conn, d time.Duration) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(d))
	n, err := c.Read(make([]byte, 64))
	var ne net.Error
	if err == nil || errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("connection still open after %v (read %d bytes, err %v)", d, n, err)
	}
}

// expectClosedAfterFrames is expectClosed for a peer that may first send
// frames (an Error, a GoAway).
func expectClosedAfterFrames(t *testing.T, c net.Conn, d time.Duration) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("connection still open after %v", d)
	}
}

// echoAgent registers a library agent that echoes, and returns its public
// address.
func echoAgent(t *testing.T, relayAddr string) string {
	t.Helper()
	cfg := tunnel.Config{Logger: testutil.Logger(t)}
	ln, err := cfg.Listen(testutil.Context(t), relayAddr)
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	testutil.Serve(t, ln, testutil.Echo)
	return ln.Addr().String()
}

// checkEcho sends msg through addr and expects exactly it back.
func checkEcho(t *testing.T, addr, msg string) {
	t.Helper()
	if err := testutil.EchoCheck(addr, []byte(msg), 5*time.Second); err != nil {
		t.Fatalf("echo through %s: %v", addr, err)
	}
}

func TestGarbageOnControlPort(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	before := echoAgent(t, relay.Addr)

	random := make([]byte, 4096)
	rand.Read(random)
	huge := append(proto.Preamble(), byte(proto.TypeHello), 0xff, 0xff, 0xff, 0xff)
	cases := map[string][]byte{
		"random bytes":         random,
		"http request":         []byte("GET / HTTP/1.1\r\nHost: relay\r\n\r\n"),
		"tls client hello":     {0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03},
		"oversized frame":      huge,
		"listen before hello":  proto.Append(proto.Preamble(), &proto.Listen{ID: 1}),
		"unknown first frame":  proto.Append(proto.Preamble(), &proto.Ping{Data: 1}),
		"truncated hello":      append(proto.Preamble(), byte(proto.TypeHello), 0, 0, 0, 9, 0),
		"attach with bad size": append(proto.Preamble(), byte(proto.TypeAttach), 0, 0, 0, 3, 1, 2, 3),
	}
	for name, b := range cases {
		t.Run(name, func(t *testing.T) {
			c := testutil.Dial(t, relay.Addr)
			c.Write(b)
			if name == "truncated hello" {
				c.CloseWrite()
			}
			expectClosed(t, c, 5*time.Second)
		})
	}
	// An agent of another protocol version is told why, in an Error frame
	// that every version reads alike, before the close.
	for _, v := range []byte{1, 99} {
		c := testutil.Dial(t, relay.Addr)
		c.Write([]byte{'T', 'R', 'L', 'Y', v, byte(proto.TypeHello), 0, 0, 0, 0})
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		m, err := proto.ReadMessage(c, proto.DefaultMaxPayload)
		e, ok := m.(*proto.Error)
		if err != nil || !ok || e.Code != proto.CodeUnsupported || !strings.Contains(e.Message, "upgrade the") {
			t.Fatalf("version %d: got %v, %v; want an Error with CodeUnsupported saying what to upgrade", v, m, err)
		}
		expectClosed(t, c, 5*time.Second)
	}
	checkEcho(t, before, "agent registered before the garbage")
	checkEcho(t, echoAgent(t, relay.Addr), "agent registered after the garbage")
}

// TestSilentConnectionsDoNotBlockAgents: hundreds of connections that send
// nothing do not delay a real agent, and each is dropped at the handshake
// deadline.
func TestSilentConnectionsDoNotBlockAgents(t *testing.T) {
	check.Leaks(t)
	// A budget of 20,000 fds: 2,000 handshakes, 62 per source address.
	relay := testutil.StartRelay(t, server.Config{HandshakeTimeout: 3 * time.Second, MaxFDs: 20000})
	var silent []*net.TCPConn
	for i := range 300 {
		// From five addresses, each within its share; the agent comes
		// from another.
		silent = append(silent, testutil.DialFrom(t, fmt.Sprintf("127.0.0.%d", 2+i%5), relay.Addr))
	}
	checkEcho(t, echoAgent(t, relay.Addr), "hello")
	// Had the agent waited behind them, they would have hit their deadline
	// by now: they must all still be open.
	for i, c := range silent {
		c.SetReadDeadline(time.Now().Add(time.Millisecond))
		var ne net.Error
		if _, err := c.Read(make([]byte, 1)); !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("silent connection %d ended before the agent was served: %v", i, err)
		}
	}
	for _, c := range silent {
		expectClosed(t, c, 10*time.Second)
	}
}

// TestHandshakeBudget: connections that do not finish their handshake are
// capped per source address and in all. Past a cap, the oldest (silent for
// a second) is closed to make room; a burst of young ones may go up to
// twice the cap, and one past that is refused as soon as its first frame
// shows it is no data connection, with an Error an agent can act on.
// Agents from elsewhere still get in.
func TestHandshakeBudget(t *testing.T) {
	check.Leaks(t)
	// 200 fds: 20 handshakes in all, 8 per source address.
	relay := testutil.StartRelay(t, server.Config{MaxFDs: 200})
	refusedAtOnce := func(c net.Conn) bool {
		sayHello(t, c)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		m, err := proto.ReadMessage(c, proto.DefaultMaxPayload)
		e, ok := m.(*proto.Error)
		return err == nil && ok && e.Code == proto.CodeLimit && strings.Contains(e.Message, "relay busy")
	}
	var silent []*net.TCPConn
	for range 16 {
		silent = append(silent, testutil.DialFrom(t, "127.0.0.2", relay.Addr))
	}
	if c := testutil.DialFrom(t, "127.0.0.2", relay.Addr); !refusedAtOnce(c) {
		t.Fatal("a 17th young connection in handshake from one address (twice its share) was not refused at its Hello")
	}
	checkEcho(t, echoAgent(t, relay.Addr), "an agent from another address, during the flood")
	time.Sleep(1100 * time.Millisecond) // the silent ones grow old: the point of the test
	testutil.DialFrom(t, "127.0.0.2", relay.Addr)
	expectClosed(t, silent[0], 5*time.Second) // the oldest made room
	for i, c := range silent[1:3] {
		c.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
		var ne net.Error
		if _, err := c.Read(make([]byte, 1)); !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("silent connection %d closed too: %v; want only the oldest", i+1, err)
		}
	}
	if n := testutil.Metrics(t, relay.Server)["tcprelay_control_dropped_total"]; n != 2 {
		t.Errorf("control_dropped_total %d, want 2 (one refused, one made room for)", n)
	}
}

// TestHandshakeFloodLeavesRoomForAgents: a flood from several addresses
// fast enough that none of its connections has grown old fills the
// handshakes up to twice the cap in all. A connection from an address
// below the average still gets in, in place of the oldest of a bigger
// address, so an agent registers and its clients are served; one more
// from a flooding address is refused at its Hello.
func TestHandshakeFloodLeavesRoomForAgents(t *testing.T) {
	check.Leaks(t)
	// 200 fds: 20 handshakes in all (40 as a burst), 8 per source address.
	relay := testutil.StartRelay(t, server.Config{MaxFDs: 200})
	for i := range 5 {
		for range 8 {
			testutil.DialFrom(t, fmt.Sprintf("127.0.2.%d", i+1), relay.Addr)
		}
	}
	check.Eventually(t, 5*time.Second, func() error {
		if n := relay.Stats().Handshaking; n != 40 {
			return fmt.Errorf("%d connections in handshake, want the 40 of the flood", n)
		}
		return nil
	})
	checkEcho(t, echoAgent(t, relay.Addr), "an agent from another address, with the handshakes full of young connections")
	// The flood goes on: it stays within twice the cap, refused past it.
	// All dialled before any is read, so the flood is still young.
	var more []*net.TCPConn
	for i := range 10 {
		more = append(more, testutil.DialFrom(t, fmt.Sprintf("127.0.2.%d", i%5+1), relay.Addr))
	}
	refused := 0
	for _, c := range more {
		sayHello(t, c)
		c.SetReadDeadline(time.Now().Add(time.Second))
		if m, err := proto.ReadMessage(c, proto.DefaultMaxPayload); err == nil {
			if e, ok := m.(*proto.Error); ok && e.Code == proto.CodeLimit {
				refused++
			}
		}
	}
	if n := relay.Stats().Handshaking; n > 40 || refused == 0 {
		t.Errorf("after 10 more from the flooding addresses: %d in handshake, %d refused; want at most 40, and some refused", n, refused)
	}
}

// TestHandshakeCapServesAttach: past the cap on connections in handshake
// from one address, a connection whose first frame is an Attach for a
// waiting client is served, since the client is admitted already, and one
// that sends nothing is closed within a second without a word: an Error
// frame on a data connection would reach the agent's application as its
// client's first bytes.
func TestHandshakeCapServesAttach(t *testing.T) {
	check.Leaks(t)
	// 200 fds: 20 handshakes in all, 8 per source address, 16 in a burst.
	relay := testutil.StartRelay(t, server.Config{MaxFDs: 200})
	agent, refused := testutil.DialRaw(t, relay.Addr, testutil.RawOptions{From: "127.0.0.2"})
	if refused != nil {
		t.Fatal(refused)
	}
	pub := agent.Listen(t, 0)
	for range 16 {
		testutil.DialFrom(t, "127.0.0.2", relay.Addr)
	}
	silent := testutil.DialFrom(t, "127.0.0.2", relay.Addr)
	client := testutil.Dial(t, pub)
	data := agent.Attach(t, agent.ExpectIncoming(t).Token)
	if _, err := client.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	data.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(data, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("data connection past the cap read %q, %v; want the client's \"ping\"", buf, err)
	}
	if _, err := data.Write([]byte("pong")); err != nil {
		t.Fatal(err)
	}
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(client, buf); err != nil || string(buf) != "pong" {
		t.Fatalf("client read %q, %v; want \"pong\"", buf, err)
	}
	start := time.Now()
	expectClosed(t, silent, 5*time.Second)
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("a silent connection past the cap was closed after %v; want about a second", d)
	}
}

// sayHello sends c's preamble and a Hello, as an agent does on connecting.
func sayHello(t *testing.T, c net.Conn) {
	t.Helper()
	if _, err := c.Write(proto.Append(proto.Preamble(), &proto.Hello{Agent: "test"})); err != nil {
		t.Fatal(err)
	}
}

func TestTokens(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	agent := testutil.NewRawAgent(t, relay.Addr, "")
	pub := agent.Listen(t, 0)
	client := testutil.Dial(t, pub)
	in := agent.ExpectIncoming(t)
	if in.Client != client.LocalAddr().String() {
		t.Errorf("Incoming.Client = %s, want %s", in.Client, client.LocalAddr())
	}

	// A guessed token gets the data connection closed, and the waiting
	// client is not disturbed.
	guess := in.Token
	guess[0] ^= 1
	expectClosed(t, agent.Attach(t, guess), 5*time.Second)

	data := agent.Attach(t, in.Token)
	client.Write([]byte("ping"))
	buf := make([]byte, 4)
	data.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(data, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("data conn read %q, %v; want ping", buf, err)
	}
	data.Write([]byte("pong"))
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(client, buf); err != nil || string(buf) != "pong" {
		t.Fatalf("client read %q, %v; want pong", buf, err)
	}

	// The token is spent: replaying it attaches to nothing.
	expectClosed(t, agent.Attach(t, in.Token), 5*time.Second)
	data.Write([]byte("still"))
	if _, err := io.ReadFull(client, buf[:4]); err != nil || string(buf) != "stil" {
		t.Fatalf("first binding broken by the replay: read %q, %v", buf, err)
	}
}

func TestPickupTimeout(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{PickupTimeout: 200 * time.Millisecond})
	agent := testutil.NewRawAgent(t, relay.Addr, "")
	pub := agent.Listen(t, 0)
	client := testutil.Dial(t, pub)
	in := agent.ExpectIncoming(t)
	expectClosed(t, client, 5*time.Second)
	// The expired token attaches to nothing.
	expectClosed(t, agent.Attach(t, in.Token), 5*time.Second)
	if m := scrape(t, relay.Server); m["tcprelay_pickup_timeouts_total"] != 1 || m["tcprelay_pool_misses_total"] != 1 {
		t.Errorf("pickup timeouts %d, pool misses %d; want 1 and 1", m["tcprelay_pickup_timeouts_total"], m["tcprelay_pool_misses_total"])
	}
}

// freeRange finds n consecutive bindable ports below the ephemeral range,
// so no test connection can take one of them meanwhile.
func freeRange(t *testing.T, n int) int {
	t.Helper()
	for base := 20000 + int(time.Now().UnixNano()%5000); base < 32000; base += n {
		ok := true
		for p := base; p < base+n && ok; p++ {
			ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
			if err != nil {
				ok = false
				continue
			}
			ln.Close()
		}
		if ok {
			return base
		}
	}
	t.Fatal("no free port range")
	return 0
}

func TestPortRange(t *testing.T) {
	check.Leaks(t)
	base := freeRange(t, 3)
	relay := testutil.StartRelay(t, server.Config{PortMin: base, PortMax: base + 2})
	listenPort := func(cfg tunnel.Config) (*tunnel.Listener, error) {
		cfg.Logger = testutil.Logger(t)
		ln, err := cfg.Listen(testutil.Context(t), relay.Addr)
		if err == nil {
			t.Cleanup(func() { ln.Close() })
		}
		return ln, err
	}
	var lns []*tunnel.Listener
	for i := range 3 {
		ln, err := listenPort(tunnel.Config{})
		if err != nil {
			t.Fatal(err)
		}
		if got := ln.Addr().(*tunnel.Addr).Port; got != base+i {
			t.Errorf("tunnel %d got port %d, want %d (in order from the start of the range)", i, got, base+i)
		}
		lns = append(lns, ln)
	}
	if _, err := listenPort(tunnel.Config{}); !errors.Is(err, tunnel.ErrLimit) {
		t.Fatalf("Listen on a full range: %v, want ErrLimit", err)
	}
	if _, err := listenPort(tunnel.Config{Port: base + 1, PortRequired: true}); !errors.Is(err, tunnel.ErrPortUnavailable) {
		t.Fatalf("Listen on a taken required port: %v, want ErrPortUnavailable", err)
	}

	if _, err := listenPort(tunnel.Config{Port: base + 100, PortRequired: true}); !errors.Is(err, tunnel.ErrPortUnavailable) {
		t.Fatalf("Listen on a required port outside the range: %v, want ErrPortUnavailable", err)
	}

	// Once a port is released, a preferred port outside the range falls
	// back to it. The relay sees the agent leave asynchronously: poll.
	lns[1].Close()
	check.Eventually(t, 5*time.Second, func() error {
		ln, err := listenPort(tunnel.Config{Port: base + 100})
		if err != nil {
			if !errors.Is(err, tunnel.ErrLimit) {
				t.Fatalf("port %d not released: %v", base+1, err)
			}
			return fmt.Errorf("port %d not released: %w", base+1, err)
		}
		if got := ln.Addr().(*tunnel.Addr).Port; got != base+1 {
			t.Errorf("fallback port %d, want the only free one, %d", got, base+1)
		}
		return nil
	})
}

func TestUnknownFramesSkippedOversizedRejected(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{MaxFrameSize: 1024})
	agent := testutil.NewRawAgent(t, relay.Addr, "")
	agent.Send(t, proto.AppendFrame(nil, proto.Type(0x7f), []byte("from a newer agent")))
	agent.Listen(t, 0) // still served

	agent.Send(t, proto.AppendFrame(nil, proto.Type(0x7f), make([]byte, 2048)))
	expectClosedAfterFrames(t, agent.Conn, 5*time.Second)
}

// TestHeartbeatDropsSilentAgent: an agent that stops answering is dropped
// after three heartbeats and its public port is freed.
func TestHeartbeatDropsSilentAgent(t *testing.T) {
	check.Leaks(t)
	// A heartbeat long enough that a loaded machine (-race, 2 cores) does
	// not make the live agent below miss three in a row.
	const hb = 200 * time.Millisecond
	relay := testutil.StartRelay(t, server.Config{Heartbeat: hb})
	agent := testutil.NewRawAgent(t, relay.Addr, "")
	pub := agent.Listen(t, 0)
	start := time.Now()
	expectClosedAfterFrames(t, agent.Conn, 5*time.Second) // reads pings, answers none
	if d := time.Since(start); d < 2*hb {
		t.Errorf("silent agent dropped after %v, before three heartbeats of %v", d, hb)
	}
	if c, err := net.Dial("tcp", pub); err == nil {
		c.Close()
		t.Fatalf("public port %s still open after its agent was dropped", pub)
	}

	// A library agent answers pings and stays.
	live := echoAgent(t, relay.Addr)
	time.Sleep(6 * hb) // the point of the test is time passing
	checkEcho(t, live, "alive")
}

func TestShutdownDrains(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	pub := echoAgent(t, relay.Addr)
	client := testutil.Dial(t, pub)
	client.Write([]byte("before"))
	buf := make([]byte, 6)
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(client, buf); err != nil {
		t.Fatal(err)
	}

	done := make(chan error, 1)
	go func() { done <- relay.Shutdown(context.Background()) }()

	// New clients are refused at once; the live one keeps flowing.
	testutil.WaitRefused(t, pub)
	select {
	case err := <-done:
		t.Fatalf("Shutdown returned (%v) while a connection was live", err)
	default:
	}
	client.Write([]byte("during"))
	if _, err := io.ReadFull(client, buf); err != nil || string(buf) != "during" {
		t.Fatalf("live connection broken by shutdown: %q %v", buf, err)
	}
	client.CloseWrite()
	if rest := testutil.ReadAllTimeout(t, client, 5*time.Second); len(rest) != 0 {
		t.Fatalf("unexpected bytes %q", rest)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Shutdown did not return after the last connection ended")
	}
}

func TestShutdownDeadlineClosesStragglers(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	pub := echoAgent(t, relay.Addr)
	client := testutil.Dial(t, pub)
	checkEcho(t, pub, "x") // the tunnel works
	client.Write([]byte("y"))
	client.Read(make([]byte, 1))

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := relay.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown: %v, want DeadlineExceeded", err)
	}
	expectClosed(t, client, 5*time.Second)
}

func TestTunnelLimitPerAgent(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{MaxTunnelsPerAgent: 2})
	agent := testutil.NewRawAgent(t, relay.Addr, "")
	agent.Listen(t, 0)
	agent.Listen(t, 0)
	agent.Send(t, proto.Append(nil, &proto.Listen{ID: 9}))
	e := agent.Expect(t, proto.TypeError).(*proto.Error)
	if e.ID != 9 || e.Code != proto.CodeLimit {
		t.Fatalf("third tunnel: %+v, want a limit error for request 9", e)
	}
	// The session is undisturbed.
	agent.Send(t, proto.Append(nil, &proto.Ping{Data: 5}))
	if p := agent.Expect(t, proto.TypePong).(*proto.Pong); p.Data != 5 {
		t.Fatalf("pong %d, want 5", p.Data)
	}
	// Another agent without a key from the same address is held to the
	// same bound: a secret holder cannot get more by opening sessions.
	other := testutil.NewRawAgent(t, relay.Addr, "")
	other.Send(t, proto.Append(nil, &proto.Listen{ID: 1}))
	if e := other.Expect(t, proto.TypeError).(*proto.Error); e.Code != proto.CodeLimit || !strings.Contains(e.Message, "from your address") {
		t.Fatalf("a second session from the address: %+v, want the per-address tunnel limit", e)
	}
	// So is one with a key of its own making: keys cost nothing.
	keyed, refused := testutil.DialRaw(t, relay.Addr, testutil.RawOptions{Key: newKey(t), Features: proto.FeaturePool})
	if refused != nil {
		t.Fatalf("a session with a key: %+v", refused)
	}
	keyed.Send(t, proto.Append(nil, &proto.Listen{ID: 1}))
	if e := keyed.Expect(t, proto.TypeError).(*proto.Error); e.Code != proto.CodeLimit || !strings.Contains(e.Message, "from your address") {
		t.Fatalf("a session with a new key from the address: %+v, want the per-address tunnel limit", e)
	}
	// Another address is not held by it.
	from2, refused := testutil.DialRaw(t, relay.Addr, testutil.RawOptions{From: "127.0.0.2", Features: proto.FeaturePool})
	if refused != nil {
		t.Fatalf("a session from another address: %+v", refused)
	}
	from2.Listen(t, 0)
}

func TestConnLimitPerTunnel(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{MaxConnsPerTunnel: 3})
	pub := echoAgent(t, relay.Addr)
	var live []*net.TCPConn
	for i := range 3 {
		c := testutil.Dial(t, pub)
		c.Write([]byte{byte(i)})
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			t.Fatalf("client %d within the limit: %v", i, err)
		}
		live = append(live, c)
	}
	extra := testutil.Dial(t, pub)
	extra.Write([]byte("x"))
	expectClosed(t, extra, 5*time.Second)
	if n := scrape(t, relay.Server)["tcprelay_clients_refused_total"]; n != 1 {
		t.Errorf("clients_refused_total %d, want 1", n)
	}

	// A finished connection frees its place.
	live[0].CloseWrite()
	testutil.ReadAllTimeout(t, live[0], 5*time.Second)
	check.Eventually(t, 5*time.Second, func() error {
		if err := testutil.EchoCheck(pub, []byte("y"), 5*time.Second); err != nil {
			return fmt.Errorf("place not freed after a connection ended: %w", err)
		}
		return nil
	})
	echoOK := func(c *net.TCPConn) {
		c.Write([]byte("z"))
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			t.Fatalf("live connection disturbed by the limit: %v", err)
		}
	}
	echoOK(live[1])
	echoOK(live[2])
}

// TestClientLimitPerSource: with MaxClientsPerSource, one address's clients
// past the bound are closed at once, while another address's are served.
func TestClientLimitPerSource(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{MaxClientsPerSource: 2})
	pub := echoAgent(t, relay.Addr)
	echoes := func(c *net.TCPConn) bool {
		c.Write([]byte{1})
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err := io.ReadFull(c, make([]byte, 1))
		return err == nil
	}
	for i := range 2 {
		if !echoes(testutil.DialFrom(t, "127.0.0.1", pub)) {
			t.Fatalf("client %d from 127.0.0.1, within its bound, not served", i+1)
		}
	}
	extra := testutil.DialFrom(t, "127.0.0.1", pub)
	extra.Write([]byte("x"))
	expectClosed(t, extra, 5*time.Second)
	if !echoes(testutil.DialFrom(t, "127.0.0.2", pub)) {
		t.Fatal("a client from another address was not served")
	}
}

func TestPendingLimitPerTunnel(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{MaxPendingPerTunnel: 2})
	agent := testutil.NewRawAgent(t, relay.Addr, "") // never picks anyone up
	pub := agent.Listen(t, 0)
	w1, w2 := testutil.Dial(t, pub), testutil.Dial(t, pub)
	agent.ExpectIncoming(t)
	agent.ExpectIncoming(t)
	expectClosed(t, testutil.Dial(t, pub), 5*time.Second)
	// The two waiting clients are still waiting.
	for _, w := range []*net.TCPConn{w1, w2} {
		w.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
		var ne net.Error
		if _, err := w.Read(make([]byte, 1)); !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("waiting client closed by another client's refusal: %v", err)
		}
	}
	checkEcho(t, echoAgent(t, relay.Addr), "other tunnel")
}

// TestProtocolGrowth: what a newer agent may send an older relay. Fields
// appended to a message are ignored; a Listen flag the relay does not know
// is refused with CodeUnsupported (not silently ignored), and the session
// goes on; features the relay lacks are not offered.
func TestProtocolGrowth(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	c := testutil.Dial(t, relay.Addr)
	c.SetDeadline(time.Now().Add(10 * time.Second))
	ctl := proto.NewConn(c, 5*time.Second, proto.DefaultMaxPayload)
	// A Hello from the future: an unknown feature bit, and a field appended
	// after the last one this version knows (Eph, sent with it).
	hello := append((&proto.Hello{Agent: "future", Features: 1 << 40, Eph: [proto.KeyLen]byte{1}}).AppendPayload(nil), "new field"...)
	c.Write(proto.AppendFrame(proto.Preamble(), proto.TypeHello, hello))
	m, err := ctl.Read()
	ch, ok := m.(*proto.Challenge)
	if err != nil || !ok {
		t.Fatalf("got %v, %v; want a Challenge", m, err)
	}
	if ch.Features&(1<<40) != 0 {
		t.Errorf("relay announces features %v, the unknown bit among them", ch.Features)
	}
	auth := append((&proto.Auth{Key: [proto.KeyLen]byte{1}}).AppendPayload(nil), 1, 2, 3)
	c.Write(proto.AppendFrame(nil, proto.TypeAuth, auth))
	if m, err := ctl.Read(); err != nil || m.Type() != proto.TypeWelcome {
		t.Fatalf("got %v, %v; want Welcome", m, err)
	}

	ctl.Send(&proto.Listen{ID: 1, Flags: 1 << 7})
	m, err = ctl.Read()
	if e, ok := m.(*proto.Error); err != nil || !ok || e.ID != 1 || e.Code != proto.CodeUnsupported ||
		!strings.Contains(e.Message, "upgrade the relay") {
		t.Fatalf("Listen with an unknown flag: got %v, %v; want Error{1, CodeUnsupported}", m, err)
	}
	// Every field this version knows (an empty hostname last), then one it
	// does not.
	listen := append((&proto.Listen{ID: 2, Pool: "growth", Deny: "192.0.2.0/24"}).AppendPayload(nil), 0, 0)
	listen = append(listen, "appended"...)
	c.Write(proto.AppendFrame(nil, proto.TypeListen, listen))
	m, err = ctl.Read()
	if ok, isOK := m.(*proto.ListenOK); err != nil || !isOK || ok.ID != 2 {
		t.Fatalf("Listen with an appended field: got %v, %v; want ListenOK", m, err)
	}
	// The agent announced no pool feature, so the relay sent no PoolKey:
	// the reads above would have got it before the Error.
}

// pipeListener hands the relay the server ends of in-memory pipes, whose
// writes block until the other end reads: a peer that stops reading blocks
// the relay's writes at once, with no socket buffer in between.
type pipeListener struct {
	conns chan net.Conn
	done  chan struct{}
}

func newPipeListener() *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), done: make(chan struct{})}
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error {
	select {
	case <-l.done:
	default:
		close(l.done)
	}
	return nil
}

func (l *pipeListener) Addr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)} }

// dial returns the agent's end of a new pipe to the relay.
func (l *pipeListener) dial() net.Conn {
	a, b := net.Pipe()
	l.conns <- b
	return a
}

// TestShutdownWithStuckAgents: agents that stopped reading their control
// connections do not hold the shutdown: each GoAway gets at most a second,
// all at once, so a 500ms drain ends within about 1.5s, not after a write
// timeout per agent.
func TestShutdownWithStuckAgents(t *testing.T) {
	check.Leaks(t)
	srv, err := server.New(server.Config{WriteTimeout: 5 * time.Second, Logger: testutil.Logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	ln := newPipeListener()
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	for range 3 {
		c := ln.dial()
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		ctl := proto.NewConn(c, 5*time.Second, proto.DefaultMaxPayload)
		ctl.Open(&proto.Hello{Agent: "stuck"})
		m, err := ctl.Read()
		if err != nil {
			t.Fatal(err)
		}
		ctl.Send(&proto.Auth{MAC: proto.AuthMAC("", m.(*proto.Challenge).Nonce)})
		if m, err := ctl.Read(); err != nil || m.Type() != proto.TypeWelcome {
			t.Fatalf("got %v, %v; want Welcome", m, err)
		}
		// and reads nothing more
	}
	check.Eventually(t, 5*time.Second, func() error {
		if n := srv.Stats().Agents; n != 3 {
			return fmt.Errorf("%d agents", n)
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	start := time.Now()
	srv.Shutdown(ctx)
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("Shutdown with a 500ms drain took %v with three agents that do not read, want about a second", took)
	}
	if err := <-served; !errors.Is(err, server.ErrServerClosed) {
		t.Errorf("Serve = %v", err)
	}
}

// TestShutdownServesAcceptedClients: a graceful shutdown closes the public
// ports at once, but a client already accepted and waiting for its agent
// is still picked up: the control port takes data connections until the
// waiting clients are claimed.
func TestShutdownServesAcceptedClients(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	agent := testutil.NewRawAgentWith(t, relay.Addr, "", 0)
	pub := agent.Listen(t, 0)
	client := testutil.Dial(t, pub)
	in := agent.ExpectIncoming(t)

	done := make(chan error, 1)
	go func() { done <- relay.Shutdown(context.Background()) }()
	testutil.WaitRefused(t, pub)
	data := agent.Attach(t, in.Token)
	data.Write([]byte("served"))
	data.CloseWrite()
	if got := testutil.ReadAllTimeout(t, client, 5*time.Second); string(got) != "served" {
		t.Fatalf("the accepted client got %q during the shutdown, want it served", got)
	}
	client.Close()
	testutil.ReadAllTimeout(t, data, 5*time.Second)
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
}

// TestClientBudgetFairness: outside clients share the relay's budget by
// max-min fairness. A tunnel alone takes every client the budget allows
// (not a share of it); tunnels that flood it after take places from the
// biggest until they hold as many; a fourth that comes after three floods
// gets every one of the 20 clients it asks for; and never are there more
// clients than the budget. With a fixed bound per tunnel, no tunnel passes
// it, and the fourth is served all the same.
func TestClientBudgetFairness(t *testing.T) {
	for _, tc := range []struct {
		name   string
		perTun int // Config.MaxConnsPerTunnel
	}{
		{"default", 0},
		{"fixed bound", 29},
	} {
		t.Run(tc.name, func(t *testing.T) {
			check.Leaks(t)
			// 400 fds: a budget of 147 clients, and a floor of 16
			// descriptors kept for agents. Scaled down from 20,000 fds
			// (floor 500), where a few pools of 32 pre-opened connections
			// fit in it: here none do, so the agents have no pool.
			relay := testutil.StartRelay(t, server.Config{MaxFDs: 400, MaxConnsPerTunnel: tc.perTun, MaxPoolPerAgent: -1})
			budget := int(testutil.Metrics(t, relay.Server)["tcprelay_budget_clients"])
			// admitted: an admitted client is echoed; a refused one is
			// closed at once.
			admitted := func(c net.Conn) bool {
				c.SetDeadline(time.Now().Add(5 * time.Second))
				defer c.SetDeadline(time.Time{})
				if _, err := c.Write([]byte{1}); err != nil {
					return false
				}
				_, err := io.ReadFull(c, make([]byte, 1))
				return err == nil
			}
			flood := func(pub string, n int) (held []net.Conn) {
				for range n {
					if c := testutil.Dial(t, pub); admitted(c) {
						held = append(held, c)
					} else {
						c.Close()
					}
				}
				return held
			}
			var tunnels [][]net.Conn
			for i := range 3 {
				held := flood(serveAgent(t, relay.Addr, testutil.Echo), budget+10)
				tunnels = append(tunnels, held)
				t.Logf("flooding tunnel %d: %d of %d clients admitted", i+1, len(held), budget+10)
				switch {
				case tc.perTun > 0 && len(held) > tc.perTun:
					t.Errorf("a flooding tunnel got %d clients, past its bound of %d", len(held), tc.perTun)
				case i == 0 && tc.perTun == 0 && len(held) < budget-8:
					t.Errorf("a tunnel alone got %d clients of a budget of %d, want them all but the few whose descriptors are in flight (8)", len(held), budget)
				}
			}
			late := flood(serveAgent(t, relay.Addr, testutil.Echo), 20)
			t.Logf("a tunnel that came after three floods: %d of 20 admitted", len(late))
			if len(late) < 20 {
				t.Errorf("a tunnel that came after three floods got %d of 20 clients, want all", len(late))
			}
			// What each tunnel holds now: its clients still echoed (those
			// that made room were closed).
			tunnels = append(tunnels, late)
			live := make([]int, len(tunnels))
			total := 0
			for i, held := range tunnels {
				for _, c := range held {
					if admitted(c) {
						live[i]++
					}
				}
				total += live[i]
			}
			t.Logf("clients live at the end, by tunnel: %v, %d in all (budget %d)", live, total, budget)
			if total > budget {
				t.Errorf("%d clients live in all, over the budget of %d", total, budget)
			}
			if tc.perTun == 0 {
				// Max-min: the floods hold as many as each other, give or take
				// one each way, and none fewer than the late tunnel's 20.
				lo, hi := slices.Min(live[:3]), slices.Max(live[:3])
				if hi-lo > 2 || lo < len(late) {
					t.Errorf("the flooding tunnels hold %v clients: want as many each (within 2), and none fewer than the %d of the late one", live[:3], len(late))
				}
			}
		})
	}
}

// TestClientBudgetReclaimsIdlest: once the budget is spent, the places a
// newcomer tunnel takes from the biggest are its idle relayed connections:
// one the biggest tunnel's client keeps busy is never closed, each place
// taken is counted, and the biggest keeps as many clients as the newcomer.
func TestClientBudgetReclaimsIdlest(t *testing.T) {
	check.Leaks(t)
	// 200 fds: a budget of 48 clients.
	var log testutil.LockedBuffer
	relay := testutil.StartRelay(t, server.Config{MaxFDs: 200, MaxPoolPerAgent: -1, AccessLog: &log})
	budget := int(testutil.Metrics(t, relay.Server)["tcprelay_budget_clients"])
	echo := func(c net.Conn) error {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		defer c.SetDeadline(time.Time{})
		if _, err := c.Write([]byte{1}); err != nil {
			return err
		}
		_, err := io.ReadFull(c, make([]byte, 1))
		return err
	}
	big := serveAgent(t, relay.Addr, testutil.Echo)
	busy := testutil.Dial(t, big)
	if err := echo(busy); err != nil {
		t.Fatalf("the busy client: %v", err)
	}
	held := 1
	for range budget {
		if c := testutil.Dial(t, big); echo(c) == nil {
			held++
		}
	}
	t.Logf("the first tunnel holds %d clients of a budget of %d, one of them busy", held, budget)
	newcomer := serveAgent(t, relay.Addr, testutil.Echo)
	got := 0
	for i := range 20 {
		if err := echo(busy); err != nil {
			t.Fatalf("the busy client was closed to make room, before newcomer's client %d: %v", i+1, err)
		}
		if c := testutil.Dial(t, newcomer); echo(c) == nil {
			got++
		}
	}
	if err := echo(busy); err != nil {
		t.Fatalf("the busy client was closed to make room: %v", err)
	}
	m := testutil.Metrics(t, relay.Server)
	t.Logf("the newcomer got %d of 20; %d places reclaimed; %d clients now", got, m["tcprelay_clients_reclaimed_total"], m["tcprelay_clients"])
	if got < 20 {
		t.Errorf("the newcomer got %d of 20 clients, want all: the first tunnel holds more", got)
	}
	n := m["tcprelay_clients_reclaimed_total"]
	if n < 1 || int(n) > got {
		t.Errorf("clients_reclaimed_total %d: want at least one, and no more than the newcomer's %d", n, got)
	}
	// The access log says why each of them ended.
	check.Eventually(t, 5*time.Second, func() error {
		if k := strings.Count(log.String(), `"reason":"reclaimed"`); k != int(n) {
			return fmt.Errorf("%d access log lines with the reason reclaimed, want %d", k, n)
		}
		return nil
	})
}

// serveAgent registers a library agent that serves each conn with handle,
// and returns its public address.
func serveAgent(t *testing.T, relayAddr string, handle func(net.Conn)) string {
	t.Helper()
	cfg := tunnel.Config{Logger: testutil.Logger(t)}
	ln, err := cfg.Listen(testutil.Context(t), relayAddr)
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	testutil.Serve(t, ln, handle)
	return ln.Addr().String()
}

// TestAuthThrottled: wrong secrets from one address are free to try only a
// few times: after a burst, the address gets a few attempts a second, and
// the others are refused before the handshake. Other addresses are not
// slowed down.
func TestAuthThrottled(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{Secret: "the right one"})
	guess := func() (authFailed bool) {
		c := testutil.DialFrom(t, "127.0.0.2", relay.Addr)
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		ctl := proto.NewConn(c, 5*time.Second, proto.DefaultMaxPayload)
		ctl.Open(&proto.Hello{Agent: "guesser"})
		m, err := ctl.Read()
		ch, ok := m.(*proto.Challenge)
		if err != nil || !ok {
			e, isErr := m.(*proto.Error)
			if !isErr || !strings.Contains(e.Message, "too many failed authentications") {
				t.Fatalf("guess: got %v, %v; want a Challenge or a refusal for too many failures", m, err)
			}
			return false
		}
		ctl.Send(&proto.Auth{MAC: proto.AuthMAC("a guess", ch.Nonce)})
		m, _ = ctl.Read()
		if e, ok := m.(*proto.Error); !ok || e.Code != proto.CodeAuthFailed {
			t.Fatalf("wrong secret: got %v, want an authentication failure", m)
		}
		return true
	}
	start := time.Now()
	tried := 0
	for range 40 {
		if guess() {
			tried++
		}
	}
	elapsed := time.Since(start)
	t.Logf("40 guesses in %v: %d reached the secret check", elapsed.Round(time.Millisecond), tried)
	if limit := 5 + int(2*elapsed.Seconds()) + 1; tried > limit {
		t.Errorf("%d guesses reached the secret check in %v, want at most %d (a burst of 5, then 2 a second)", tried, elapsed, limit)
	}
	if n := testutil.Metrics(t, relay.Server)["tcprelay_auth_failures_total"]; n != int64(tried) {
		t.Errorf("auth_failures_total %d, want %d", n, tried)
	}
	// An agent from another address is not slowed down.
	cfg := tunnel.Config{Secret: "the right one", Logger: testutil.Logger(t)}
	ln, err := cfg.Listen(testutil.Context(t), relay.Addr)
	if err != nil {
		t.Fatalf("agent from another address: %v", err)
	}
	ln.Close()
}

// TestQuietLogUnderFlood: garbage on the control port is dropped with a
// log line at most once a second per kind, and the counts on those lines
// add up to every connection dropped, as the metric does.
func TestQuietLogUnderFlood(t *testing.T) {
	check.Leaks(t)
	var logs testutil.LockedBuffer
	relay := testutil.StartRelay(t, server.Config{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	const n = 300
	start := time.Now()
	for range n {
		c := testutil.Dial(t, relay.Addr)
		c.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
		expectClosed(t, c, 5*time.Second)
		c.Close()
	}
	elapsed := time.Since(start)
	relay.Close() // writes the counts still pending
	lines, sum := 0, 0
	for _, l := range strings.Split(logs.String(), "\n") {
		if !strings.Contains(l, "dropped connection on control port") {
			continue
		}
		lines++
		var k int
		if _, err := fmt.Sscanf(l[strings.Index(l, "count="):], "count=%d", &k); err != nil {
			t.Fatalf("log line without a count: %s", l)
		}
		sum += k
	}
	t.Logf("%d dropped connections in %v: %d log lines, counts adding up to %d", n, elapsed.Round(time.Millisecond), lines, sum)
	if sum != n {
		t.Errorf("the log's counts add up to %d, want %d", sum, n)
	}
	if max := int(elapsed.Seconds()) + 2; lines > max {
		t.Errorf("%d log lines in %v, want at most %d", lines, elapsed, max)
	}
	if m := testutil.Metrics(t, relay.Server)["tcprelay_control_dropped_total"]; m != n {
		t.Errorf("control_dropped_total %d, want %d", m, n)
	}
}

// TestStalledLinksShedLongestFirst: links whose client stopped reading hold
// kernel memory; past the relay-wide limit, the relay closes those stalled
// longest first, and leaves the others (and flowing links) alone.
func TestStalledLinksShedLongestFirst(t *testing.T) {
	check.Leaks(t)
	// Small buffers, so each stalled link holds little and fills fast.
	relay := testutil.StartRelay(t, server.Config{LinkBuffer: 128 << 10, MaxStalledMemory: 700 << 10})
	// The agent's server writes without end to each client.
	flood := func(c net.Conn) {
		chunk := make([]byte, 64<<10)
		for {
			if _, err := c.Write(chunk); err != nil {
				return
			}
		}
	}
	pub := serveAgent(t, relay.Addr, flood)
	stall := func() *net.TCPConn {
		c := testutil.Dial(t, pub)
		c.SetReadBuffer(64 << 10)
		c.Read(make([]byte, 1)) // it flows, then the client stops reading
		return c
	}
	// stalled waits until the relay counts n links' worth as stalled
	// (their reader idle for 2s), so that they stall one after another.
	var each int64
	stalled := func(n int64) {
		check.Eventually(t, 10*time.Second, func() error {
			m := testutil.Metrics(t, relay.Server)["tcprelay_stalled_memory_bytes"]
			if each == 0 && m >= 100<<10 {
				each = m
			}
			if each == 0 || m < n*each*3/4 {
				return fmt.Errorf("stalled memory %d bytes: %d links have not stalled yet", m, n)
			}
			return nil
		})
	}
	// Each stalled link holds a few hundred KiB: the limit takes two.
	first := stall()
	stalled(1)
	second := stall()
	stalled(2)
	third := stall()
	// The first to stall is closed first.
	check.Eventually(t, 15*time.Second, func() error {
		if n := testutil.Metrics(t, relay.Server)["tcprelay_stalled_closed_total"]; n == 0 {
			return fmt.Errorf("no stalled link closed (stalled memory %d bytes)", testutil.Metrics(t, relay.Server)["tcprelay_stalled_memory_bytes"])
		}
		return nil
	})
	// Closed in the order they stalled: the closed ones are the first few.
	closed := func(c net.Conn) bool {
		c.SetReadDeadline(time.Now().Add(time.Second))
		_, err := io.Copy(io.Discard, c) // drains, then EOF or reset if closed
		return !errors.Is(err, os.ErrDeadlineExceeded)
	}
	states := []bool{closed(first), closed(second), closed(third)}
	t.Logf("closed: first %v, second %v, third %v (limit %d bytes)", states[0], states[1], states[2], 700<<10)
	if !states[0] {
		t.Fatal("the link stalled longest is still open")
	}
	for i := 1; i < 3; i++ {
		if states[i] && !states[i-1] {
			t.Errorf("link %d was closed before link %d, which stalled earlier", i+1, i)
		}
	}
}

// TestStallAndIdleTimeouts: with the options set, a link whose reader took
// nothing for the stall timeout is closed, and so is one on which nothing
// moved for the idle timeout; a link in use is not.
func TestStallAndIdleTimeouts(t *testing.T) {
	check.Leaks(t)
	for _, tc := range []struct {
		name string
		cfg  server.Config
	}{
		{"stall", server.Config{StallTimeout: 2 * time.Second}},
		{"idle", server.Config{IdleTimeout: 2 * time.Second}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			relay := testutil.StartRelay(t, tc.cfg)
			// A client that sends "F" gets a flood; the others, an echo.
			pub := serveAgent(t, relay.Addr, func(c net.Conn) {
				first := make([]byte, 1)
				if _, err := io.ReadFull(c, first); err != nil {
					return
				}
				if first[0] != 'F' {
					c.Write(first)
					io.Copy(c, c)
					return
				}
				chunk := make([]byte, 64<<10)
				for {
					if _, err := c.Write(chunk); err != nil {
						return
					}
				}
			})
			victim := testutil.Dial(t, pub)
			if tc.name == "stall" {
				victim.Write([]byte("F")) // flooded, and it reads one byte only
			} else {
				victim.Write([]byte("x")) // echoed, then nothing moves
			}
			victim.Read(make([]byte, 1))
			busy := testutil.Dial(t, pub)
			start := time.Now()
			// The busy client keeps its link moving meanwhile.
			for time.Since(start) < 5*time.Second {
				if _, err := busy.Write([]byte("y")); err != nil {
					t.Fatalf("the busy link was closed: %v", err)
				}
				busy.SetReadDeadline(time.Now().Add(5 * time.Second))
				if _, err := io.ReadFull(busy, make([]byte, 1)); err != nil {
					t.Fatalf("the busy link was closed: %v", err)
				}
				time.Sleep(100 * time.Millisecond) // a client that talks now and then
			}
			victim.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.Copy(io.Discard, victim); errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("the %s link is still open after %v", tc.name, time.Since(start))
			}
			key := map[string]string{"stall": "tcprelay_stall_timeouts_total", "idle": "tcprelay_idle_timeouts_total"}[tc.name]
			if n := testutil.Metrics(t, relay.Server)[key]; n != 1 {
				t.Errorf("%s = %d, want 1", key, n)
			}
		})
	}
}
