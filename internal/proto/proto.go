// Package proto is the relay's wire format: the connection preamble, the
// length-prefixed frames and the messages they carry. docs/PROTOCOL.md is the
// normative description; this file and that one change together.
package proto

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Version is the protocol version sent in every preamble. Version 2 made
// messages extensible (trailing fields), added feature sets to the
// handshake and refuses unknown flag bits.
const Version = 2

// Magic starts every connection an agent opens to the relay's control port.
var Magic = [4]byte{'T', 'R', 'L', 'Y'}

// PreambleLen is the length of magic + version.
const PreambleLen = 5

// HeaderLen is the length of a frame header: type (1 byte) + payload length
// (4 bytes, big endian).
const HeaderLen = 5

// Limits on frame payloads.
const (
	// MaxPreAuthPayload bounds every frame read before authentication.
	MaxPreAuthPayload = 1024
	// DefaultMaxPayload bounds every frame after authentication.
	DefaultMaxPayload = 16 * 1024
)

// TokenLen is the length of a data-connection token (128 bits).
const TokenLen = 16

// NonceLen is the length of the relay's authentication challenge.
const NonceLen = 32

// MACLen is the length of the agent's answer (HMAC-SHA256).
const MACLen = sha256.Size

// KeyLen is the length of a public key: X25519 or Ed25519.
const KeyLen = 32

// SigLen is the length of an Ed25519 signature.
const SigLen = 64

// Type identifies a frame.
type Type uint8

// Frame types. Values are part of the wire format.
const (
	TypeHello     Type = 0x01 // agent → relay: first frame of a control connection
	TypeChallenge Type = 0x02 // relay → agent: nonce to authenticate with
	TypeAuth      Type = 0x03 // agent → relay: HMAC of the nonce
	TypeWelcome   Type = 0x04 // relay → agent: session established
	TypeListen    Type = 0x05 // agent → relay: open a public port
	TypeListenOK  Type = 0x06 // relay → agent: the public port is open
	TypeError     Type = 0x07 // relay → agent: a request failed, or the session is refused
	TypeIncoming  Type = 0x08 // relay → agent: an outside client is waiting
	TypeClose     Type = 0x09 // agent → relay: close one tunnel
	TypePing      Type = 0x0A // either way: liveness probe
	TypePong      Type = 0x0B // either way: answer to a ping
	TypeGoAway    Type = 0x0C // relay → agent: the relay is shutting down
	TypePoolKey   Type = 0x0D // relay → agent: key for pre-opened data connections
	TypeAttach    Type = 0x10 // agent → relay: first and only frame of a data connection
	TypePoolJoin  Type = 0x11 // agent → relay: first frame of a pre-opened data connection
	TypeBind      Type = 0x12 // relay → agent: on a pre-opened data connection, a client is joined
	TypeReady     Type = 0x13 // agent → relay: whether a tunnel's member can take clients
	TypeEnd       Type = 0x14 // either way: a pre-opened data connection's stream in one direction ended
)

// Features is a set of optional protocol features, one bit each. Each side
// announces the set it speaks in the handshake (Hello, Challenge); a
// feature is in use only when both speak it. Bit values are part of the
// wire format.
type Features uint64

const (
	// FeaturePool: pre-opened data connections (PoolKey, PoolJoin, Bind).
	FeaturePool Features = 1 << 0
	// FeatureIdentity: agents authenticate with an Ed25519 key (Auth.Key,
	// Auth.Sig).
	FeatureIdentity Features = 1 << 1
	// FeatureProof: both sides derive a session key from an X25519
	// exchange (Hello.Eph, Challenge.Eph); data connections prove they
	// belong to the session with it (Attach.MAC, PoolJoin.Seq and MAC).
	FeatureProof Features = 1 << 2
	// FeaturePools: several agents serve one endpoint (Listen.Pool).
	FeaturePools Features = 1 << 3
	// FeatureReady: a member says whether it can take clients (Ready,
	// ListenUnready).
	FeatureReady Features = 1 << 4
	// FeatureACL: a member narrows who may reach it (Listen.Allow and
	// Listen.Deny).
	FeatureACL Features = 1 << 5
	// FeatureHostname: an endpoint may be a name on the relay's shared TLS
	// port, routed by the server name of each client's ClientHello
	// (Listen.Hostname).
	FeatureHostname Features = 1 << 6
	// FeatureReuse: a pre-opened data connection serves one client after
	// another: the end of each direction of a client's stream is an End on
	// the control connection instead of a FIN (needs pool and proof).
	FeatureReuse Features = 1 << 7
)

// featureNames names each feature, in bit order, for messages and docs.
var featureNames = []struct {
	f    Features
	name string
}{
	{FeaturePool, "pool"},
	{FeatureIdentity, "identity"},
	{FeatureProof, "proof"},
	{FeaturePools, "pools"},
	{FeatureReady, "ready"},
	{FeatureACL, "acl"},
	{FeatureHostname, "hostname"},
	{FeatureReuse, "reuse"},
}

// String names the features in f, comma-separated; unknown bits are shown
// as hex.
func (f Features) String() string {
	var names []string
	for _, fn := range featureNames {
		if f&fn.f != 0 {
			names = append(names, fn.name)
			f &^= fn.f
		}
	}
	if f != 0 {
		names = append(names, fmt.Sprintf("0x%x", uint64(f)))
	}
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, ",")
}

// ErrUnsupported: a peer lacks a feature, flag or version that is needed.
var ErrUnsupported = errors.New("unsupported")

// UnsupportedError names the features a peer lacks. It matches
// ErrUnsupported with errors.Is.
type UnsupportedError struct {
	Peer    string // "relay" or "agent"
	Missing Features
}

