package clienthello

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"reflect"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"tcprelay/internal/proto"
)

// readAll reads a hello from b as a plain reader and as one that gives a
// byte at a time, checks that both agree, and returns what the first got and
// how many bytes of b were left unread, and its error.
func readAll(t *testing.T, b []byte) (Hello, []byte, int, error) {
	t.Helper()
	r := bytes.NewReader(b)
	h, got, err := Read(r)
	r1 := bytes.NewReader(b)
	h1, got1, err1 := Read(iotest.OneByteReader(r1))
	if !reflect.DeepEqual(h, h1) || !bytes.Equal(got, got1) || (err == nil) != (err1 == nil) || r.Len() != r1.Len() {
		t.Errorf("byte at a time: %+v, %d bytes, %v, %d left; whole: %+v, %d bytes, %v, %d left",
			h1, len(got1), err1, r1.Len(), h, len(got), err, r.Len())
	}
	if !bytes.HasPrefix(b, got) {
		t.Errorf("returned bytes are not a prefix of the input")
	}
	if len(got)+r.Len() != len(b) {
		t.Errorf("returned %d bytes, %d left of %d: Read kept or lost some", len(got), r.Len(), len(b))
	}
	return h, got, r.Len(), err
}

func TestRealHellos(t *testing.T) {
	for _, tc := range helloConfigs {
		t.Run(tc.name, func(t *testing.T) {
			rec := realHello(t, tc.cfg())
			t.Logf("hello record: %d bytes", len(rec))
			variants := map[string][]byte{
				"one record":           rec,
				"two records":          reframe(t, rec, 100),
				"three records":        reframe(t, rec, 40, 60),
				"header split":         reframe(t, rec, 1, 2, 3),
				"one byte per record":  fragments(t, rec, 1),
				"cut in the random":    reframe(t, rec, 10),
				"cut near the end":     reframe(t, rec, len(rec)-recordHeaderLen-1),
				"seven-byte fragments": fragments(t, rec, 7),
			}
			for name, in := range variants {
				t.Run(name, func(t *testing.T) {
					trailer := []byte("\x17\x03\x03\x00\x05early") // what a client might send next
					h, got, left, err := readAll(t, append(append([]byte(nil), in...), trailer...))
					if err != nil {
						t.Fatalf("Read: %v", err)
					}
					if !reflect.DeepEqual(h, tc.want) {
						t.Errorf("Read = %+v, want %+v", h, tc.want)
					}
					if !bytes.Equal(got, in) {
						t.Errorf("returned %d bytes, want the %d of the hello's records", len(got), len(in))
					}
					if left != len(trailer) {
						t.Errorf("%d bytes left unread, want the %d after the hello", left, len(trailer))
					}
				})
			}
		})
	}
}

// TestCryptoTLSAgrees checks the oracle itself on the real hellos.
func TestCryptoTLSAgrees(t *testing.T) {
	for _, tc := range helloConfigs {
		rec := realHello(t, tc.cfg())
		h, _, err := readCryptoTLS(bytes.NewReader(rec))
		if err != nil {
			t.Fatalf("%s: crypto/tls: %v", tc.name, err)
		}
		if !reflect.DeepEqual(h, tc.want) {
			t.Errorf("%s: crypto/tls read %+v, want %+v", tc.name, h, tc.want)
		}
	}
}

func TestOffers(t *testing.T) {
	h := Hello{ALPN: []string{"h2", "tcprelay/1"}}
	if !h.Offers("tcprelay/1") || !h.Offers("h2") {
		t.Errorf("Offers misses a protocol of %q", h.ALPN)
	}
	if h.Offers("http/1.1") || h.Offers("") || h.Offers("tcprelay") || (Hello{}).Offers("h2") {
		t.Errorf("Offers finds a protocol not in %q", h.ALPN)
	}
}

