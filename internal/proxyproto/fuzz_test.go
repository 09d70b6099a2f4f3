package proxyproto

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"net/netip"
	"testing"

	pp "github.com/pires/go-proxyproto"
)

// nameAddr is an address that is not an IP address (a host name, garbage).
type nameAddr string

func (a nameAddr) Network() string { return "tcp" }
func (a nameAddr) String() string  { return string(a) }

// fuzzAddr builds an address the way a relayed connection gets one (a
// string the relay sent, parsed as ip:port, else kept as a name) or, if
// raw, as a *net.TCPAddr with any IP bytes and any port.
func fuzzAddr(s string, ip []byte, port int, raw bool) net.Addr {
	if raw {
		return &net.TCPAddr{IP: ip, Port: port}
	}
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return net.TCPAddrFromAddrPort(ap)
	}
	return nameAddr(s)
}

// ip reports whether a is an IP address (well formed or not).
func ip(a net.Addr) bool {
	t, ok := a.(*net.TCPAddr)
	return ok && t.IP != nil
}

// usable reports whether a is an IP address and port a header can carry.
func usable(a net.Addr) bool {
	t, ok := a.(*net.TCPAddr)
	return ok && (len(t.IP) == net.IPv4len || len(t.IP) == net.IPv6len) && t.Port >= 0 && t.Port <= 65535
}

// FuzzHeader: whatever addresses a relayed connection reports, Header
// gives an error or a header that an independent parser
// (github.com/pires/go-proxyproto) reads back, with the same addresses,
// and without eating the stream's first bytes.
func FuzzHeader(f *testing.F) {
	for _, a := range []struct{ src, dst string }{
		{"192.0.2.10:51234", "198.51.100.1:8081"},
		{"[2001:db8::1]:40000", "[2001:db8::2]:443"},
		{"192.0.2.10:1", "[2001:db8::2]:2"},
		{"[::ffff:192.0.2.1]:0", "[fe80::1%eth0]:65535"},
		{"relay.example.com:8081", "192.0.2.1:1"},
		{"", "[::]:0"},
	} {
		for v := uint8(0); v <= 3; v++ {
			f.Add(v, a.src, a.dst, []byte(nil), []byte(nil), 0, 0, uint8(0))
		}
	}
	f.Add(uint8(1), "", "", []byte{192, 0, 2, 1}, []byte{1, 2, 3}, 1, 70000, uint8(3))
	f.Add(uint8(2), "", "", []byte(net.ParseIP("2001:db8::1")), []byte{}, -1, 80, uint8(3))
	f.Add(uint8(2), "", "192.0.2.1:80", []byte{1, 2, 3, 4, 5}, []byte(nil), 65535, 0, uint8(1))

	f.Fuzz(func(t *testing.T, version uint8, src, dst string, srcIP, dstIP []byte, srcPort, dstPort int, mode uint8) {
		s := fuzzAddr(src, srcIP, srcPort, mode&1 != 0)
		d := fuzzAddr(dst, dstIP, dstPort, mode&2 != 0)
		// Header tells the addresses when both are IP addresses, says they
		// are unknown when one is not, and refuses an IP address or port
		// that no header can carry.
		known := ip(s) && ip(d)
		h, err := Header(int(version), s, d)
		if err != nil {
			if (version == 1 || version == 2) && (!known || usable(s) && usable(d)) {
				t.Fatalf("Header(%d, %#v, %#v): %v; want a header for these", version, s, d, err)
			}
			return
		}
		if known && (!usable(s) || !usable(d)) {
			t.Fatalf("Header(%d, %#v, %#v) = %q; want an error for an address no header can carry", version, s, d, h)
		}
		if version != 1 && version != 2 {
			t.Fatalf("Header(%d, ...) = %q, want an error for that version", version, h)
		}
		payload := []byte("first bytes of the stream")
		r := bufio.NewReader(bytes.NewReader(append(append([]byte(nil), h...), payload...)))
		got, err := pp.Read(r)
		if err != nil {
			t.Fatalf("Header(%d, %#v, %#v) = %q: the parser rejects it: %v", version, s, d, h, err)
		}
		if rest, _ := io.ReadAll(r); !bytes.Equal(rest, payload) {
			t.Fatalf("header %q: the parser left %q of the stream, want %q", h, rest, payload)
		}
		if int(got.Version) != int(version) {
			t.Fatalf("header %q: version %d, want %d", h, got.Version, version)
		}
		if !known {
			if got.Command != pp.LOCAL && got.TransportProtocol != pp.UNSPEC {
				t.Fatalf("header %q for %#v, %#v: %v %v, want the addresses unknown", h, s, d, got.Command, got.TransportProtocol)
			}
			return
		}
		gs, gd, ok := got.TCPAddrs()
		ws, wd := s.(*net.TCPAddr), d.(*net.TCPAddr)
		if !ok || !gs.IP.Equal(ws.IP) || gs.Port != ws.Port || !gd.IP.Equal(wd.IP) || gd.Port != wd.Port {
			t.Fatalf("header %q: %v -> %v (ok %v), want %v -> %v", h, gs, gd, ok, ws, wd)
		}
	})
}
