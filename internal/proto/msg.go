package proto

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
)

// Message is a decoded frame payload.
type Message interface {
	Type() Type
	// AppendPayload appends the encoded payload (not the frame header).
	AppendPayload(dst []byte) []byte
}

// Flags of a Listen request. A relay refuses a request with a flag bit it
// does not know (CodeUnsupported), rather than ignore what it was asked.
const (
	// ListenPortRequired makes the relay fail the request instead of picking
	// another port when the requested one is not available.
	ListenPortRequired uint32 = 1 << 0
	// ListenUnready registers the member as not ready for clients yet
	// (feature ready); a Ready message changes that.
	ListenUnready uint32 = 1 << 1

	// ListenKnownFlags are the flags this version knows.
	ListenKnownFlags = ListenPortRequired | ListenUnready
)

// Error codes carried by Error frames.
const (
	CodeBadRequest      uint16 = 1 // malformed or unexpected request
	CodeAuthFailed      uint16 = 2 // wrong or missing secret
	CodePortUnavailable uint16 = 3 // requested port in use or outside the allowed range
	CodeLimit           uint16 = 4 // a relay limit was reached
	CodeShuttingDown    uint16 = 5 // the relay is going away
	CodeInternal        uint16 = 6 // the relay failed for its own reasons
	CodeUnsupported     uint16 = 7 // the request needs a feature, flag or version the receiver lacks
	CodePortReserved    uint16 = 8 // the port is reserved for another owner for a while
)

// Hello opens a control connection.
type Hello struct {
	Agent    string   // free-form software name and version, for the relay's logs
	Features Features // what the agent speaks
	// Eph is the agent's ephemeral X25519 public key (feature proof);
	// zero: none.
	Eph [KeyLen]byte
}

// Challenge carries the relay's nonce.
type Challenge struct {
	Nonce    [NonceLen]byte
	Features Features // what the relay speaks
	// Eph is the relay's ephemeral X25519 public key (feature proof);
	// zero: none.
	Eph [KeyLen]byte
}

// Auth carries the agent's HMAC of the nonce and, with feature identity,
// its Ed25519 public key and signature (see IdentityMessage).
type Auth struct {
	MAC [MACLen]byte
	Key [KeyLen]byte // zero: no key
	Sig [SigLen]byte
}

// Welcome ends the handshake.
type Welcome struct {
	// HeartbeatMillis is how often each side sends a Ping on the control
	// connection; 0 means the relay sends none.
	HeartbeatMillis uint32
}

// Listen asks for a public port.
type Listen struct {
	ID    uint32 // chosen by the agent, echoed in the answer
	Port  uint16 // 0: any port
	Flags uint32 // ListenPortRequired
	// Resume is the token a ListenOK for Port gave an earlier session: it
	// proves this agent owns the port's reservation. Zero: none.
	Resume [TokenLen]byte
	// Pool, if not empty, joins the endpoint of that name (feature pools),
	// served by every agent that joins it, on one port.
	Pool string
	// Allow and Deny narrow who may reach this member (feature acl):
	// comma-separated CIDR prefixes (see ParsePrefixes). A client from a
	// Deny prefix, or from none of a non-empty Allow, is not relayed to it.
	Allow, Deny string
	// Hostname, if not empty, asks for a name on the relay's shared TLS
	// port rather than a port of its own (feature hostname): a label or
	// labels under the relay's domain ("db", "api.team-a"), or the whole
	// name. Port is then 0.
	Hostname string
}

// ListenOK answers a Listen.
type ListenOK struct {
	ID     uint32
	Tunnel uint32 // names the tunnel in Incoming and Close
	Host   string // advertised public host; empty means the host the agent dialed
	Port   uint16
	// Resume lets a later session of this agent claim Port while the relay
	// keeps it reserved (Listen.Resume). Zero: none.
	Resume [TokenLen]byte
}

// Error fails request ID (0: the session itself).
type Error struct {
	ID      uint32
	Code    uint16
	Message string
}

func (e *Error) Error() string { return fmt.Sprintf("relay error %d: %s", e.Code, e.Message) }

// Incoming announces an outside client waiting on a tunnel.
type Incoming struct {
	Tunnel uint32
	Token  [TokenLen]byte
	Client string // the outside client's address, ip:port
	Local  string // the relay address the client connected to, ip:port
}

// Close releases a tunnel's public port.
type Close struct{ Tunnel uint32 }

// Ping asks the peer for a Pong with the same Data.
type Ping struct{ Data uint64 }

// Pong answers a Ping.
type Pong struct{ Data uint64 }