func TestHandBuilt(t *testing.T) {
	label63 := strings.Repeat("a", 63)
	name253 := label63 + "." + label63 + "." + label63 + "." + strings.Repeat("b", 61)
	otherType := ext(extensionServerName, vec16(append([]byte{1}, vec16([]byte("x"))...)))
	tests := []struct {
		name string
		in   []byte
		want Hello
		err  error
	}{
		{"no extensions", builtHello(), Hello{}, nil},
		{"empty extension block", record(helloParts{[]byte{3, 3}, make([]byte, 32), vec8(nil), vec16(u16(0x1301)), vec8([]byte{0}), vec16()}.message()), Hello{}, nil},
		{"sni and alpn", builtHello(sniExt("db.example.com"), alpnExt("tcprelay/1", "h2")), Hello{"db.example.com", []string{"tcprelay/1", "h2"}}, nil},
		{"uppercase sni", builtHello(sniExt("DB.Example.COM")), Hello{ServerName: "db.example.com"}, nil},
		{"trailing dot stripped", builtHello(sniExt("db.example.com.")), Hello{ServerName: "db.example.com"}, nil},
		{"underscore", builtHello(sniExt("_acme.example.com")), Hello{ServerName: "_acme.example.com"}, nil},
		{"longest name", builtHello(sniExt(name253)), Hello{ServerName: name253}, nil},
		{"longest name with its dot", builtHello(sniExt(name253 + ".")), Hello{ServerName: name253}, nil},
		{"only another name type", builtHello(otherType), Hello{}, nil},
		{"unknown extensions around", builtHello(ext(0xfafa, nil), sniExt("a.b"), ext(21, make([]byte, 100))), Hello{ServerName: "a.b"}, nil},

		{"duplicate sni extension", builtHello(sniExt("a.example"), sniExt("b.example")), Hello{}, errDupExtension},
		{"duplicate other extension", builtHello(ext(43, nil), sniExt("a.example"), ext(43, nil)), Hello{}, errDupExtension},
		{"two host names", builtHello(sniExt("a.example", "b.example")), Hello{}, errSNIDup},
		{"empty sni", builtHello(sniExt("")), Hello{}, errSNIEmpty},
		{"sni only a dot", builtHello(sniExt(".")), Hello{}, errSNIEmpty},
		{"sni with NUL", builtHello(sniExt("db\x00.example.com")), Hello{}, errSNIHost},
		{"sni with space", builtHello(sniExt("db .example.com")), Hello{}, errSNIHost},
		{"sni with slash", builtHello(sniExt("db.example.com/x")), Hello{}, errSNIHost},
		{"sni with high byte", builtHello(sniExt("d\xc3\xa9.example")), Hello{}, errSNIHost},
		{"sni two trailing dots", builtHello(sniExt("db.example.com..")), Hello{}, errSNIHost},
		{"sni leading dot", builtHello(sniExt(".example.com")), Hello{}, errSNIHost},
		{"sni empty label", builtHello(sniExt("db..example.com")), Hello{}, errSNIHost},
		{"sni label of 64", builtHello(sniExt(label63 + "a.example")), Hello{}, errSNIHost},
		{"sni of 254", builtHello(sniExt(name253 + "b")), Hello{}, errSNIHost},
		{"sni empty list", builtHello(ext(extensionServerName, vec16())), Hello{}, errSNI},
		{"sni empty extension", builtHello(ext(extensionServerName, nil)), Hello{}, errSNI},
		{"sni trailing bytes", builtHello(ext(extensionServerName, append(vec16(append([]byte{0}, vec16([]byte("a.b"))...)), 0))), Hello{}, errSNI},
		{"sni name past list", builtHello(ext(extensionServerName, vec16([]byte{0, 0, 9, 'a'}))), Hello{}, errSNI},
		{"alpn empty protocol", builtHello(alpnExt("h2", "")), Hello{}, errALPNEmptyProto},
		{"alpn empty list", builtHello(ext(extensionALPN, vec16())), Hello{}, errALPN},
		{"alpn protocol past list", builtHello(ext(extensionALPN, vec16([]byte{5, 'h', '2'}))), Hello{}, errALPN},
		{"alpn trailing bytes", builtHello(ext(extensionALPN, append(vec16(vec8([]byte("h2"))), 0))), Hello{}, errALPN},

		{"not a client hello", record(handshake(2, defaultParts().message()[4:])), Hello{}, errNotClientHello},
		{"legacy version 2.0", record(helloParts{[]byte{2, 0}, make([]byte, 32), vec8(nil), vec16(u16(0x1301)), vec8([]byte{0}), nil}.message()), Hello{}, errVersion},
		{"session id of 33", record(helloParts{[]byte{3, 3}, make([]byte, 32), vec8(make([]byte, 33)), vec16(u16(0x1301)), vec8([]byte{0}), nil}.message()), Hello{}, errSessionID},
		{"no cipher suites", record(helloParts{[]byte{3, 3}, make([]byte, 32), vec8(nil), vec16(), vec8([]byte{0}), nil}.message()), Hello{}, errCipherSuites},
		{"odd cipher suites", record(helloParts{[]byte{3, 3}, make([]byte, 32), vec8(nil), vec16([]byte{0x13, 0x01, 0}), vec8([]byte{0}), nil}.message()), Hello{}, errCipherSuites},
		{"no compression", record(helloParts{[]byte{3, 3}, make([]byte, 32), vec8(nil), vec16(u16(0x1301)), vec8(nil), nil}.message()), Hello{}, errCompression},
		{"bytes after extensions", record(helloParts{[]byte{3, 3}, make([]byte, 32), vec8(nil), vec16(u16(0x1301)), vec8([]byte{0}), append(vec16(sniExt("a.b")), 0)}.message()), Hello{}, errTrailing},
		{"one byte of extensions", record(helloParts{[]byte{3, 3}, make([]byte, 32), vec8(nil), vec16(u16(0x1301)), vec8([]byte{0}), []byte{0}}.message()), Hello{}, errShort},
		{"extension past block", record(helloParts{[]byte{3, 3}, make([]byte, 32), vec8(nil), vec16(u16(0x1301)), vec8([]byte{0}), vec16([]byte{0, 0, 0, 9, 1})}.message()), Hello{}, errExtension},
		{"extension type cut", record(helloParts{[]byte{3, 3}, make([]byte, 32), vec8(nil), vec16(u16(0x1301)), vec8([]byte{0}), vec16([]byte{0})}.message()), Hello{}, errExtension},
		{"random cut", record(handshake(1, []byte{3, 3, 1, 2, 3})), Hello{}, errShort},
		{"session id cut", record(handshake(1, append(append([]byte{3, 3}, make([]byte, 32)...), 5, 1))), Hello{}, errShort},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h, got, left, err := readAll(t, append(append([]byte(nil), tc.in...), "after"...))
			if tc.err != nil {
				if !errors.Is(err, tc.err) || !errors.Is(err, ErrMalformed) {
					t.Fatalf("Read: %+v, %v; want %v", h, err, tc.err)
				}
				if errors.Is(err, ErrNotTLS) || errors.Is(err, ErrTooLarge) {
					t.Errorf("malformed error %v also matches another kind", err)
				}
				if !reflect.DeepEqual(h, Hello{}) {
					t.Errorf("a failed Read returned %+v", h)
				}
			} else {
				if err != nil {
					t.Fatalf("Read: %v", err)
				}
				if !reflect.DeepEqual(h, tc.want) {
					t.Errorf("Read = %+v, want %+v", h, tc.want)
				}
			}
			if !bytes.Equal(got, tc.in) || left != len("after") {
				t.Errorf("read %d bytes and left %d, want %d and %d", len(got), left, len(tc.in), len("after"))
			}
		})
	}
}