func (e *UnsupportedError) Error() string {
	return fmt.Sprintf("%s does not support %s: upgrade the %s", e.Peer, e.Missing, e.Peer)
}

func (e *UnsupportedError) Is(target error) bool { return target == ErrUnsupported }

// Require returns an *UnsupportedError naming the features of need that
// peer (the other side: "relay" or "agent") does not have, or nil.
func Require(peer string, have, need Features) error {
	if missing := need &^ have; missing != 0 {
		return &UnsupportedError{Peer: peer, Missing: missing}
	}
	return nil
}

func (t Type) String() string {
	switch t {
	case TypeHello:
		return "hello"
	case TypeChallenge:
		return "challenge"
	case TypeAuth:
		return "auth"
	case TypeWelcome:
		return "welcome"
	case TypeListen:
		return "listen"
	case TypeListenOK:
		return "listen-ok"
	case TypeError:
		return "error"
	case TypeIncoming:
		return "incoming"
	case TypeClose:
		return "close"
	case TypePing:
		return "ping"
	case TypePong:
		return "pong"
	case TypeGoAway:
		return "goaway"
	case TypeAttach:
		return "attach"
	case TypePoolKey:
		return "pool-key"
	case TypePoolJoin:
		return "pool-join"
	case TypeBind:
		return "bind"
	case TypeReady:
		return "ready"
	case TypeEnd:
		return "end"
	}
	return fmt.Sprintf("type(0x%02x)", uint8(t))
}

// Errors returned by the decoder.
var (
	ErrBadMagic     = errors.New("not a relay connection (bad magic)")
	ErrVersion      = errors.New("unsupported protocol version")
	ErrFrameTooBig  = errors.New("frame too large")
	ErrShortPayload = errors.New("payload too short")
)

// Preamble returns magic + version.
func Preamble() []byte {
	return []byte{Magic[0], Magic[1], Magic[2], Magic[3], Version}
}

// CheckPreamble validates the first PreambleLen bytes of a connection.
func CheckPreamble(b []byte) error {
	if len(b) < PreambleLen || [4]byte(b[:4]) != Magic {
		return ErrBadMagic
	}
	if b[4] != Version {
		side := "agent"
		if b[4] > Version {
			side = "relay"
		}
		return fmt.Errorf("%w %d: this relay speaks version %d; upgrade the %s", ErrVersion, b[4], Version, side)
	}
	return nil
}

// ParseHeader decodes a frame header (HeaderLen bytes) and checks the
// payload length against max.
func ParseHeader(h []byte, max int) (Type, int, error) {
	if len(h) < HeaderLen {
		return 0, 0, ErrShortPayload
	}
	t := Type(h[0])
	n := binary.BigEndian.Uint32(h[1:5])
	if max < 0 || uint64(n) > uint64(max) {
		return t, 0, fmt.Errorf("%w: %s frame of %d bytes (limit %d)", ErrFrameTooBig, t, n, max)
	}
	return t, int(n), nil
}

// AppendFrame appends a frame with the given type and payload to dst.
func AppendFrame(dst []byte, t Type, payload []byte) []byte {
	dst = append(dst, byte(t))
	dst = binary.BigEndian.AppendUint32(dst, uint32(len(payload)))
	return append(dst, payload...)
}

// ReadFrame reads one frame from r. The payload is read into buf when it fits,
// so a caller that reuses buf reads without allocating. It never reads past
// the end of the frame, so on an unbuffered connection the bytes after it
// (a relayed stream) stay in the socket.
func ReadFrame(r io.Reader, buf []byte, max int) (Type, []byte, error) {
	var h [HeaderLen]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, nil, err
	}
	t, n, err := ParseHeader(h[:], max)
	if err != nil {
		return t, nil, err
	}
	if cap(buf) < n {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(r, buf); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return t, nil, err
	}
	return t, buf, nil
}

// ReadMessage reads one frame from r, as ReadFrame, and decodes it. A frame
// of an unknown type is read whole and reported with ErrUnknownType.
func ReadMessage(r io.Reader, max int) (Message, error) {
	t, payload, err := ReadFrame(r, nil, max)
	if err != nil {
		return nil, err
	}
	return Parse(t, payload)
}

// NewToken returns a fresh random 128-bit token.
func NewToken() (tok [TokenLen]byte) {
	if _, err := rand.Read(tok[:]); err != nil {
		panic("crypto/rand failed: " + err.Error())
	}
	return tok
}

// NewNonce returns a fresh random authentication nonce.
func NewNonce() (n [NonceLen]byte) {
	if _, err := rand.Read(n[:]); err != nil {
		panic("crypto/rand failed: " + err.Error())
	}
	return n
}

// authContext binds the MAC to this protocol, so the secret's MACs cannot be
// confused with any other use of it.
const authContext = "tcprelay auth v1\x00"

// AuthMAC is the agent's answer to a challenge: HMAC-SHA256 keyed by the
// shared secret over authContext || nonce.
func AuthMAC(secret string, nonce [NonceLen]byte) [MACLen]byte {
	m := hmac.New(sha256.New, []byte(secret))
	m.Write([]byte(authContext))
	m.Write(nonce[:])
	var out [MACLen]byte
	copy(out[:], m.Sum(nil))
	return out
}

// CheckMAC reports, in constant time, whether mac answers nonce for secret.
func CheckMAC(secret string, nonce [NonceLen]byte, mac [MACLen]byte) bool {
	want := AuthMAC(secret, nonce)
	return hmac.Equal(want[:], mac[:])
}
