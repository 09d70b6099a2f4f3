package testutil

import (
	"bufio"
	"net"
	"strconv"
	"testing"
	"time"

	"tcprelay/internal/proto"
)

// RawAgent speaks the wire protocol frame by frame, so tests can make an
// agent misbehave in ways the tunnel package never would.
type RawAgent struct {
	Conn       *net.TCPConn
	PoolKey    *proto.PoolKey     // the relay's offer of pre-opened data connections, if any
	SessionKey [proto.MACLen]byte // with feature proof: the session key
	br         *bufio.Reader
	addr       string
}

// NewRawAgent dials the relay and completes the handshake with secret,
// announcing feature pool.
func NewRawAgent(t testing.TB, relayAddr, secret string) *RawAgent {
	t.Helper()
	return NewRawAgentWith(t, relayAddr, secret, proto.FeaturePool)
}

// NewRawAgentWith is NewRawAgent announcing features; with FeatureProof it
// runs the key exchange and keeps the session key.
func NewRawAgentWith(t testing.TB, relayAddr, secret string, features proto.Features) *RawAgent {
	t.Helper()
	a := &RawAgent{Conn: Dial(t, relayAddr), addr: relayAddr}
	a.br = bufio.NewReader(a.Conn)
	a.Conn.SetDeadline(time.Now().Add(10 * time.Second))
	hello := &proto.Hello{Agent: "rawagent", Features: features}
	var eph *proto.Ephemeral
	if features&proto.FeatureProof != 0 {
		eph = proto.NewEphemeral()
		hello.Eph = eph.Public
	}
	a.Send(t, append(proto.Preamble(), proto.Append(nil, hello)...))
	ch := a.Expect(t, proto.TypeChallenge).(*proto.Challenge)
	if eph != nil {
		if ch.Eph == ([proto.KeyLen]byte{}) {
			t.Fatal("raw agent: the relay did not take up feature proof")
		}
		var err error
		if a.SessionKey, err = eph.SessionKey(ch.Eph, ch.Nonce); err != nil {
			t.Fatal(err)
		}
	}
	a.Send(t, proto.Append(nil, &proto.Auth{MAC: proto.AuthMAC(secret, ch.Nonce)}))
	a.Expect(t, proto.TypeWelcome)
	return a
}

// Send writes raw bytes on the control connection.
func (a *RawAgent) Send(t testing.TB, b []byte) {
	t.Helper()
	if _, err := a.Conn.Write(b); err != nil {
		t.Fatalf("raw agent write: %v", err)
	}
}

// Next reads the next frame that is not a Ping or a PoolKey (kept in
// PoolKey).
func (a *RawAgent) Next(t testing.TB) proto.Message {
	t.Helper()
	for {
		typ, payload, err := proto.ReadFrame(a.br, nil, proto.DefaultMaxPayload)
		if err != nil {
			t.Fatalf("raw agent read: %v", err)
		}
		m, err := proto.Parse(typ, payload)
		if err != nil {
			t.Fatalf("raw agent parse %s: %v", typ, err)
		}
		switch m := m.(type) {
		case *proto.Ping:
		case *proto.PoolKey:
			a.PoolKey = m
		default:
			return m
		}
	}
}

// Expect reads the next frame and fails unless it has type want.
func (a *RawAgent) Expect(t testing.TB, want proto.Type) proto.Message {
	t.Helper()
	m := a.Next(t)
	if m.Type() != want {
		t.Fatalf("raw agent got %s %+v, want %s", m.Type(), m, want)
	}
	return m
}

// Listen opens a tunnel and returns its public address on 127.0.0.1.
func (a *RawAgent) Listen(t testing.TB, port int) string {
	t.Helper()
	a.Send(t, proto.Append(nil, &proto.Listen{ID: 7, Port: uint16(port)}))
	ok := a.Expect(t, proto.TypeListenOK).(*proto.ListenOK)
	if ok.ID != 7 {
		t.Fatalf("ListenOK for request %d, want 7", ok.ID)
	}
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(int(ok.Port)))
}

// ExpectIncoming waits for the announcement of an outside client.
func (a *RawAgent) ExpectIncoming(t testing.TB) *proto.Incoming {
	t.Helper()
	return a.Expect(t, proto.TypeIncoming).(*proto.Incoming)
}

// Attach opens a data connection carrying token.
func (a *RawAgent) Attach(t testing.TB, token [proto.TokenLen]byte) *net.TCPConn {
	t.Helper()
	c := Dial(t, a.addr)
	if _, err := c.Write(proto.Append(proto.Preamble(), &proto.Attach{Token: token})); err != nil {
		t.Fatalf("attach: %v", err)
	}
	return c
}

// Park opens a pre-opened data connection with key.
func (a *RawAgent) Park(t testing.TB, key [proto.TokenLen]byte) *net.TCPConn {
	t.Helper()
	return a.Open(t, &proto.PoolJoin{Key: key})
}

// Open opens a data connection whose first frame is m.
func (a *RawAgent) Open(t testing.TB, m proto.Message) *net.TCPConn {
	t.Helper()
	c := Dial(t, a.addr)
	if _, err := c.Write(proto.Append(proto.Preamble(), m)); err != nil {
		t.Fatalf("open data connection: %v", err)
	}
	return c
}