func TestNotTLS(t *testing.T) {
	rng := rand.New(rand.NewChaCha8([32]byte{1}))
	random := make([]byte, 600)
	for i := range random {
		random[i] = byte(rng.Uint32())
	}
	if random[0] == recordTypeHandshake {
		t.Fatal("the random bytes start like TLS; change the seed")
	}
	tests := []struct {
		name string
		in   []byte
	}{
		{"http get", []byte("GET / HTTP/1.1\r\nHost: db.tunnels.example.com\r\n\r\n")},
		{"relay preamble", append(proto.Preamble(), 0, 0, 0, 0, 0)},
		{"relay preamble alone", proto.Preamble()},
		{"random", random},
		{"ssh", []byte("SSH-2.0-OpenSSH_9.6\r\n")},
		{"sslv2 hello", []byte{0x80, 0x2e, 0x01, 0x00, 0x02, 0x00, 0x15}},
		{"tls alert first", []byte{21, 3, 3, 0, 2, 1, 0}},
		{"handshake of version 2", []byte{22, 2, 0, 0, 4, 1, 0, 0, 0}},
		{"handshake record of version 4.1", append([]byte{22, 4, 1}, builtHello()[3:]...)},
		{"one byte", []byte{'G'}},
		{"two bytes", []byte{22, 0}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := bytes.NewReader(tc.in)
			_, got, err := Read(r)
			if err != ErrNotTLS {
				t.Fatalf("Read: %v, want ErrNotTLS", err)
			}
			if len(got) > recordHeaderLen || !bytes.HasPrefix(tc.in, got) || len(got)+r.Len() != len(tc.in) {
				t.Errorf("read %d bytes (%q) of %d, want at most a record header", len(got), got, len(tc.in))
			}
		})
	}
}