// GoAway says the relay is shutting down; no new requests will be served.
type GoAway struct {
	Message string
	// RetryMillis, if not zero, says the relay expects to be back soon (a
	// restart): the agent should try again every RetryMillis for a while,
	// instead of backing off.
	RetryMillis uint32
}

// Attach is the only frame of a data connection; raw bytes follow it.
type Attach struct {
	Token [TokenLen]byte
	// MAC proves the session's key (feature proof): ProofMAC(key,
	// "attach", token). Zero: none.
	MAC [MACLen]byte
}

// PoolKey lets the agent pre-open data connections for this session, up to
// Max at a time. Relays that send none do not pool.
type PoolKey struct {
	Key [TokenLen]byte
	Max uint16
}

// PoolJoin opens a pre-opened data connection: the relay parks it until an
// outside client arrives, then sends Bind on it.
type PoolJoin struct {
	Key [TokenLen]byte
	// With feature proof: Seq is this join's number in its session (from 1,
	// never reused) and MAC is ProofMAC(session key, "pool-join", Key ||
	// Seq), so a join seen on the wire cannot be replayed.
	Seq uint64
	MAC [MACLen]byte
}

// Ready says whether the agent's member of a tunnel can take new clients
// (feature ready): an agent whose server is down says false, and the relay
// sends its clients to the endpoint's other members.
type Ready struct {
	Tunnel uint32
	Ready  bool
}

// End ends one direction of the client's stream on a pre-opened data
// connection (feature reuse), in place of a FIN on that connection: the
// stream the sender wrote on the data connection joined with the PoolJoin
// numbered Seq ends after Bytes bytes (counted from the byte after Bind).
// The relay sends it when the client ends its half; the agent sends it,
// after the relay's, to hand the connection back for the next client.
type End struct {
	Seq   uint64
	Bytes uint64
}

// Bind is the relay's only frame on a pre-opened data connection: from the
// next byte on, it carries the outside client's stream.
type Bind struct {
	Tunnel uint32
	Client string // the outside client's address, ip:port
	Local  string // the relay address the client connected to, ip:port
}

func (*Hello) Type() Type     { return TypeHello }
func (*Challenge) Type() Type { return TypeChallenge }
func (*Auth) Type() Type      { return TypeAuth }
func (*Welcome) Type() Type   { return TypeWelcome }
func (*Listen) Type() Type    { return TypeListen }
func (*ListenOK) Type() Type  { return TypeListenOK }
func (*Error) Type() Type     { return TypeError }
func (*Incoming) Type() Type  { return TypeIncoming }
func (*Close) Type() Type     { return TypeClose }
func (*Ping) Type() Type      { return TypePing }
func (*Pong) Type() Type      { return TypePong }
func (*GoAway) Type() Type    { return TypeGoAway }
func (*Attach) Type() Type    { return TypeAttach }
func (*PoolKey) Type() Type   { return TypePoolKey }
func (*PoolJoin) Type() Type  { return TypePoolJoin }
func (*Bind) Type() Type      { return TypeBind }
func (*Ready) Type() Type     { return TypeReady }
func (*End) Type() Type       { return TypeEnd }

// Optional fields (added after version 2, see docs/PROTOCOL.md) are
// appended only when set, so a message without them has its version-2
// shape.

