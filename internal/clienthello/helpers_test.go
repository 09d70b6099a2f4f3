package clienthello

import (
	"crypto/tls"
	"encoding/binary"
	"errors"
	"net"
	"sync"
	"testing"
	"time"
)

// fakeConn is the part of a net.Conn that the tests' conns do not care about.
type fakeConn struct{}

func (fakeConn) Close() error                     { return nil }
func (fakeConn) LocalAddr() net.Addr              { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 443} }
func (fakeConn) RemoteAddr() net.Addr             { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 50000} }
func (fakeConn) SetDeadline(time.Time) error      { return nil }
func (fakeConn) SetReadDeadline(time.Time) error  { return nil }
func (fakeConn) SetWriteDeadline(time.Time) error { return nil }

// captureConn keeps the first write a TLS client makes, its ClientHello, and
// fails it, which ends the client's handshake.
type captureConn struct {
	fakeConn
	hello []byte
}

var errCaptured = errors.New("captured")

func (c *captureConn) Read([]byte) (int, error) { return 0, errCaptured }
func (c *captureConn) Write(p []byte) (int, error) {
	if c.hello == nil {
		c.hello = append([]byte(nil), p...)
	}
	return 0, errCaptured
}

// realHello returns the ClientHello record that crypto/tls's client sends
// with cfg.
func realHello(tb testing.TB, cfg *tls.Config) []byte {
	tb.Helper()
	c := &captureConn{}
	if err := tls.Client(c, cfg).Handshake(); !errors.Is(err, errCaptured) {
		tb.Fatalf("client handshake: %v, want the captured error", err)
	}
	if len(c.hello) < recordHeaderLen || c.hello[0] != recordTypeHandshake {
		tb.Fatalf("captured %x, not a handshake record", c.hello)
	}
	return c.hello
}

// helloConfigs are the clients whose hellos the tests read.
var helloConfigs = []struct {
	name string
	cfg  func() *tls.Config
	want Hello
}{
	{"pq-sni-alpn", func() *tls.Config {
		return &tls.Config{ServerName: "db.tunnels.example.com", NextProtos: []string{"h2", "http/1.1"}}
	}, Hello{ServerName: "db.tunnels.example.com", ALPN: []string{"h2", "http/1.1"}}},
	{"classic-sni-alpn", func() *tls.Config {
		return &tls.Config{ServerName: "db.tunnels.example.com", NextProtos: []string{"h2", "http/1.1"},
			CurvePreferences: []tls.CurveID{tls.X25519}}
	}, Hello{ServerName: "db.tunnels.example.com", ALPN: []string{"h2", "http/1.1"}}},
	{"sni-no-alpn", func() *tls.Config {
		return &tls.Config{ServerName: "pg.example.org"}
	}, Hello{ServerName: "pg.example.org"}},
	{"by-ip-alpn", func() *tls.Config {
		// Dialled by address: crypto/tls sends no server_name for an IP.
		return &tls.Config{ServerName: "127.0.0.1", NextProtos: []string{"tcprelay/1"}}
	}, Hello{ALPN: []string{"tcprelay/1"}}},
	{"by-ip-no-alpn", func() *tls.Config {
		return &tls.Config{ServerName: "::1"}
	}, Hello{}},
	{"uppercase-sni", func() *tls.Config {
		return &tls.Config{ServerName: "DB.Tunnels.Example.COM", NextProtos: []string{"h2"}}
	}, Hello{ServerName: "db.tunnels.example.com", ALPN: []string{"h2"}}},
	{"tls12-only", func() *tls.Config {
		return &tls.Config{ServerName: "legacy.example.net", MaxVersion: tls.VersionTLS12, NextProtos: []string{"http/1.1"}}
	}, Hello{ServerName: "legacy.example.net", ALPN: []string{"http/1.1"}}},
}

// reframe cuts the handshake message carried by the single record rec into
// records of the given sizes, the last one taking what is left.
func reframe(tb testing.TB, rec []byte, sizes ...int) []byte {
	tb.Helper()
	if l := int(binary.BigEndian.Uint16(rec[3:5])); l != len(rec)-recordHeaderLen {
		tb.Fatalf("reframe: not a single record (%d bytes, length field %d)", len(rec), l)
	}
	msg := rec[recordHeaderLen:]
	var out []byte
	for _, n := range append(sizes, len(msg)) {
		n = min(n, len(msg))
		out = append(out, rec[0], rec[1], rec[2], byte(n>>8), byte(n))
		out = append(out, msg[:n]...)
		msg = msg[n:]
		if len(msg) == 0 {
			break
		}
	}
	return out
}

// fragments cuts rec's handshake message into records of n bytes each.
func fragments(tb testing.TB, rec []byte, n int) []byte {
	sizes := make([]int, 0, len(rec)/n+1)
	for i := 0; i < len(rec); i += n {
		sizes = append(sizes, n)
	}
	return reframe(tb, rec, sizes...)
}

