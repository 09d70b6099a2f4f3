package proto

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	"reflect"
	"strings"
	"testing"
	"testing/iotest"
)

// allTypes lists every frame type this version knows.
var allTypes = []Type{
	TypeHello, TypeChallenge, TypeAuth, TypeWelcome, TypeListen, TypeListenOK,
	TypeError, TypeIncoming, TypeClose, TypePing, TypePong, TypeGoAway, TypeAttach,
	TypePoolKey, TypePoolJoin, TypeBind, TypeReady, TypeEnd,
}

func isKnownType(t Type) bool {
	for _, k := range allTypes {
		if k == t {
			return true
		}
	}
	return false
}

// seq returns n bytes 0, 1, 2, ... (mod 256).
func seq(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i)
	}
	return b
}

func seqToken() (t [TokenLen]byte) { copy(t[:], seq(TokenLen)); return }
func ffToken() (t [TokenLen]byte) {
	copy(t[:], bytes.Repeat([]byte{0xFF}, TokenLen))
	return
}
func seqNonce() (n [NonceLen]byte) { copy(n[:], seq(NonceLen)); return }
func ffNonce() (n [NonceLen]byte) {
	copy(n[:], bytes.Repeat([]byte{0xFF}, NonceLen))
	return
}
func ffMAC() (m [MACLen]byte) {
	copy(m[:], bytes.Repeat([]byte{0xFF}, MACLen))
	return
}

// maxString is the longest string the wire format carries (0xFFFF bytes).
var maxString = strings.Repeat("x", math.MaxUint16)

type sample struct {
	name string
	m    Message
}

// samples returns representative and edge values of every message type.
func samples() []sample {
	return []sample{
		{"hello/empty", &Hello{}},
		{"hello/typical", &Hello{Agent: "tcprelay-agent/1.0 (linux/amd64)", Features: FeaturePool}},
		{"hello/all-features", &Hello{Agent: "x", Features: math.MaxUint64}},
		{"hello/binary", &Hello{Agent: "\x00\xff\xfe\n"}},
		{"hello/max-string", &Hello{Agent: maxString}},

		{"challenge/zero", &Challenge{}},
		{"challenge/seq", &Challenge{Nonce: seqNonce(), Features: FeaturePool}},
		{"challenge/ff", &Challenge{Nonce: ffNonce()}},
		{"challenge/eph", &Challenge{Nonce: seqNonce(), Features: FeatureProof, Eph: [KeyLen]byte(seq(KeyLen))}},
		{"hello/eph", &Hello{Agent: "a", Features: FeatureProof, Eph: [KeyLen]byte(seq(KeyLen))}},
		{"auth/key", &Auth{MAC: ffMAC(), Key: [KeyLen]byte(seq(KeyLen)), Sig: [SigLen]byte(seq(SigLen))}},
		{"listen/resume", &Listen{ID: 3, Port: 9000, Resume: seqToken()}},
		{"listen-ok/resume", &ListenOK{ID: 3, Tunnel: 1, Port: 9000, Resume: ffToken()}},
		{"attach/mac", &Attach{Token: seqToken(), MAC: ffMAC()}},
		{"pool-join/proof", &PoolJoin{Key: seqToken(), Seq: 7, MAC: ffMAC()}},

		{"auth/zero", &Auth{}},
		{"auth/mac", &Auth{MAC: AuthMAC("s3cret", seqNonce())}},
		{"auth/ff", &Auth{MAC: ffMAC()}},

		{"welcome/zero", &Welcome{}},
		{"welcome/typical", &Welcome{HeartbeatMillis: 15000}},
		{"welcome/max", &Welcome{HeartbeatMillis: math.MaxUint32}},

		{"listen/zero", &Listen{}},
		{"listen/typical", &Listen{ID: 1, Port: 8080, Flags: ListenPortRequired}},
		{"listen/max", &Listen{ID: math.MaxUint32, Port: math.MaxUint16, Flags: math.MaxUint32}},

		{"listen-ok/zero", &ListenOK{}},
		{"listen-ok/typical", &ListenOK{ID: 1, Tunnel: 2, Host: "relay.example.com", Port: 40000}},
		{"listen-ok/max", &ListenOK{ID: math.MaxUint32, Tunnel: math.MaxUint32, Host: maxString, Port: math.MaxUint16}},

		{"error/empty", &Error{Code: CodeAuthFailed}},
		{"error/typical", &Error{ID: 42, Code: CodePortUnavailable, Message: "port 80 in use"}},
		{"error/max", &Error{ID: math.MaxUint32, Code: math.MaxUint16, Message: maxString}},

		{"incoming/zero", &Incoming{}},
		{"incoming/typical", &Incoming{Tunnel: 7, Token: seqToken(), Client: "203.0.113.5:51234", Local: "198.51.100.1:8081"}},
		{"incoming/ipv6", &Incoming{Tunnel: math.MaxUint32, Token: ffToken(), Client: "[2001:db8::1]:65535", Local: "[2001:db8::2]:1"}},
		{"incoming/max-string", &Incoming{Tunnel: 1, Token: seqToken(), Client: maxString, Local: maxString}},

		{"close/zero", &Close{}},
		{"close/max", &Close{Tunnel: math.MaxUint32}},

		{"ping/zero", &Ping{}},
		{"ping/pattern", &Ping{Data: 0x0102030405060708}},
		{"ping/max", &Ping{Data: math.MaxUint64}},

		{"pong/zero", &Pong{}},
		{"pong/pattern", &Pong{Data: 0x0102030405060708}},
		{"pong/max", &Pong{Data: math.MaxUint64}},

		{"goaway/empty", &GoAway{}},
		{"goaway/typical", &GoAway{Message: "relay shutting down"}},
		{"goaway/max-string", &GoAway{Message: maxString}},
		{"goaway/retry", &GoAway{Message: "restarting", RetryMillis: 500}},

		{"attach/zero", &Attach{}},
		{"attach/seq", &Attach{Token: seqToken()}},
		{"attach/ff", &Attach{Token: ffToken()}},
		{"pool-key/zero", &PoolKey{}},
		{"pool-key/max", &PoolKey{Key: ffToken(), Max: math.MaxUint16}},
		{"pool-join/seq", &PoolJoin{Key: seqToken()}},
		{"bind/zero", &Bind{}},
		{"bind/typical", &Bind{Tunnel: 3, Client: "203.0.113.5:51234", Local: "198.51.100.1:8081"}},
		{"bind/max-string", &Bind{Tunnel: math.MaxUint32, Client: maxString, Local: maxString}},
		{"ready/no", &Ready{Tunnel: 3}},
		{"ready/yes", &Ready{Tunnel: math.MaxUint32, Ready: true}},
		{"end", &End{Seq: 1<<40 + 7, Bytes: math.MaxUint64}},
		{"listen/pool", &Listen{ID: 1, Port: 80, Pool: "web"}},
		{"listen/pool-resume", &Listen{ID: 1, Resume: seqToken(), Pool: maxString}},
		{"listen/acl", &Listen{ID: 2, Port: 80, Allow: "10.0.0.0/8,2001:db8::/32", Deny: "10.1.0.0/16"}},
		{"listen/allow-only", &Listen{ID: 2, Allow: "192.0.2.7/32"}},
		{"listen/hostname", &Listen{ID: 3, Hostname: "db.team-a"}},
		{"listen/pool-hostname", &Listen{ID: 3, Pool: "web", Hostname: "web"}},
	}
}