func (m *Hello) AppendPayload(b []byte) []byte {
	b = appendString(b, m.Agent)
	b = binary.BigEndian.AppendUint64(b, uint64(m.Features))
	if m.Eph != ([KeyLen]byte{}) {
		b = append(b, m.Eph[:]...)
	}
	return b
}
func (m *Challenge) AppendPayload(b []byte) []byte {
	b = append(b, m.Nonce[:]...)
	b = binary.BigEndian.AppendUint64(b, uint64(m.Features))
	if m.Eph != ([KeyLen]byte{}) {
		b = append(b, m.Eph[:]...)
	}
	return b
}
func (m *Auth) AppendPayload(b []byte) []byte {
	b = append(b, m.MAC[:]...)
	if m.Key != ([KeyLen]byte{}) || m.Sig != ([SigLen]byte{}) {
		b = append(append(b, m.Key[:]...), m.Sig[:]...)
	}
	return b
}
func (m *Welcome) AppendPayload(b []byte) []byte {
	return binary.BigEndian.AppendUint32(b, m.HeartbeatMillis)
}
func (m *Listen) AppendPayload(b []byte) []byte {
	b = binary.BigEndian.AppendUint32(b, m.ID)
	b = binary.BigEndian.AppendUint16(b, m.Port)
	b = binary.BigEndian.AppendUint32(b, m.Flags)
	// Optional fields are written up to the last one set: an earlier one
	// that is not set goes as zero.
	if m.Resume != ([TokenLen]byte{}) || m.Pool != "" || m.Allow != "" || m.Deny != "" || m.Hostname != "" {
		b = append(b, m.Resume[:]...)
	}
	if m.Pool != "" || m.Allow != "" || m.Deny != "" || m.Hostname != "" {
		b = appendString(b, m.Pool)
	}
	if m.Allow != "" || m.Deny != "" || m.Hostname != "" {
		b = appendString(b, m.Allow)
		b = appendString(b, m.Deny)
	}
	if m.Hostname != "" {
		b = appendString(b, m.Hostname)
	}
	return b
}
func (m *ListenOK) AppendPayload(b []byte) []byte {
	b = binary.BigEndian.AppendUint32(b, m.ID)
	b = binary.BigEndian.AppendUint32(b, m.Tunnel)
	b = appendString(b, m.Host)
	b = binary.BigEndian.AppendUint16(b, m.Port)
	if m.Resume != ([TokenLen]byte{}) {
		b = append(b, m.Resume[:]...)
	}
	return b
}
func (m *Error) AppendPayload(b []byte) []byte {
	b = binary.BigEndian.AppendUint32(b, m.ID)
	b = binary.BigEndian.AppendUint16(b, m.Code)
	return appendString(b, m.Message)
}
func (m *Incoming) AppendPayload(b []byte) []byte {
	b = binary.BigEndian.AppendUint32(b, m.Tunnel)
	b = append(b, m.Token[:]...)
	b = appendString(b, m.Client)
	return appendString(b, m.Local)
}
func (m *Close) AppendPayload(b []byte) []byte { return binary.BigEndian.AppendUint32(b, m.Tunnel) }
func (m *Ping) AppendPayload(b []byte) []byte  { return binary.BigEndian.AppendUint64(b, m.Data) }
func (m *Pong) AppendPayload(b []byte) []byte  { return binary.BigEndian.AppendUint64(b, m.Data) }
func (m *GoAway) AppendPayload(b []byte) []byte {
	b = appendString(b, m.Message)
	if m.RetryMillis != 0 {
		b = binary.BigEndian.AppendUint32(b, m.RetryMillis)
	}
	return b
}
func (m *Attach) AppendPayload(b []byte) []byte {
	b = append(b, m.Token[:]...)
	if m.MAC != ([MACLen]byte{}) {
		b = append(b, m.MAC[:]...)
	}
	return b
}
func (m *PoolKey) AppendPayload(b []byte) []byte {
	b = append(b, m.Key[:]...)
	return binary.BigEndian.AppendUint16(b, m.Max)
}
func (m *PoolJoin) AppendPayload(b []byte) []byte {
	b = append(b, m.Key[:]...)
	if m.Seq != 0 || m.MAC != ([MACLen]byte{}) {
		b = binary.BigEndian.AppendUint64(b, m.Seq)
		b = append(b, m.MAC[:]...)
	}
	return b
}
func (m *Ready) AppendPayload(b []byte) []byte {
	b = binary.BigEndian.AppendUint32(b, m.Tunnel)
	if m.Ready {
		return append(b, 1)
	}
	return append(b, 0)
}
func (m *End) AppendPayload(b []byte) []byte {
	b = binary.BigEndian.AppendUint64(b, m.Seq)
	return binary.BigEndian.AppendUint64(b, m.Bytes)
}
func (m *Bind) AppendPayload(b []byte) []byte {
	b = binary.BigEndian.AppendUint32(b, m.Tunnel)
	b = appendString(b, m.Client)
	return appendString(b, m.Local)
}

// Append appends m as a complete frame (header and payload) to dst.
func Append(dst []byte, m Message) []byte {
	start := len(dst)
	dst = append(dst, byte(m.Type()), 0, 0, 0, 0)
	dst = m.AppendPayload(dst)
	binary.BigEndian.PutUint32(dst[start+1:], uint32(len(dst)-start-HeaderLen))
	return dst
}

// ErrUnknownType is returned by Parse for a frame type this version does not
// know. After the handshake such frames are skipped, so newer peers can add
// messages without breaking older ones.
var ErrUnknownType = errors.New("unknown frame type")

// ErrBadValue is returned by Parse for a field whose value is not one the
// protocol allows (a Ready byte other than 0 or 1).
var ErrBadValue = errors.New("field value not allowed")