// Building hellos by hand, for what no real client sends.

func u16(n int) []byte { return []byte{byte(n >> 8), byte(n)} }

// vec16 and vec8 put a 2- or 1-byte length before b.
func vec16(b ...[]byte) []byte {
	var body []byte
	for _, p := range b {
		body = append(body, p...)
	}
	return append(u16(len(body)), body...)
}

func vec8(b []byte) []byte { return append([]byte{byte(len(b))}, b...) }

func ext(typ int, data []byte) []byte { return append(u16(typ), vec16(data)...) }

// sniExt is a server_name extension with a host_name entry for each name.
func sniExt(names ...string) []byte {
	var entries [][]byte
	for _, n := range names {
		entries = append(entries, append([]byte{sniHostName}, vec16([]byte(n))...))
	}
	return ext(extensionServerName, vec16(entries...))
}

func alpnExt(protos ...string) []byte {
	var list [][]byte
	for _, p := range protos {
		list = append(list, vec8([]byte(p)))
	}
	return ext(extensionALPN, vec16(list...))
}

// helloParts are the fields of a hand-built ClientHello body before its
// extensions; a test changes one to make it wrong.
type helloParts struct {
	version     []byte
	random      []byte
	sessionID   []byte
	suites      []byte
	compression []byte
	extensions  []byte // the whole block, length included; nil for none
}

func defaultParts(exts ...[]byte) helloParts {
	p := helloParts{
		version:     []byte{3, 3},
		random:      make([]byte, 32),
		sessionID:   vec8(make([]byte, 32)),
		suites:      vec16(u16(0xc02f), u16(0x1301)), // ECDHE-RSA-AES128-GCM-SHA256, TLS_AES_128_GCM_SHA256
		compression: vec8([]byte{0}),
	}
	if exts != nil {
		p.extensions = vec16(exts...)
	}
	return p
}

// message is the handshake message: type, 24-bit length, body.
func (p helloParts) message() []byte {
	body := append(append(append(append(append(append([]byte(nil),
		p.version...), p.random...), p.sessionID...), p.suites...), p.compression...), p.extensions...)
	return handshake(handshakeClientHello, body)
}

func handshake(typ byte, body []byte) []byte {
	n := len(body)
	return append([]byte{typ, byte(n >> 16), byte(n >> 8), byte(n)}, body...)
}

// record puts b in one handshake record, whatever its size.
func record(b []byte) []byte {
	return append([]byte{recordTypeHandshake, 3, 1, byte(len(b) >> 8), byte(len(b))}, b...)
}

// builtHello is a hand-built hello, in one record, with the given
// extensions.
func builtHello(exts ...[]byte) []byte { return record(defaultParts(exts...).message()) }

// The crypto/tls variant: a server handshake over a conn that records what it
// reads, stopped from GetConfigForClient once the hello is parsed.

// recordingConn records every byte read from r and swallows every write, so
// the client is never sent an alert.
type recordingConn struct {
	fakeConn
	r     interface{ Read([]byte) (int, error) }
	rec   []byte
	hello Hello
	got   bool
}

func (c *recordingConn) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.rec = append(c.rec, p[:n]...)
	return n, err
}

func (c *recordingConn) Write(p []byte) (int, error) { return len(p), nil }

var errStop = errors.New("stop after the hello")

// stopConfig is shared by every handshake: it keeps what it saw on the conn.
var stopConfig = sync.OnceValue(func() *tls.Config {
	return &tls.Config{
		GetConfigForClient: func(chi *tls.ClientHelloInfo) (*tls.Config, error) {
			c := chi.Conn.(*recordingConn)
			c.hello = Hello{ServerName: chi.ServerName, ALPN: chi.SupportedProtos}
			c.got = true
			return nil, errStop
		},
	}
})

// readCryptoTLS reads a ClientHello with crypto/tls. Its bytes are all it
// read, which may go past the hello: crypto/tls reads ahead.
func readCryptoTLS(r interface{ Read([]byte) (int, error) }) (Hello, []byte, error) {
	c := &recordingConn{r: r}
	err := tls.Server(c, stopConfig()).Handshake()
	if !c.got {
		return Hello{}, c.rec, err
	}
	h := c.hello
	h.ServerName = lowerASCII(h.ServerName)
	return h, c.rec, nil
}

func lowerASCII(s string) string {
	for i := 0; i < len(s); i++ {
		if 'A' <= s[i] && s[i] <= 'Z' {
			b := []byte(s)
			for j := i; j < len(b); j++ {
				if 'A' <= b[j] && b[j] <= 'Z' {
					b[j] += 'a' - 'A'
				}
			}
			return string(b)
		}
	}
	return s
}
