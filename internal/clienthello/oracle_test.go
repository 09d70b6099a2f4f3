package clienthello

import (
	"bytes"
	"errors"
	"reflect"
	"testing"
	"testing/iotest"
)

// benchHellos are the hellos both variants are measured on: Go's default
// client, whose X25519MLKEM768 key share makes its hello about 1.5 KB, and
// one with only X25519.
func benchHellos(b *testing.B) []struct {
	name  string
	hello []byte
} {
	return []struct {
		name  string
		hello []byte
	}{
		{"pq", realHello(b, helloConfigs[0].cfg())},
		{"classic", realHello(b, helloConfigs[1].cfg())},
	}
}

func BenchmarkRead(b *testing.B) {
	for _, bh := range benchHellos(b) {
		b.Run(bh.name, func(b *testing.B) {
			r := bytes.NewReader(bh.hello)
			b.SetBytes(int64(len(bh.hello)))
			b.ReportAllocs()
			for b.Loop() {
				r.Reset(bh.hello)
				h, _, err := Read(r)
				if err != nil || h.ServerName != "db.tunnels.example.com" || !h.Offers("h2") {
					b.Fatalf("Read: %+v, %v", h, err)
				}
			}
		})
	}
}

// BenchmarkCryptoTLS is the alternative: crypto/tls's server handshake over
// a recording conn, stopped by GetConfigForClient.
func BenchmarkCryptoTLS(b *testing.B) {
	for _, bh := range benchHellos(b) {
		b.Run(bh.name, func(b *testing.B) {
			r := bytes.NewReader(bh.hello)
			b.SetBytes(int64(len(bh.hello)))
			b.ReportAllocs()
			for b.Loop() {
				r.Reset(bh.hello)
				h, _, err := readCryptoTLS(r)
				if err != nil || h.ServerName != "db.tunnels.example.com" || !h.Offers("h2") {
					b.Fatalf("crypto/tls: %+v, %v", h, err)
				}
			}
		})
	}
}

// strict lists the errors by which Read refuses a hello that crypto/tls
// takes on purpose; the package doc says why for each.
var strict = []error{
	ErrNotTLS,        // a first record of another type than handshake, or not of version 3.x
	ErrTooLarge,      // MaxHello and MaxRead (records over 16384 bytes crypto/tls refuses too)
	errRecordType,    // a warning alert between the hello's records
	errRecordVersion, // a later record not of version 3.x
	errPastHello,     // the hello does not end its record
	errVersion,       // legacy_version not 3.x
	errSessionID,     // legacy_session_id over 32 bytes
	errCipherSuites,  // no cipher suite (odd lengths crypto/tls refuses too)
	errCompression,   // no compression method
	errSNIHost,       // a host_name that is not a DNS name
}

func isStrict(err error) bool {
	for _, s := range strict {
		if errors.Is(err, s) {
			return true
		}
	}
	return false
}

// fuzzSeeds are real hellos, whole and re-framed, and the malformed cases.
func fuzzSeeds(tb testing.TB) [][]byte {
	var seeds [][]byte
	for _, hc := range helloConfigs {
		rec := realHello(tb, hc.cfg())
		seeds = append(seeds, rec, reframe(tb, rec, 3, 200), append(append([]byte(nil), rec...), 23, 3, 3, 0, 1, 0))
	}
	seeds = append(seeds,
		builtHello(sniExt("db.example.com"), alpnExt("tcprelay/1", "h2")),
		builtHello(sniExt("DB.Example.Com.")),
		builtHello(sniExt("a.example"), sniExt("b.example")),
		builtHello(sniExt("a.example", "b.example")),
		builtHello(sniExt("")),
		builtHello(sniExt("db\x00.example")),
		builtHello(sniExt("db .example")),
		builtHello(alpnExt("h2", "")),
		builtHello(),
		[]byte("GET / HTTP/1.1\r\n\r\n"),
		[]byte("TRLY\x02"),
		[]byte{22, 3, 1, 0x40, 0x01},
		record([]byte{1, 0, 0x40, 0x01}),
		[]byte{22, 3, 1, 0, 2, 1, 0, 22, 3, 1, 0, 2, 0, 0},
	)
	return seeds
}

// FuzzRead: Read never panics, returns a prefix of its input within MaxRead,
// reads the same a byte at a time, and agrees with crypto/tls on every hello
// both take; a hello crypto/tls takes and Read refuses must be refused for
// one of the documented strictnesses.
//
// An exec costs tens of microseconds (crypto/tls and three Reads), and the
// seeds are real hellos of 1.5 KB, so the fuzzer's default minimizing of each
// new input (up to 60 s) takes most of a short run; -fuzzminimizetime 200x
// keeps it fuzzing.
func FuzzRead(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		r := bytes.NewReader(in)
		h, got, err := Read(r)
		if !bytes.HasPrefix(in, got) || len(got)+r.Len() != len(in) {
			t.Fatalf("returned %d bytes, %d left of %d: not exactly the prefix read", len(got), r.Len(), len(in))
		}
		if len(got) > MaxRead {
			t.Fatalf("read %d bytes, more than MaxRead", len(got))
		}
		h1, got1, err1 := Read(iotest.OneByteReader(bytes.NewReader(in)))
		// Not TLS is told from the first byte that shows it, so the bytes
		// returned then depend on how the reader splits its data.
		sameBytes := bytes.Equal(got, got1) || err == ErrNotTLS && bytes.HasPrefix(got, got1)
		if !reflect.DeepEqual(h, h1) || !sameBytes || !sameKind(err, err1) {
			t.Fatalf("byte at a time: %+v, %d bytes, %v; whole: %+v, %d bytes, %v", h1, len(got1), err1, h, len(got), err)
		}
		if err == nil {
			if len(got) < recordHeaderLen+handshakeHeaderLen {
				t.Fatalf("a hello of %d bytes", len(got))
			}
			// The bytes read are the hello: read again, they give it all.
			h2, got2, err2 := Read(bytes.NewReader(got))
			if err2 != nil || !reflect.DeepEqual(h, h2) || len(got2) != len(got) {
				t.Fatalf("reading the returned bytes again: %+v, %d bytes, %v", h2, len(got2), err2)
			}
		} else if h.ServerName != "" || h.ALPN != nil {
			t.Fatalf("error %v with a hello %+v", err, h)
		}

		oh, _, oerr := readCryptoTLS(bytes.NewReader(in))
		switch {
		case err == nil && oerr == nil:
			if h.ServerName != oh.ServerName || !slicesEqual(h.ALPN, oh.ALPN) {
				t.Fatalf("Read %+v, crypto/tls %+v", h, oh)
			}
		case err != nil && oerr == nil:
			if !isStrict(err) {
				t.Fatalf("crypto/tls takes %+v, Read refuses it: %v", oh, err)
			}
		}
	})
}