// Parse decodes the payload of a frame of type t. The result does not alias
// payload. Bytes after the last field this version knows are ignored: a
// newer peer appends fields to a message, and an older one reads what it
// knows (see docs/PROTOCOL.md, "How the protocol grows").
func Parse(t Type, payload []byte) (Message, error) {
	d := decoder{b: payload}
	var m Message
	switch t {
	case TypeHello:
		v := &Hello{Agent: d.string(), Features: Features(d.u64())}
		if d.more() {
			d.bytes(v.Eph[:])
		}
		m = v
	case TypeChallenge:
		v := &Challenge{}
		d.bytes(v.Nonce[:])
		v.Features = Features(d.u64())
		if d.more() {
			d.bytes(v.Eph[:])
		}
		m = v
	case TypeAuth:
		v := &Auth{}
		d.bytes(v.MAC[:])
		if d.more() {
			d.bytes(v.Key[:])
			d.bytes(v.Sig[:])
		}
		m = v
	case TypeWelcome:
		m = &Welcome{HeartbeatMillis: d.u32()}
	case TypeListen:
		v := &Listen{ID: d.u32(), Port: d.u16(), Flags: d.u32()}
		if d.more() {
			d.bytes(v.Resume[:])
		}
		if d.more() {
			v.Pool = d.string()
		}
		if d.more() {
			v.Allow, v.Deny = d.string(), d.string()
		}
		if d.more() {
			v.Hostname = d.string()
		}
		m = v
	case TypeListenOK:
		v := &ListenOK{ID: d.u32(), Tunnel: d.u32(), Host: d.string(), Port: d.u16()}
		if d.more() {
			d.bytes(v.Resume[:])
		}
		m = v
	case TypeError:
		m = &Error{ID: d.u32(), Code: d.u16(), Message: d.string()}
	case TypeIncoming:
		v := &Incoming{Tunnel: d.u32()}
		d.bytes(v.Token[:])
		v.Client = d.string()
		v.Local = d.string()
		m = v
	case TypeClose:
		m = &Close{Tunnel: d.u32()}
	case TypePing:
		m = &Ping{Data: d.u64()}
	case TypePong:
		m = &Pong{Data: d.u64()}
	case TypeGoAway:
		v := &GoAway{Message: d.string()}
		if d.more() {
			v.RetryMillis = d.u32()
		}
		m = v
	case TypeAttach:
		v := &Attach{}
		d.bytes(v.Token[:])
		if d.more() {
			d.bytes(v.MAC[:])
		}
		m = v
	case TypePoolKey:
		v := &PoolKey{}
		d.bytes(v.Key[:])
		v.Max = d.u16()
		m = v
	case TypePoolJoin:
		v := &PoolJoin{}
		d.bytes(v.Key[:])
		if d.more() {
			v.Seq = d.u64()
			d.bytes(v.MAC[:])
		}
		m = v
	case TypeBind:
		m = &Bind{Tunnel: d.u32(), Client: d.string(), Local: d.string()}
	case TypeEnd:
		m = &End{Seq: d.u64(), Bytes: d.u64()}
	case TypeReady:
		v := &Ready{Tunnel: d.u32()}
		if b := d.take(1); b != nil {
			if b[0] > 1 {
				d.err = fmt.Errorf("%w: want 0 or 1, got %d", ErrBadValue, b[0])
			}
			v.Ready = b[0] == 1
		}
		m = v
	default:
		return nil, fmt.Errorf("%w: %s", ErrUnknownType, t)
	}
	if d.err != nil {
		return nil, fmt.Errorf("%s: %w", t, d.err)
	}
	return m, nil
}

// appendString appends a string as a 2-byte big-endian length and its bytes.
// Longer strings are truncated: every string on the wire is informational
// (names, addresses, messages) and far below the limit.
func appendString(b []byte, s string) []byte {
	if len(s) > math.MaxUint16 {
		s = s[:math.MaxUint16]
	}
	b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}

// decoder reads fields off a payload; the first short read sets err and
// every later read returns zero.
type decoder struct {
	b   []byte
	err error
}

// more reports whether the payload goes on: the next fields, added after
// version 2, are present. A payload that ends before them leaves them zero.
func (d *decoder) more() bool { return d.err == nil && len(d.b) > 0 }

func (d *decoder) take(n int) []byte {
	if d.err != nil {
		return nil
	}
	if len(d.b) < n {
		d.err = ErrShortPayload
		d.b = nil
		return nil
	}
	v := d.b[:n]
	d.b = d.b[n:]
	return v
}

func (d *decoder) u16() uint16 {
	if v := d.take(2); v != nil {
		return binary.BigEndian.Uint16(v)
	}
	return 0
}

func (d *decoder) u32() uint32 {
	if v := d.take(4); v != nil {
		return binary.BigEndian.Uint32(v)
	}
	return 0
}

func (d *decoder) u64() uint64 {
	if v := d.take(8); v != nil {
		return binary.BigEndian.Uint64(v)
	}
	return 0
}

func (d *decoder) bytes(dst []byte) {
	copy(dst, d.take(len(dst)))
}

func (d *decoder) string() string {
	n := d.u16()
	return string(d.take(int(n)))
}