// parseNoPanic calls Parse and turns a panic into a test failure that names
// the input.
func parseNoPanic(t testing.TB, typ Type, payload []byte) (m Message, err error) {
	t.Helper()
	defer func() {
		if r := recover(); r != nil {
			t.Fatalf("Parse(%s, %x) panicked: %v", typ, payload, r)
		}
	}()
	return Parse(typ, payload)
}

func TestSamplesCoverAllTypes(t *testing.T) {
	seen := map[Type]bool{}
	for _, s := range samples() {
		seen[s.m.Type()] = true
	}
	for _, typ := range allTypes {
		if !seen[typ] {
			t.Errorf("no round-trip sample for %s", typ)
		}
	}
}

func TestRoundTrip(t *testing.T) {
	// Bytes that follow the frame in the stream; ReadFrame must leave them.
	after := []byte{0xDE, 0xAD, 0xBE, 0xEF}
	for _, s := range samples() {
		t.Run(s.name, func(t *testing.T) {
			prefix := []byte("prefix")
			frame := Append(append([]byte(nil), prefix...), s.m)
			if !bytes.HasPrefix(frame, prefix) {
				t.Fatalf("Append overwrote dst: %q", frame[:len(prefix)])
			}
			frame = frame[len(prefix):]
			payload := s.m.AppendPayload(nil)
			if len(frame) != HeaderLen+len(payload) {
				t.Fatalf("frame is %d bytes, want %d", len(frame), HeaderLen+len(payload))
			}
			if want := AppendFrame(nil, s.m.Type(), payload); !bytes.Equal(frame, want) {
				t.Fatalf("Append = %x…, AppendFrame = %x…", head(frame), head(want))
			}

			stream := append(append([]byte(nil), frame...), after...)
			r := bytes.NewReader(stream)
			typ, got, err := ReadFrame(r, nil, 1<<20)
			if err != nil {
				t.Fatalf("ReadFrame: %v", err)
			}
			if consumed := len(stream) - r.Len(); consumed != len(frame) {
				t.Fatalf("ReadFrame consumed %d bytes, frame is %d", consumed, len(frame))
			}
			if typ != s.m.Type() {
				t.Fatalf("ReadFrame type = %s, want %s", typ, s.m.Type())
			}
			if !bytes.Equal(got, payload) {
				t.Fatalf("ReadFrame payload = %x…, want %x…", head(got), head(payload))
			}

			m, err := parseNoPanic(t, typ, got)
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if !reflect.DeepEqual(m, s.m) {
				t.Fatalf("round trip:\n got %#v\nwant %#v", m, s.m)
			}

			// Parse's result must not alias the payload.
			for i := range got {
				got[i] ^= 0xFF
			}
			if !reflect.DeepEqual(m, s.m) {
				t.Fatalf("message changed when the payload buffer was overwritten: %#v", m)
			}
		})
	}
}

// head shortens a byte slice for error messages.
func head(b []byte) []byte {
	if len(b) > 64 {
		return b[:64]
	}
	return b
}

func TestRoundTripStream(t *testing.T) {
	// Many frames back to back, read with one reused buffer and a reader
	// that returns one byte per Read.
	var stream []byte
	ss := samples()
	for _, s := range ss {
		stream = Append(stream, s.m)
	}
	r := iotest.OneByteReader(bytes.NewReader(stream))
	buf := make([]byte, 0, 64)
	for _, s := range ss {
		typ, payload, err := ReadFrame(r, buf, 1<<20)
		if err != nil {
			t.Fatalf("%s: ReadFrame: %v", s.name, err)
		}
		m, err := Parse(typ, payload)
		if err != nil {
			t.Fatalf("%s: Parse: %v", s.name, err)
		}
		if !reflect.DeepEqual(m, s.m) {
			t.Fatalf("%s: got %#v", s.name, m)
		}
	}
	if _, _, err := ReadFrame(r, buf, 1<<20); err != io.EOF {
		t.Fatalf("ReadFrame at end of stream: err = %v, want io.EOF", err)
	}
}