// sameKind reports whether two errors from Read are of the same kind.
func sameKind(a, b error) bool {
	if (a == nil) != (b == nil) {
		return false
	}
	if a == nil {
		return true
	}
	var ma, mb malformed
	okA, okB := errors.As(a, &ma), errors.As(b, &mb)
	if okA || okB {
		return okA && okB && ma == mb
	}
	for _, k := range []error{ErrNotTLS, ErrTooLarge} {
		if errors.Is(a, k) != errors.Is(b, k) {
			return false
		}
	}
	return true
}

func slicesEqual(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestStrictnessAgainstCryptoTLS pins each documented strictness: crypto/tls
// takes these hellos, Read refuses them, and the oracle check of FuzzRead
// would fail for them were the error not listed in strict. A Go release
// that grows stricter shows up here.
func TestStrictnessAgainstCryptoTLS(t *testing.T) {
	real := realHello(t, helloConfigs[1].cfg())
	partsWith := func(change func(*helloParts)) []byte {
		p := defaultParts(sniExt("db.example.com"))
		change(&p)
		return record(p.message())
	}
	// A hello over MaxHello, in full records.
	var overMax []byte
	for m := defaultParts(sniExt("db.example.com"), ext(21, make([]byte, MaxHello))).message(); len(m) > 0; {
		n := min(len(m), maxRecord)
		overMax = append(overMax, record(m[:n])...)
		m = m[n:]
	}
	tests := []struct {
		name string
		in   []byte
		err  error
	}{
		{"alert before the hello", append([]byte{21, 3, 3, 0, 2, 1, 112}, real...), ErrNotTLS},
		{"first record of version 0.2", append([]byte{22, 0, 2}, real[3:]...), ErrNotTLS},
		{"warning alert between records", func() []byte {
			two := reframe(t, real, 100)
			return append(append(append([]byte(nil), two[:105]...), 21, 3, 3, 0, 2, 1, 112), two[105:]...)
		}(), errRecordType},
		{"second record of version 0x0201", func() []byte {
			two := reframe(t, real, 100)
			two[106], two[107] = 2, 1
			return two
		}(), errRecordVersion},
		{"hello and more in its record", record(append(append([]byte(nil), real[5:]...), 0)), errPastHello},
		{"hello over MaxHello", overMax, ErrTooLarge},
		{"legacy_version 2.0", partsWith(func(p *helloParts) { p.version = []byte{2, 0} }), errVersion},
		{"session id of 33", partsWith(func(p *helloParts) { p.sessionID = vec8(make([]byte, 33)) }), errSessionID},
		{"no cipher suites", partsWith(func(p *helloParts) { p.suites = vec16() }), errCipherSuites},
		{"no compression", partsWith(func(p *helloParts) { p.compression = vec8(nil) }), errCompression},
		{"host name with a space", builtHello(sniExt("db .example.com")), errSNIHost},
		{"host name with NUL", builtHello(sniExt("db\x00.example.com")), errSNIHost},
		{"host name with an empty label", builtHello(sniExt("db..example.com")), errSNIHost},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			oh, _, oerr := readCryptoTLS(bytes.NewReader(tc.in))
			if oerr != nil {
				t.Fatalf("crypto/tls refuses it too (%v): not a strictness of Read's own", oerr)
			}
			if _, _, err := Read(bytes.NewReader(tc.in)); !errors.Is(err, tc.err) {
				t.Fatalf("Read: %v, want %v (crypto/tls read %+v)", err, tc.err, oh)
			}
			if !isStrict(tc.err) {
				t.Errorf("%v is not in the strict list", tc.err)
			}
		})
	}
}

// TestCryptoTLSStricter pins where crypto/tls refuses and Read takes: a
// trailing dot on the host name.
func TestCryptoTLSStricter(t *testing.T) {
	in := builtHello(sniExt("DB.example.com."))
	if _, _, err := readCryptoTLS(bytes.NewReader(in)); err == nil {
		t.Errorf("crypto/tls takes a host_name with a trailing dot")
	}
	if h, _, err := Read(bytes.NewReader(in)); err != nil || h.ServerName != "db.example.com" {
		t.Errorf("Read: %+v, %v; want db.example.com", h, err)
	}
}
