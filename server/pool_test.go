package server_test

import (
	"io"
	"net"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/proto"
	"tcprelay/internal/testutil"
	"tcprelay/server"
)

// readBind reads exactly one Bind frame from a parked connection.
func readBind(t *testing.T, c net.Conn) *proto.Bind {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	typ, payload, err := proto.ReadFrame(c, nil, proto.DefaultMaxPayload)
	if err != nil {
		t.Fatalf("read bind: %v", err)
	}
	m, err := proto.Parse(typ, payload)
	if err != nil {
		t.Fatal(err)
	}
	b, ok := m.(*proto.Bind)
	if !ok {
		t.Fatalf("got %s on a parked connection, want bind", typ)
	}
	return b
}

// TestPooledConnection: a client is joined to a parked data connection
// without any Incoming on the control connection.
func TestPooledConnection(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	agent := testutil.NewRawAgent(t, relay.Addr, "")
	pub := agent.Listen(t, 0)
	if agent.PoolKey == nil || agent.PoolKey.Max != 32 {
		t.Fatalf("pool key %+v, want one allowing 32 connections", agent.PoolKey)
	}
	parked := agent.Park(t, agent.PoolKey.Key)
	testutil.WaitParked(t, relay, 1)
	client := testutil.Dial(t, pub)
	b := readBind(t, parked)
	if b.Client != client.LocalAddr().String() || b.Local != client.RemoteAddr().String() {
		t.Fatalf("bind %+v, want client %s local %s", b, client.LocalAddr(), client.RemoteAddr())
	}
	client.Write([]byte("ping"))
	buf := make([]byte, 4)
	if _, err := io.ReadFull(parked, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("parked conn read %q %v", buf, err)
	}
	parked.Write([]byte("pong"))
	client.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(client, buf); err != nil || string(buf) != "pong" {
		t.Fatalf("client read %q %v", buf, err)
	}
	// No Incoming was sent: the next frame on the control connection is the
	// answer to this ping.
	agent.Send(t, proto.Append(nil, &proto.Ping{Data: 9}))
	if m := agent.Next(t); m.Type() != proto.TypePong {
		t.Fatalf("control connection got %s, want only the pong", m.Type())
	}
}

func TestPoolRefusals(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{MaxPoolPerAgent: 2})
	agent := testutil.NewRawAgent(t, relay.Addr, "")
	agent.Listen(t, 0)

	wrong := agent.PoolKey.Key
	wrong[3] ^= 0x40
	expectClosed(t, agent.Park(t, wrong), 5*time.Second)

	a, b := agent.Park(t, agent.PoolKey.Key), agent.Park(t, agent.PoolKey.Key)
	testutil.WaitParked(t, relay, 2)
	expectClosed(t, agent.Park(t, agent.PoolKey.Key), 5*time.Second)
	for _, conn := range []*net.TCPConn{a, b} {
		conn.SetReadDeadline(time.Now().Add(time.Millisecond))
		if _, err := conn.Read(make([]byte, 1)); err == nil || !err.(net.Error).Timeout() {
			t.Fatalf("a parked connection within the limit was closed: %v", err)
		}
	}
}

// TestDeadPooledConnSkipped: a parked connection the agent closed is not
// used; the client is announced with Incoming instead.
func TestDeadPooledConnSkipped(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	agent := testutil.NewRawAgent(t, relay.Addr, "")
	pub := agent.Listen(t, 0)
	parked := agent.Park(t, agent.PoolKey.Key)
	testutil.WaitParked(t, relay, 1)
	parked.Close()

	client := testutil.Dial(t, pub)
	in := agent.ExpectIncoming(t)
	data := agent.Attach(t, in.Token)
	client.Write([]byte("x"))
	data.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(data, make([]byte, 1)); err != nil {
		t.Fatalf("fallback path: %v", err)
	}
}

// TestPoolDiesWithSession: parked connections are closed when their agent's
// session ends.
func TestPoolDiesWithSession(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	agent := testutil.NewRawAgent(t, relay.Addr, "")
	agent.Listen(t, 0)
	parked := agent.Park(t, agent.PoolKey.Key)
	testutil.WaitParked(t, relay, 1)
	agent.Conn.Close()
	expectClosed(t, parked, 5*time.Second)
}