// TestNotTLSAtOnce: a client that sends one byte that is not TLS and waits
// is told so without waiting for the rest of a record header.
func TestNotTLSAtOnce(t *testing.T) {
	r, w := net.Pipe()
	defer r.Close()
	defer w.Close()
	go w.Write([]byte{'G'})
	r.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, got, err := Read(r); err != ErrNotTLS || string(got) != "G" {
		t.Fatalf("Read: %q, %v; want \"G\", ErrNotTLS", got, err)
	}
}

func TestRecordErrors(t *testing.T) {
	real := realHello(t, helloConfigs[0].cfg())
	two := reframe(t, real, 100)
	withType := func(b []byte, at int, typ byte) []byte {
		b = append([]byte(nil), b...)
		b[at] = typ
		return b
	}
	big := handshake(handshakeClientHello, make([]byte, MaxHello+1))
	maxRec := record(big[:maxRecord])
	tooLong := handshake(handshakeClientHello, make([]byte, MaxHello))
	tests := []struct {
		name string
		in   []byte
		err  error
		read int // the bytes Read should consume
	}{
		{"oversized first record", []byte{22, 3, 1, 0x40, 0x01, 1, 0, 0, 0}, ErrTooLarge, recordHeaderLen},
		{"oversized record", []byte{22, 3, 1, 0xff, 0xff}, ErrTooLarge, recordHeaderLen},
		{"oversized second record", append(reframe(t, real, 100)[:105], 22, 3, 3, 0x40, 0x01), ErrTooLarge, 110},
		{"oversized handshake length", record([]byte{1, 0, 0x40, 0x01}), ErrTooLarge, 9},
		{"handshake length at most", record([]byte{1, 0xff, 0xff, 0xff}), ErrTooLarge, 9},
		{"oversized hello in its first record", maxRec, ErrTooLarge, len(maxRec)},
		// The record that completes the handshake header is read whole.
		{"oversized hello, header split", reframe(t, record(big[:16000]), 2), ErrTooLarge, 2*recordHeaderLen + 16000},
		{"hello of MaxHello plus one", reframe(t, record(big[:maxRecord]), 10), ErrTooLarge, recordHeaderLen + 10},
		{"too many records", fragments(t, record(tooLong[:maxRecord]), 1), ErrTooLarge, MaxRead - MaxRead%(recordHeaderLen+1)},
		{"empty first record", []byte{22, 3, 1, 0, 0}, errEmptyRecord, recordHeaderLen},
		{"empty second record", append(two[:105], 22, 3, 3, 0, 0), errEmptyRecord, 110},
		{"alert inside the hello", withType(two, 105, 21), errRecordType, 110},
		{"ccs inside the hello", withType(two, 105, 20), errRecordType, 110},
		{"application data inside the hello", withType(two, 105, 23), errRecordType, 110},
		{"second record of version 4", withType(two, 106, 4), errRecordVersion, 110},
		{"hello and a byte more in its record", record(append(append([]byte(nil), real[5:]...), 0)), errPastHello, len(real) + 1},
		{"hello and one byte more in its last record", reframe(t, record(append(append([]byte(nil), real[5:]...), 0)), 700), errPastHello, 2*recordHeaderLen + 700}, // refused from its header
		{"hello and more in its record", record(append(append([]byte(nil), real[5:]...), 1, 0, 0, 0)), errPastHello, len(real) + 4},
		{"second record past the hello", append(reframe(t, real, 100)[:105], append([]byte{22, 3, 3, byte((len(real) - 104) >> 8), byte(len(real) - 104)}, real[105:]...)...), errPastHello, 110},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			in := append(append([]byte(nil), tc.in...), make([]byte, 64<<10)...)
			h, got, _, err := readAll(t, in)
			if !errors.Is(err, tc.err) {
				t.Fatalf("Read: %+v, %v; want %v", h, err, tc.err)
			}
			if len(got) != tc.read {
				t.Errorf("read %d bytes, want %d", len(got), tc.read)
			}
			if len(got) > MaxRead {
				t.Errorf("read %d bytes, more than MaxRead", len(got))
			}
		})
	}
}