func TestWireBytes(t *testing.T) {
	tests := []struct {
		name string
		m    Message
		hex  string
	}{
		{"attach", &Attach{Token: seqToken()},
			"10" + "00000010" + "000102030405060708090a0b0c0d0e0f"},
		{"pool-key", &PoolKey{Key: seqToken(), Max: 64},
			"0d" + "00000012" + "000102030405060708090a0b0c0d0e0f" + "0040"},
		{"pool-join", &PoolJoin{Key: seqToken()},
			"11" + "00000010" + "000102030405060708090a0b0c0d0e0f"},
		{"bind", &Bind{Tunnel: 7, Client: "x:1", Local: "y:2"},
			"12" + "0000000e" + "00000007" + "0003" + "783a31" + "0003" + "793a32"},
		{"listen", &Listen{ID: 0x01020304, Port: 8080, Flags: ListenPortRequired},
			"05" + "0000000a" + "01020304" + "1f90" + "00000001"},
		{"listen-ok", &ListenOK{ID: 0x01020304, Tunnel: 0xA0B0C0D0, Host: "ab", Port: 8080},
			"06" + "0000000e" + "01020304" + "a0b0c0d0" + "0002" + "6162" + "1f90"},
		{"error", &Error{ID: 7, Code: CodePortUnavailable, Message: "busy"},
			"07" + "0000000c" + "00000007" + "0003" + "0004" + "62757379"},
		{"hello-empty", &Hello{},
			"01" + "0000000a" + "0000" + "0000000000000000"},
		{"hello", &Hello{Agent: "a/1", Features: FeaturePool},
			"01" + "0000000d" + "0003" + "612f31" + "0000000000000001"},
		{"welcome", &Welcome{HeartbeatMillis: 15000},
			"04" + "00000004" + "00003a98"},
		{"incoming", &Incoming{Tunnel: 0x0A0B0C0D, Token: seqToken(), Client: "x:1", Local: "y:2"},
			"08" + "0000001e" + "0a0b0c0d" + "000102030405060708090a0b0c0d0e0f" + "0003" + "783a31" + "0003" + "793a32"},
		{"close", &Close{Tunnel: 0xCAFEBABE},
			"09" + "00000004" + "cafebabe"},
		{"ping", &Ping{Data: 0x0102030405060708},
			"0a" + "00000008" + "0102030405060708"},
		{"pong", &Pong{Data: 0x0102030405060708},
			"0b" + "00000008" + "0102030405060708"},
		{"goaway", &GoAway{Message: "bye"},
			"0c" + "00000005" + "0003" + "627965"},
		{"challenge", &Challenge{Nonce: seqNonce(), Features: FeaturePool},
			"02" + "00000028" + "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f" + "0000000000000001"},
		{"auth", &Auth{MAC: ffMAC()},
			"03" + "00000020" + strings.Repeat("ff", 32)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			want, err := hex.DecodeString(tt.hex)
			if err != nil {
				t.Fatal(err)
			}
			if got := Append(nil, tt.m); !bytes.Equal(got, want) {
				t.Fatalf("Append(%#v)\n got %x\nwant %x", tt.m, got, want)
			}
			m, err := Parse(Type(want[0]), want[HeaderLen:])
			if err != nil {
				t.Fatalf("Parse(pinned bytes): %v", err)
			}
			if !reflect.DeepEqual(m, tt.m) {
				t.Fatalf("Parse(pinned bytes) = %#v, want %#v", m, tt.m)
			}
		})
	}
}

func TestPreambleBytes(t *testing.T) {
	want := []byte{'T', 'R', 'L', 'Y', 0x02}
	if got := Preamble(); !bytes.Equal(got, want) {
		t.Fatalf("Preamble() = %x, want %x", got, want)
	}
	if len(Preamble()) != PreambleLen {
		t.Fatalf("len(Preamble()) = %d, PreambleLen = %d", len(Preamble()), PreambleLen)
	}
	// Each call returns a fresh slice a caller may append to.
	a := Preamble()
	a[0] = 'X'
	if Preamble()[0] != 'T' {
		t.Fatal("Preamble() returns a shared slice")
	}
}

func TestTypeValuesAndNames(t *testing.T) {
	tests := []struct {
		typ  Type
		wire byte
		name string
	}{
		{TypeHello, 0x01, "hello"},
		{TypeChallenge, 0x02, "challenge"},
		{TypeAuth, 0x03, "auth"},
		{TypeWelcome, 0x04, "welcome"},
		{TypeListen, 0x05, "listen"},
		{TypeListenOK, 0x06, "listen-ok"},
		{TypeError, 0x07, "error"},
		{TypeIncoming, 0x08, "incoming"},
		{TypeClose, 0x09, "close"},
		{TypePing, 0x0A, "ping"},
		{TypePong, 0x0B, "pong"},
		{TypeGoAway, 0x0C, "goaway"},
		{TypeAttach, 0x10, "attach"},
		{TypePoolKey, 0x0D, "pool-key"},
		{TypePoolJoin, 0x11, "pool-join"},
		{TypeBind, 0x12, "bind"},
		{TypeReady, 0x13, "ready"},
		{TypeEnd, 0x14, "end"},
	}
	if len(tests) != len(allTypes) {
		t.Fatalf("%d types pinned, %d known", len(tests), len(allTypes))
	}
	for _, tt := range tests {
		if byte(tt.typ) != tt.wire {
			t.Errorf("%s = 0x%02x, want 0x%02x", tt.name, byte(tt.typ), tt.wire)
		}
		if got := tt.typ.String(); got != tt.name {
			t.Errorf("Type(0x%02x).String() = %q, want %q", tt.wire, got, tt.name)
		}
	}
	if got := Type(0x0E).String(); got != "type(0x0e)" {
		t.Errorf("Type(0x0e).String() = %q", got)
	}
	if got := Type(0xFF).String(); got != "type(0xff)" {
		t.Errorf("Type(0xff).String() = %q", got)
	}
}

