package testutil

import (
	"bufio"
	"cmp"
	"crypto/ed25519"
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
	from       string
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
	a, refused := DialRaw(t, relayAddr, RawOptions{Secret: secret, Features: features})
	if refused != nil {
		t.Fatalf("raw agent refused: %+v", refused)
	}
	return a
}

// RawOptions shape a RawAgent's handshake.
type RawOptions struct {
	Secret   string
	Key      ed25519.PrivateKey // if set, it authenticates as this key's identity
	From     string             // if set, the IP address it dials from
	Features proto.Features     // what its Hello announces (FeatureIdentity is added with Key)
	Software string             // its Hello's agent name; if empty, "rawagent"
}

// DialRaw dials the relay and runs the handshake. It returns the agent,
// or nil and the relay's Error if the relay refused it.
func DialRaw(t testing.TB, relayAddr string, o RawOptions) (*RawAgent, *proto.Error) {
	t.Helper()
	a := &RawAgent{Conn: DialFrom(t, o.From, relayAddr), addr: relayAddr, from: o.From}
	a.br = bufio.NewReader(a.Conn)
	a.Conn.SetDeadline(time.Now().Add(10 * time.Second))
	hello := &proto.Hello{Agent: cmp.Or(o.Software, "rawagent"), Features: o.Features}
	if o.Key != nil {
		hello.Features |= proto.FeatureIdentity
	}
	var eph *proto.Ephemeral
	if hello.Features&proto.FeatureProof != 0 {
		eph = proto.NewEphemeral()
		hello.Eph = eph.Public
	}
	a.Send(t, append(proto.Preamble(), proto.Append(nil, hello)...))
	m := a.Next(t)
	if e, ok := m.(*proto.Error); ok {
		return nil, e
	}
	ch, ok := m.(*proto.Challenge)
	if !ok {
		t.Fatalf("raw agent got %s %+v, want a challenge", m.Type(), m)
	}
	if eph != nil {
		if ch.Eph == ([proto.KeyLen]byte{}) {
			t.Fatal("raw agent: the relay did not take up feature proof")
		}
		var err error
		if a.SessionKey, err = eph.SessionKey(ch.Eph, ch.Nonce); err != nil {
			t.Fatal(err)
		}
	}
	auth := &proto.Auth{MAC: proto.AuthMAC(o.Secret, ch.Nonce)}
	if o.Key != nil {
		copy(auth.Key[:], o.Key.Public().(ed25519.PublicKey))
		signed := proto.IdentityMessage(ch.Nonce, hello.Eph, ch.Eph, nil)
		copy(auth.Sig[:], ed25519.Sign(o.Key, signed))
	}
	a.Send(t, proto.Append(nil, auth))
	switch m := a.Next(t).(type) {
	case *proto.Welcome:
	case *proto.Error:
		return nil, m
	default:
		t.Fatalf("raw agent got %s %+v, want Welcome", m.Type(), m)
	}
	// A session the relay keeps gets its pool key (if both speak pools)
	// next; one it turns away at its limits, an Error.
	if hello.Features&ch.Features&proto.FeaturePool != 0 {
		switch m := a.read(t).(type) {
		case *proto.PoolKey:
			a.PoolKey = m
		case *proto.Error:
			return nil, m
		default:
			t.Fatalf("raw agent got %s %+v after Welcome, want its pool key", m.Type(), m)
		}
	}
	return a, nil
}

// DialFrom is Dial from the IP address from, if it is not empty.
func DialFrom(t testing.TB, from, addr string) *net.TCPConn {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	if from != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
	}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
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
		switch m := a.read(t).(type) {
		case *proto.Ping:
		case *proto.PoolKey:
			a.PoolKey = m
		default:
			return m
		}
	}
}

// read reads and parses the next frame, whatever it is.
func (a *RawAgent) read(t testing.TB) proto.Message {
	t.Helper()
	typ, payload, err := proto.ReadFrame(a.br, nil, proto.DefaultMaxPayload)
	if err != nil {
		t.Fatalf("raw agent read: %v", err)
	}
	m, err := proto.Parse(typ, payload)
	if err != nil {
		t.Fatalf("raw agent parse %s: %v", typ, err)
	}
	return m
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
	c := DialFrom(t, a.from, a.addr)
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
	c := DialFrom(t, a.from, a.addr)
	if _, err := c.Write(proto.Append(proto.Preamble(), m)); err != nil {
		t.Fatalf("open data connection: %v", err)
	}
	return c
}
