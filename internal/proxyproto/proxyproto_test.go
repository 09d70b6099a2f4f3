package proxyproto

import (
	"bufio"
	"bytes"
	"net"
	"testing"

	pp "github.com/pires/go-proxyproto"
)

// TestHeaderParsedByIndependentParser checks our headers with a parser we did
// not write (github.com/pires/go-proxyproto).
func TestHeaderParsedByIndependentParser(t *testing.T) {
	tcp := func(s string) *net.TCPAddr {
		a, err := net.ResolveTCPAddr("tcp", s)
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	cases := []struct {
		name     string
		src, dst net.Addr
		wantV1   string // exact v1 header
	}{
		{"ipv4", tcp("192.0.2.10:51234"), tcp("198.51.100.1:8081"),
			"PROXY TCP4 192.0.2.10 198.51.100.1 51234 8081\r\n"},
		{"ipv6", tcp("[2001:db8::1]:40000"), tcp("[2001:db8::2]:443"),
			"PROXY TCP6 2001:db8::1 2001:db8::2 40000 443\r\n"},
		{"mixed families", tcp("192.0.2.10:1"), tcp("[2001:db8::2]:2"),
			"PROXY TCP6 ::ffff:192.0.2.10 2001:db8::2 1 2\r\n"},
	}
	for _, tc := range cases {
		for _, version := range []int{1, 2} {
			h, err := Header(version, tc.src, tc.dst)
			if err != nil {
				t.Fatal(err)
			}
			if version == 1 && string(h) != tc.wantV1 {
				t.Errorf("%s v1: %q, want %q", tc.name, h, tc.wantV1)
			}
			payload := []byte("first bytes of the stream")
			r := bufio.NewReader(bytes.NewReader(append(h, payload...)))
			got, err := pp.Read(r)
			if err != nil {
				t.Fatalf("%s v%d: parser rejected %q: %v", tc.name, version, h, err)
			}
			src, dst := got.SourceAddr.(*net.TCPAddr), got.DestinationAddr.(*net.TCPAddr)
			want := tc.src.(*net.TCPAddr)
			if !src.IP.Equal(want.IP) || src.Port != want.Port {
				t.Errorf("%s v%d: source %v, want %v", tc.name, version, src, want)
			}
			if wd := tc.dst.(*net.TCPAddr); !dst.IP.Equal(wd.IP) || dst.Port != wd.Port {
				t.Errorf("%s v%d: destination %v, want %v", tc.name, version, dst, wd)
			}
			if int(got.Version) != version {
				t.Errorf("%s: parsed version %d, want %d", tc.name, got.Version, version)
			}
			rest := make([]byte, len(payload))
			if _, err := r.Read(rest); err != nil || !bytes.Equal(rest, payload) {
				t.Errorf("%s v%d: header consumed stream bytes: rest %q", tc.name, version, rest)
			}
		}
	}
}

func TestHeaderUnknownAddresses(t *testing.T) {
	src := &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 1}
	name := &net.UnixAddr{Name: "relay.example.com:8081", Net: "unix"}
	h, err := Header(1, src, name)
	if err != nil || string(h) != "PROXY UNKNOWN\r\n" {
		t.Fatalf("v1 with a non-IP address: %q %v", h, err)
	}
	h, err = Header(2, src, name)
	if err != nil {
		t.Fatal(err)
	}
	got, err := pp.Read(bufio.NewReader(bytes.NewReader(h)))
	if err != nil {
		t.Fatalf("parser rejected v2 LOCAL header: %v", err)
	}
	if got.Command != pp.LOCAL || got.TransportProtocol != pp.UNSPEC {
		t.Fatalf("v2 command %v transport %v, want LOCAL UNSPEC", got.Command, got.TransportProtocol)
	}
	if _, err := Header(3, src, src); err == nil {
		t.Fatal("version 3 accepted")
	}
}