func TestAppendStringTruncates(t *testing.T) {
	// Strings longer than 0xFFFF bytes are truncated (documented in
	// appendString), never sent with a wrapped length.
	long := strings.Repeat("y", math.MaxUint16+10)
	p := (&GoAway{Message: long}).AppendPayload(nil)
	if len(p) != 2+math.MaxUint16 {
		t.Fatalf("payload is %d bytes, want %d", len(p), 2+math.MaxUint16)
	}
	if p[0] != 0xFF || p[1] != 0xFF {
		t.Fatalf("length field = %x, want ffff", p[:2])
	}
	m, err := Parse(TypeGoAway, p)
	if err != nil {
		t.Fatal(err)
	}
	if got := m.(*GoAway).Message; got != long[:math.MaxUint16] {
		t.Fatalf("parsed %d bytes, want the first %d", len(got), math.MaxUint16)
	}
}

func TestErrorMessageIsError(t *testing.T) {
	var err error = &Error{ID: 3, Code: CodeLimit, Message: "too many tunnels"}
	var e *Error
	if !errors.As(fmt.Errorf("wrapped: %w", err), &e) || e.Code != CodeLimit {
		t.Fatalf("errors.As failed for %v", err)
	}
	if got, want := err.Error(), "relay error 4: too many tunnels"; got != want {
		t.Fatalf("Error() = %q, want %q", got, want)
	}
}

// ---- decoder errors ----

// bare returns a copy of m with the optional fields (those added after
// version 2) cleared: its version-2 shape, the shortest valid encoding.
func bare(m Message) Message {
	switch m := m.(type) {
	case *Hello:
		v := *m
		v.Eph = [KeyLen]byte{}
		return &v
	case *Challenge:
		v := *m
		v.Eph = [KeyLen]byte{}
		return &v
	case *Auth:
		return &Auth{MAC: m.MAC}
	case *Listen:
		v := *m
		v.Resume, v.Pool, v.Allow, v.Deny, v.Hostname = [TokenLen]byte{}, "", "", "", ""
		return &v
	case *ListenOK:
		v := *m
		v.Resume = [TokenLen]byte{}
		return &v
	case *Attach:
		return &Attach{Token: m.Token}
	case *PoolJoin:
		return &PoolJoin{Key: m.Key}
	case *GoAway:
		return &GoAway{Message: m.Message}
	}
	return m
}

// full returns a copy of m with every optional field set, so that nothing
// a receiver of this version knows comes after its last field.
func full(m Message) Message {
	one := func(n int) []byte { return bytes.Repeat([]byte{1}, n) }
	switch m := m.(type) {
	case *Hello:
		v := *m
		v.Eph = [KeyLen]byte(one(KeyLen))
		return &v
	case *Challenge:
		v := *m
		v.Eph = [KeyLen]byte(one(KeyLen))
		return &v
	case *Auth:
		return &Auth{MAC: m.MAC, Key: [KeyLen]byte(one(KeyLen)), Sig: [SigLen]byte(one(SigLen))}
	case *Listen:
		v := *m
		v.Resume = [TokenLen]byte(one(TokenLen))
		if v.Pool == "" {
			v.Pool = "p"
		}
		if v.Allow == "" && v.Deny == "" {
			v.Deny = "192.0.2.0/24"
		}
		if v.Hostname == "" {
			v.Hostname = "h"
		}
		return &v
	case *ListenOK:
		v := *m
		v.Resume = [TokenLen]byte(one(TokenLen))
		return &v
	case *Attach:
		return &Attach{Token: m.Token, MAC: [MACLen]byte(one(MACLen))}
	case *PoolJoin:
		return &PoolJoin{Key: m.Key, Seq: 1, MAC: [MACLen]byte(one(MACLen))}
	case *GoAway:
		return &GoAway{Message: m.Message, RetryMillis: 1}
	}
	return m
}

// cuts returns the lengths at which to cut a payload of n bytes: every one
// for payloads up to a few hundred bytes (so every field boundary and
// every byte inside a field), and the first and last 64 of the 64 KiB
// string samples, which hold all their fixed fields' boundaries. Cutting
// those at every byte made this test cost seconds and proved nothing more.
func cuts(n int) []int {
	var c []int
	for i := 0; i < n; i++ {
		if n <= 512 || i < 64 || i >= n-64 {
			c = append(c, i)
		}
	}
	return c
}

// TestParseShortPayload: a payload cut short of its version-2 fields is
// malformed; one cut inside the optional fields is malformed too, unless
// the cut falls where an optional group begins, and then it is the same
// message without the rest.
func TestParseShortPayload(t *testing.T) {
	for _, s := range samples() {
		t.Run(s.name, func(t *testing.T) {
			payload := s.m.AppendPayload(nil)
			required := len(bare(s.m).AppendPayload(nil))
			typ := s.m.Type()
			for _, i := range cuts(len(payload)) {
				// Capacity i too, so the decoder cannot reslice into
				// the rest of the valid payload.
				short := payload[:i:i]
				m, err := parseNoPanic(t, typ, short)
				if err == nil && i >= required {
					// A shorter message: its encoding (which leaves out
					// optional fields that are zero) begins the payload.
					if got := m.AppendPayload(nil); !bytes.HasPrefix(short, got) {
						t.Fatalf("Parse(%s, %d of %d bytes) = %#v, which encodes to %x", typ, i, len(payload), m, got)
					}
					continue
				}
				if !errors.Is(err, ErrShortPayload) {
					t.Fatalf("Parse(%s, %d of %d bytes): err = %v, want ErrShortPayload", typ, i, len(payload), err)
				}
				if m != nil {
					t.Fatalf("Parse(%s, %d of %d bytes) returned message %#v with error", typ, i, len(payload), m)
				}
			}
		})
	}
}