// TestLargestHello: a hello of MaxHello bytes, in two full records and in
// many small ones, is read; the records that carry it stay within MaxRead.
func TestLargestHello(t *testing.T) {
	parts := defaultParts(sniExt("big.example.com"))
	pad := MaxHello - (len(parts.message()) - handshakeHeaderLen) - 4 // the padding extension's type and length
	parts = defaultParts(sniExt("big.example.com"), ext(21, make([]byte, pad)))
	msg := parts.message()
	if len(msg) != handshakeHeaderLen+MaxHello {
		t.Fatalf("built a hello of %d bytes, want %d", len(msg)-handshakeHeaderLen, MaxHello)
	}
	variants := map[string][]byte{}
	for name, size := range map[string]int{"full records": maxRecord, "records of 3000": 3000} {
		for m := msg; len(m) > 0; {
			n := min(len(m), size)
			variants[name] = append(variants[name], record(m[:n])...)
			m = m[n:]
		}
	}
	for name, b := range variants {
		t.Run(name, func(t *testing.T) {
			h, got, left, err := readAll(t, append(append([]byte(nil), b...), 1, 2, 3))
			if err != nil {
				t.Fatalf("Read: %v", err)
			}
			if h.ServerName != "big.example.com" || !bytes.Equal(got, b) || left != 3 {
				t.Errorf("Read = %+v, %d bytes, %d left; want big.example.com, %d, 3", h, len(got), left, len(b))
			}
		})
	}
}

// TestTruncated cuts real hellos at every byte: every cut is an error that
// says the input ended, and the bytes returned are all of the cut input.
func TestTruncated(t *testing.T) {
	for _, tc := range helloConfigs[:3] {
		rec := realHello(t, tc.cfg())
		for name, in := range map[string][]byte{
			"one record":    rec,
			"three records": reframe(t, rec, 2, 300),
		} {
			for i := range len(in) {
				r := bytes.NewReader(in[:i])
				_, got, err := Read(r)
				want := io.ErrUnexpectedEOF
				if i == 0 {
					want = io.EOF
				}
				if !errors.Is(err, want) {
					t.Fatalf("%s, %s, cut at %d of %d: %v, want %v", tc.name, name, i, len(in), err, want)
				}
				if !bytes.Equal(got, in[:i]) || r.Len() != 0 {
					t.Fatalf("%s, %s, cut at %d: returned %d bytes, %d unread", tc.name, name, i, len(got), r.Len())
				}
			}
		}
	}
}

// TestReaderErrors: an error from the reader comes back wrapped, whichever
// read it ends.
func TestReaderErrors(t *testing.T) {
	rec := reframe(t, realHello(t, helloConfigs[0].cfg()), 50)
	boom := errors.New("boom")
	for i := range len(rec) {
		r := io.MultiReader(bytes.NewReader(rec[:i]), iotest.ErrReader(boom))
		_, got, err := Read(r)
		if !errors.Is(err, boom) || !bytes.Equal(got, rec[:i]) {
			t.Fatalf("cut at %d: %d bytes, %v; want %d, %v", i, len(got), err, i, boom)
		}
	}
	// Data and an error together, from the first read.
	_, _, err := Read(iotest.DataErrReader(bytes.NewReader(rec[:3])))
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("3 bytes and EOF in one read: %v, want io.ErrUnexpectedEOF", err)
	}
	h, _, err := Read(iotest.DataErrReader(bytes.NewReader(rec)))
	if err != nil || h.ServerName != "db.tunnels.example.com" {
		t.Errorf("the hello and EOF in its last read: %+v, %v", h, err)
	}
}

// TestStalledClient: over real TCP, a client that sends half a hello and
// stalls makes Read fail with the conn's deadline error, not a parse error.
func TestStalledClient(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	rec := realHello(t, helloConfigs[0].cfg())
	done := make(chan struct{})
	defer close(done)
	go func() {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			return
		}
		defer c.Close()
		c.Write(rec[:len(rec)/2])
		<-done
	}()
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	start := time.Now()
	_, got, err := Read(c)
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Read: %v, want os.ErrDeadlineExceeded", err)
	}
	if errors.Is(err, ErrMalformed) || errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("a stalled client's error %v reads as another kind", err)
	}
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Errorf("Read: %v is not a net.Error timeout", err)
	}
	if !bytes.Equal(got, rec[:len(rec)/2]) {
		t.Errorf("returned %d bytes, want the %d sent", len(got), len(rec)/2)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("Read took %v", d)
	}
}

// TestAllocations: reading a real hello costs the buffer (and its first
// header), the name and the ALPN list.
func TestAllocations(t *testing.T) {
	rec := realHello(t, helloConfigs[0].cfg())
	r := bytes.NewReader(rec)
	n := testing.AllocsPerRun(100, func() {
		r.Reset(rec)
		if _, _, err := Read(r); err != nil {
			t.Fatal(err)
		}
	})
	if n > 5 {
		t.Errorf("Read allocates %v times per hello, want at most 5", n)
	}
}