func TestParseNilPayload(t *testing.T) {
	// No message has an empty encoding.
	for _, typ := range allTypes {
		m, err := parseNoPanic(t, typ, nil)
		if !errors.Is(err, ErrShortPayload) || m != nil {
			t.Errorf("Parse(%s, nil) = %v, %v; want nil, ErrShortPayload", typ, m, err)
		}
	}
}

func TestParseStringLengthOverrun(t *testing.T) {
	tests := []struct {
		typ     Type
		payload string
	}{
		{TypeHello, "\x00\x05abcd"},
		{TypeHello, "\xff\xff"},
		{TypeGoAway, "\x00\x01"},
		{TypeError, "\x00\x00\x00\x01\x00\x02\x00\x03ab"},
		{TypeListenOK, "\x00\x00\x00\x01\x00\x00\x00\x02\x00\x04ab\x1f\x90"},
		{TypeIncoming, "\x00\x00\x00\x01" + string(seq(TokenLen)) + "\x00\x10short"},
	}
	for _, tt := range tests {
		m, err := parseNoPanic(t, tt.typ, []byte(tt.payload))
		if !errors.Is(err, ErrShortPayload) || m != nil {
			t.Errorf("Parse(%s, %x) = %v, %v; want nil, ErrShortPayload", tt.typ, tt.payload, m, err)
		}
	}
}

// TestParseIgnoresTrailing: a newer peer appends fields to a message; this
// version reads the fields it knows and ignores the rest.
func TestParseIgnoresTrailing(t *testing.T) {
	for _, s := range samples() {
		s.m = full(s.m)
		payload := s.m.AppendPayload(nil)
		for _, extra := range [][]byte{{0}, {0xFF}, []byte("a field from a newer version")} {
			p := append(append([]byte(nil), payload...), extra...)
			m, err := parseNoPanic(t, s.m.Type(), p)
			if err != nil {
				t.Errorf("%s + %d bytes: err = %v, want the message", s.name, len(extra), err)
				continue
			}
			if !reflect.DeepEqual(m, s.m) {
				t.Errorf("%s + %d bytes: got %#v, want %#v", s.name, len(extra), m, s.m)
			}
		}
	}
}

func TestParseUnknownType(t *testing.T) {
	payloads := [][]byte{nil, {}, {0, 0}, seq(100)}
	unknown := 0
	for i := 0; i < 256; i++ {
		typ := Type(i)
		if isKnownType(typ) {
			continue
		}
		unknown++
		for _, p := range payloads {
			m, err := parseNoPanic(t, typ, p)
			if !errors.Is(err, ErrUnknownType) {
				t.Errorf("Parse(0x%02x, %d bytes): err = %v, want ErrUnknownType", i, len(p), err)
			}
			if m != nil {
				t.Errorf("Parse(0x%02x): message %#v returned with error", i, m)
			}
		}
	}
	if unknown != 256-len(allTypes) {
		t.Fatalf("checked %d unknown types", unknown)
	}
	// And a known type is not reported as unknown, even when malformed.
	if _, err := Parse(TypePing, nil); errors.Is(err, ErrUnknownType) {
		t.Fatalf("Parse(ping, nil) = %v, want a short-payload error", err)
	}
}

func mkHeader(t Type, n uint32) []byte {
	h := []byte{byte(t), byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n)}
	return h
}

func TestParseHeader(t *testing.T) {
	tests := []struct {
		name   string
		h      []byte
		max    int
		wantT  Type
		wantN  int
		tooBig bool
	}{
		{"empty", mkHeader(TypePing, 0), 0, TypePing, 0, false},
		{"under", mkHeader(TypeHello, 100), MaxPreAuthPayload, TypeHello, 100, false},
		{"at-limit", mkHeader(TypeHello, MaxPreAuthPayload), MaxPreAuthPayload, TypeHello, MaxPreAuthPayload, false},
		{"one-over", mkHeader(TypeHello, MaxPreAuthPayload+1), MaxPreAuthPayload, TypeHello, 0, true},
		{"max-uint32", mkHeader(TypeAttach, math.MaxUint32), DefaultMaxPayload, TypeAttach, 0, true},
		{"big-endian", mkHeader(TypeListen, 0x00000100), 0xFF, TypeListen, 0, true},
		{"big-endian-ok", mkHeader(TypeListen, 0x00000100), 0x100, TypeListen, 0x100, false},
		{"zero-max", mkHeader(TypeClose, 1), 0, TypeClose, 0, true},
		{"unknown-type", mkHeader(0xEE, 3), 10, 0xEE, 3, false},
		{"longer-slice", append(mkHeader(TypePong, 8), 1, 2, 3), 8, TypePong, 8, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			typ, n, err := ParseHeader(tt.h, tt.max)
			if typ != tt.wantT {
				t.Errorf("type = %s, want %s", typ, tt.wantT)
			}
			if tt.tooBig {
				if !errors.Is(err, ErrFrameTooBig) {
					t.Fatalf("err = %v, want ErrFrameTooBig", err)
				}
				if n != 0 {
					t.Errorf("n = %d with error, want 0", n)
				}
				return
			}
			if err != nil {
				t.Fatalf("err = %v", err)
			}
			if n != tt.wantN {
				t.Errorf("n = %d, want %d", n, tt.wantN)
			}
		})
	}
}

// errAfterReader returns its data, then err instead of io.EOF.
type errAfterReader struct {
	r   *bytes.Reader
	err error
}

func (e *errAfterReader) Read(p []byte) (int, error) {
	if e.r.Len() == 0 {
		return 0, e.err
	}
	return e.r.Read(p)
}

func TestReadFrameErrors(t *testing.T) {
	valid := Append(nil, &Ping{Data: 1}) // 5 + 8 bytes
	tests := []struct {
		name     string
		in       []byte
		max      int
		wantErr  error
		consumed int
	}{
		{"empty", nil, 64, io.EOF, 0},
		{"header-1", valid[:1], 64, io.ErrUnexpectedEOF, 1},
		{"header-4", valid[:4], 64, io.ErrUnexpectedEOF, 4},
		{"no-payload", valid[:HeaderLen], 64, io.ErrUnexpectedEOF, HeaderLen},
		{"payload-1", valid[:HeaderLen+1], 64, io.ErrUnexpectedEOF, HeaderLen + 1},
		{"payload-7", valid[:len(valid)-1], 64, io.ErrUnexpectedEOF, len(valid) - 1},
		{"too-big", valid, 7, ErrFrameTooBig, HeaderLen},
		{"huge", append(mkHeader(TypeHello, math.MaxUint32), 1, 2, 3), DefaultMaxPayload, ErrFrameTooBig, HeaderLen},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := bytes.NewReader(tt.in)
			_, payload, err := ReadFrame(r, nil, tt.max)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
			if tt.wantErr == io.EOF && err != io.EOF {
				// A clean end of stream must be exactly io.EOF.
				t.Fatalf("err = %#v, want io.EOF itself", err)
			}
			if tt.wantErr == io.ErrUnexpectedEOF && errors.Is(err, io.EOF) {
				t.Fatalf("truncated frame reported as clean io.EOF: %v", err)
			}
			if payload != nil {
				t.Fatalf("payload %x returned with error", payload)
			}
			if consumed := len(tt.in) - r.Len(); consumed != tt.consumed {
				t.Fatalf("consumed %d bytes, want %d", consumed, tt.consumed)
			}
		})
	}

	// Errors from the reader other than EOF pass through.
	boom := errors.New("boom")
	for _, n := range []int{0, 3, HeaderLen, HeaderLen + 2} {
		r := &errAfterReader{r: bytes.NewReader(valid[:n]), err: boom}
		if _, _, err := ReadFrame(r, nil, 64); !errors.Is(err, boom) {
			t.Errorf("reader error after %d bytes: err = %v, want boom", n, err)
		}
	}
}

func TestReadFrameZeroLength(t *testing.T) {
	in := append(AppendFrame(nil, 0x42, nil), 0xAA)
	r := bytes.NewReader(in)
	typ, payload, err := ReadFrame(r, nil, 0)
	if err != nil || typ != 0x42 || len(payload) != 0 {
		t.Fatalf("ReadFrame = %s, %x, %v; want type(0x42), empty, nil", typ, payload, err)
	}
	if r.Len() != 1 {
		t.Fatalf("consumed %d bytes, want %d", len(in)-r.Len(), HeaderLen)
	}
}

func TestReadFrameBuffer(t *testing.T) {
	frame := Append(nil, &Ping{Data: 0x1122334455667788})

	// Fits: the payload is read into buf.
	buf := make([]byte, 3, 32)
	_, payload, err := ReadFrame(bytes.NewReader(frame), buf, 64)
	if err != nil {
		t.Fatal(err)
	}
	if len(payload) != 8 || &payload[0] != &buf[:1][0] {
		t.Fatalf("payload (len %d) not read into the caller's buffer", len(payload))
	}

	// Does not fit: a new buffer, and buf is left alone.
	small := make([]byte, 4)
	copy(small, "keep")
	_, payload, err = ReadFrame(bytes.NewReader(frame), small, 64)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(payload, frame[HeaderLen:]) {
		t.Fatalf("payload = %x", payload)
	}
	if string(small) != "keep" {
		t.Fatalf("too-small buffer was written: %q", small)
	}
}

func TestCheckPreamble(t *testing.T) {
	tests := []struct {
		name string
		in   []byte
		want error // nil: accepted
	}{
		{"ok", Preamble(), nil},
		{"ok-followed-by-frame", Append(Preamble(), &Attach{}), nil},
		{"wrong-magic", []byte("TRLX\x02"), ErrBadMagic},
		{"lowercase-magic", []byte("trly\x02"), ErrBadMagic},
		{"older-version", []byte("TRLY\x01"), ErrVersion},
		{"newer-version", []byte("TRLY\x03"), ErrVersion},
		{"version-zero", []byte("TRLY\x00"), ErrVersion},
		{"version-ff", []byte("TRLY\xff"), ErrVersion},
		{"http", []byte("GET / HTTP/1.1\r\n"), ErrBadMagic},
		{"tls-prefix", []byte{0x16, 0x03, 0x01}, ErrBadMagic},
		{"tls-clienthello", []byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03}, ErrBadMagic},
		{"ssh", []byte("SSH-2.0-OpenSSH_9.6\r\n"), ErrBadMagic},
		{"nil", nil, ErrBadMagic},
		{"magic-only", []byte("TRLY"), ErrBadMagic},
		{"one-byte", []byte("T"), ErrBadMagic},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var err error
			func() {
				defer func() {
					if r := recover(); r != nil {
						t.Fatalf("CheckPreamble(%x) panicked: %v", tt.in, r)
					}
				}()
				err = CheckPreamble(tt.in)
			}()
			if tt.want == nil {
				if err != nil {
					t.Fatalf("CheckPreamble(%x) = %v, want nil", tt.in, err)
				}
				return
			}
			if !errors.Is(err, tt.want) {
				t.Fatalf("CheckPreamble(%x) = %v, want %v", tt.in, err, tt.want)
			}
			// The two failures are distinct: a wrong version is not
			// reported as "not a relay connection", nor the reverse.
			other := ErrVersion
			if tt.want == ErrVersion {
				other = ErrBadMagic
			}
			if errors.Is(err, other) {
				t.Fatalf("CheckPreamble(%x) = %v, also matches %v", tt.in, err, other)
			}
		})
	}
}

// ---- authentication ----

func TestAuthMACKnownAnswer(t *testing.T) {
	// Computed independently (Python hmac, SHA-256) over
	// "tcprelay auth v1\x00" || nonce; pins the MAC construction, which
	// agents and relays of different builds must agree on.
	tests := []struct {
		secret string
		nonce  [NonceLen]byte
		want   string
	}{
		{"s3cret", seqNonce(), "f7d91968488951eac052a17996fc49e97e67703527d44486d5c511621a136ea5"},
		{"", [NonceLen]byte{}, "5bc09a719756ae30a8ffc98e6515d4f9a457a7ded103431457dcf2a5286b1eb2"},
	}
	for _, tt := range tests {
		got := AuthMAC(tt.secret, tt.nonce)
		if hex.EncodeToString(got[:]) != tt.want {
			t.Errorf("AuthMAC(%q, %x) = %x, want %s", tt.secret, tt.nonce, got, tt.want)
		}
	}
}

func TestAuthMAC(t *testing.T) {
	n1 := seqNonce()
	n2 := n1
	n2[NonceLen-1] ^= 1

	a := AuthMAC("secret", n1)
	if b := AuthMAC("secret", n1); a != b {
		t.Fatalf("AuthMAC not deterministic: %x vs %x", a, b)
	}
	if a == ([MACLen]byte{}) {
		t.Fatal("AuthMAC returned all zeros")
	}
	if b := AuthMAC("secreT", n1); a == b {
		t.Fatal("AuthMAC equal for different secrets")
	}
	if b := AuthMAC("", n1); a == b {
		t.Fatal("AuthMAC equal for secret and empty secret")
	}
	if b := AuthMAC("secret", n2); a == b {
		t.Fatal("AuthMAC equal for different nonces")
	}
}

func TestCheckMAC(t *testing.T) {
	const secret = "correct horse battery staple"
	nonce := NewNonce()
	mac := AuthMAC(secret, nonce)
	if !CheckMAC(secret, nonce, mac) {
		t.Fatal("CheckMAC rejected the right MAC")
	}
	for bit := 0; bit < MACLen*8; bit++ {
		bad := mac
		bad[bit/8] ^= 1 << (bit % 8)
		if CheckMAC(secret, nonce, bad) {
			t.Fatalf("CheckMAC accepted the MAC with bit %d flipped", bit)
		}
	}
	if CheckMAC(secret, nonce, [MACLen]byte{}) {
		t.Fatal("CheckMAC accepted an all-zero MAC")
	}
	if CheckMAC("wrong secret", nonce, mac) {
		t.Fatal("CheckMAC accepted the MAC under another secret")
	}
	if CheckMAC("", nonce, mac) {
		t.Fatal("CheckMAC accepted the MAC under the empty secret")
	}
	// Replay: the answer to one challenge does not answer another.
	other := NewNonce()
	if other == nonce {
		t.Fatal("NewNonce returned the same nonce twice")
	}
	if CheckMAC(secret, other, mac) {
		t.Fatal("CheckMAC accepted a MAC made for another nonce (replay)")
	}
	if !CheckMAC(secret, other, AuthMAC(secret, other)) {
		t.Fatal("CheckMAC rejected the right MAC for the second nonce")
	}
}

func TestNewToken(t *testing.T) {
	if TokenLen != 16 {
		t.Fatalf("TokenLen = %d, want 16 (128 bits)", TokenLen)
	}
	a, b := NewToken(), NewToken()
	if len(a) != 16 {
		t.Fatalf("len(NewToken()) = %d, want 16", len(a))
	}
	if a == b {
		t.Fatalf("NewToken returned %x twice", a)
	}
	if a == ([TokenLen]byte{}) || b == ([TokenLen]byte{}) {
		t.Fatal("NewToken returned all zeros")
	}
	// Every byte is random: over 64 tokens, each position takes more than
	// one value (a false failure has probability about 16·256^-63).
	first := NewToken()
	varies := [TokenLen]bool{}
	for i := 0; i < 64; i++ {
		tok := NewToken()
		for j := range tok {
			varies[j] = varies[j] || tok[j] != first[j]
		}
	}
	for j, v := range varies {
		if !v {
			t.Errorf("byte %d of NewToken is constant over 64 calls", j)
		}
	}
}

func TestNewNonce(t *testing.T) {
	if NonceLen != 32 || MACLen != 32 {
		t.Fatalf("NonceLen = %d, MACLen = %d, want 32, 32", NonceLen, MACLen)
	}
	a, b := NewNonce(), NewNonce()
	if a == b {
		t.Fatalf("NewNonce returned %x twice", a)
	}
	if a == ([NonceLen]byte{}) {
		t.Fatal("NewNonce returned all zeros")
	}
	first := NewNonce()
	varies := [NonceLen]bool{}
	for i := 0; i < 64; i++ {
		n := NewNonce()
		for j := range n {
			varies[j] = varies[j] || n[j] != first[j]
		}
	}
	for j, v := range varies {
		if !v {
			t.Errorf("byte %d of NewNonce is constant over 64 calls", j)
		}
	}
}

// ---- fuzzing ----

// shortenStrings returns a copy of m whose string fields are at most n bytes.
// The 0xFFFF-byte samples make poor fuzz seeds: minimizing an interesting
// input derived from one stalls the fuzzer for its whole budget.
func shortenStrings(m Message, n int) Message {
	v := reflect.New(reflect.TypeOf(m).Elem())
	v.Elem().Set(reflect.ValueOf(m).Elem())
	for i := 0; i < v.Elem().NumField(); i++ {
		if fld := v.Elem().Field(i); fld.Kind() == reflect.String && fld.Len() > n {
			fld.SetString(fld.String()[:n])
		}
	}
	return v.Interface().(Message)
}

func TestShortenStrings(t *testing.T) {
	m := &ListenOK{ID: 1, Host: maxString, Port: 2}
	got := shortenStrings(m, 3)
	if want := (&ListenOK{ID: 1, Host: "xxx", Port: 2}); !reflect.DeepEqual(got, want) {
		t.Fatalf("shortenStrings = %#v, want %#v", got, want)
	}
	if len(m.Host) != math.MaxUint16 {
		t.Fatal("shortenStrings modified its argument")
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range samples() {
		payload := shortenStrings(s.m, 300).AppendPayload(nil)
		f.Add(byte(s.m.Type()), payload)
		if len(payload) > 0 {
			f.Add(byte(s.m.Type()), payload[:len(payload)-1])
		}
		f.Add(byte(s.m.Type()), append(payload, 0))
	}
	f.Add(byte(0x0D), []byte{})
	f.Add(byte(0xFF), []byte("xyz"))

	f.Fuzz(func(t *testing.T, typ byte, payload []byte) {
		in := append([]byte(nil), payload...)
		m, err := Parse(Type(typ), in)
		if err != nil {
			if m != nil {
				t.Fatalf("Parse(0x%02x, %x) returned %#v with error %v", typ, payload, m, err)
			}
			if !errors.Is(err, ErrShortPayload) && !errors.Is(err, ErrUnknownType) && !errors.Is(err, ErrBadValue) {
				t.Fatalf("Parse(0x%02x, %x): unexpected error %v", typ, payload, err)
			}
			if errors.Is(err, ErrUnknownType) == isKnownType(Type(typ)) {
				t.Fatalf("Parse(0x%02x): ErrUnknownType = %v for known = %v", typ, errors.Is(err, ErrUnknownType), isKnownType(Type(typ)))
			}
			return
		}
		if m == nil {
			t.Fatalf("Parse(0x%02x, %x) returned nil, nil", typ, payload)
		}
		if m.Type() != Type(typ) {
			t.Fatalf("Parse(0x%02x) returned a %s message", typ, m.Type())
		}
		// The result does not alias the input.
		for i := range in {
			in[i] ^= 0xFF
		}
		// The encoding is canonical: re-encoding gives back the input, up
		// to the trailing bytes a newer version may have appended.
		got := m.AppendPayload(nil)
		if !bytes.HasPrefix(payload, got) {
			t.Fatalf("Parse(0x%02x, %x) = %#v, re-encodes to %x", typ, payload, m, got)
		}
		if got, want := Append(nil, m), AppendFrame(nil, Type(typ), got); !bytes.Equal(got, want) {
			t.Fatalf("Append = %x, want %x", got, want)
		}
		// And what it re-encodes to parses to the same message.
		if m2, err := Parse(Type(typ), got); err != nil || !reflect.DeepEqual(m2, m) {
			t.Fatalf("re-parse of %x = %#v, %v; want %#v", got, m2, err, m)
		}
	})
}

func FuzzReadFrame(f *testing.F) {
	const max = 64
	for _, s := range samples() {
		frame := Append(nil, shortenStrings(s.m, 40))
		f.Add(frame, uint8(0))
		f.Add(frame, uint8(max))
		f.Add(frame[:len(frame)/2], uint8(8))
	}
	f.Add([]byte{}, uint8(0))
	f.Add([]byte{0x01, 0x00}, uint8(0))
	f.Add(mkHeader(TypeHello, max+1), uint8(0))
	f.Add(mkHeader(TypeHello, math.MaxUint32), uint8(0))
	f.Add(append(mkHeader(TypeHello, max), make([]byte, max+10)...), uint8(max))

	f.Fuzz(func(t *testing.T, data []byte, bufCap uint8) {
		buf := make([]byte, 0, int(bufCap)%(2*max))
		r := bytes.NewReader(data)
		typ, payload, err := ReadFrame(r, buf, max)
		consumed := len(data) - r.Len()

		if len(payload) > max {
			t.Fatalf("payload of %d bytes exceeds max %d", len(payload), max)
		}
		if consumed > HeaderLen+len(payload) && err == nil {
			t.Fatalf("consumed %d bytes for a %d-byte payload", consumed, len(payload))
		}

		// Exact oracle.
		switch {
		case len(data) == 0:
			if err != io.EOF || consumed != 0 {
				t.Fatalf("empty input: err = %v, consumed %d", err, consumed)
			}
		case len(data) < HeaderLen:
			if err != io.ErrUnexpectedEOF || consumed != len(data) {
				t.Fatalf("%d-byte header: err = %v, consumed %d", len(data), err, consumed)
			}
		default:
			n := uint64(data[1])<<24 | uint64(data[2])<<16 | uint64(data[3])<<8 | uint64(data[4])
			if typ != Type(data[0]) {
				t.Fatalf("type = %s, want %s", typ, Type(data[0]))
			}
			switch {
			case n > max:
				if !errors.Is(err, ErrFrameTooBig) || consumed != HeaderLen {
					t.Fatalf("oversize frame (%d): err = %v, consumed %d", n, err, consumed)
				}
			case uint64(len(data)) < HeaderLen+n:
				if err != io.ErrUnexpectedEOF || consumed != len(data) {
					t.Fatalf("truncated frame: err = %v, consumed %d of %d", err, consumed, len(data))
				}
			default:
				if err != nil {
					t.Fatalf("complete frame: err = %v", err)
				}
				if consumed != HeaderLen+int(n) {
					t.Fatalf("consumed %d bytes, frame is %d", consumed, HeaderLen+int(n))
				}
				if !bytes.Equal(payload, data[HeaderLen:HeaderLen+n]) {
					t.Fatalf("payload = %x, want %x", payload, data[HeaderLen:HeaderLen+n])
				}
			}
		}
		if err != nil && payload != nil {
			t.Fatalf("payload %x returned with error %v", payload, err)
		}
	})
}
