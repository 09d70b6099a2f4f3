// Package clienthello reads the TLS ClientHello that opens a connection,
// without terminating TLS, so that the relay can route the connection by its
// SNI server name (and its ALPN protocols) and then replay every byte it read
// to the real TLS server.
//
// Read consumes exactly the TLS records that carry the ClientHello and nothing
// past them, and bounds what it reads: a record body is at most 16384 bytes,
// the ClientHello message at most MaxHello bytes, and all the bytes read at
// most MaxRead.
//
// # Errors
//
// Read tells apart a client that does not speak TLS (ErrNotTLS), one that
// sends too much (ErrTooLarge), one whose hello is malformed (an error for
// which errors.Is(err, ErrMalformed) holds, saying what was wrong), and one
// that is slow or silent or goes away: the reader's own error is passed
// through wrapped, so errors.Is(err, io.ErrUnexpectedEOF) or
// errors.Is(err, os.ErrDeadlineExceeded) hold as they did for the reader.
//
// # Strictness
//
// Read is stricter than crypto/tls's server in these ways, each on purpose;
// a hello that Read refuses for them cannot be routed, and no real client
// sends one:
//
//   - Every record must have the legacy version 3.x (crypto/tls takes any
//     version below 16.0 before the hello); on the first record this is
//     ErrNotTLS.
//   - The hello's records must be handshake records only: crypto/tls skips a
//     warning alert between them, Read calls any other record type malformed.
//   - The record that completes the ClientHello must end with it (RFC 8446,
//     section 5.1: the ClientHello must end at a record boundary), so that no
//     byte past the hello is ever read. crypto/tls reads such a record whole.
//   - The ClientHello is at most MaxHello bytes (crypto/tls takes 64 KiB), and
//     the records carrying it at most MaxRead bytes in all, so a hello cut
//     into a great many tiny records can be ErrTooLarge.
//   - legacy_version must be 3.x, legacy_session_id at most 32 bytes,
//     cipher_suites at least one suite and compression_methods at least one
//     method, as RFC 8446 section 4.1.2 says; crypto/tls checks none of these
//     while parsing.
//   - The host_name in server_name must be a DNS name: letters, digits, '-'
//     and '_' in dot-separated labels of 1 to 63 bytes, 253 bytes in all once
//     one trailing dot is stripped. crypto/tls takes any bytes.
//
// And more lenient in one: a host_name with one trailing dot is taken without
// it, where crypto/tls refuses the hello. Other extensions than server_name
// and ALPN are checked only for their framing, not their content.
//
// # Why not crypto/tls
//
// crypto/tls can read the hello too: a tls.Server over a conn that records
// what it reads and swallows what it writes, stopped with an error from
// GetConfigForClient. The tests keep that variant, as the oracle that FuzzRead
// checks Read against, and measure both on the same real hellos (Go's own
// client to "db.tunnels.example.com" offering h2 and http/1.1) on the 2-core
// development machine, median of 5 runs:
//
//	hello                           Read                       crypto/tls
//	X25519MLKEM768, 1532 B   1.3 µs, 1613 B, 5 allocs   9.0 µs, 10496 B, 42 allocs
//	X25519 only, 300 B       0.42 µs, 397 B, 5 allocs   4.5 µs, 4120 B, 37 allocs
//
// Read is about 7 to 10 times cheaper in time and memory, and the crypto/tls
// variant also reads ahead past the hello (its record layer reads 512 bytes
// or more at a time) and takes up to 64 KiB of it; hence this parser.
package clienthello

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
)

const (
	// MaxHello is the largest ClientHello message body that Read accepts: the
	// 24-bit length in the handshake header is checked against it before the
	// rest of the message is read. Real hellos are a few hundred bytes, or
	// about 1.3–2 KB with a post-quantum key share; 16 KiB leaves room for
	// larger key shares while keeping what a connection can make the relay
	// hold small.
	MaxHello = 16 << 10

	// MaxRead bounds all the bytes Read reads: the ClientHello's 4-byte
	// handshake header and body plus the 5-byte header of each record that
	// carries a part of it. A MaxHello hello fits in two full records with
	// room to spare; the bound is there for a hello cut into many small
	// records, which some clients do to dodge SNI filters.
	MaxRead = 2 * MaxHello

	// maxRecord is the largest TLS plaintext record body (RFC 8446, 5.1).
	maxRecord = 1 << 14

	recordHeaderLen    = 5
	handshakeHeaderLen = 4

	recordTypeHandshake    = 22
	handshakeClientHello   = 1
	extensionServerName    = 0
	extensionALPN          = 16
	sniHostName            = 0
	maxSessionID           = 32
	maxHostName            = 253
	maxLabel               = 63
	smallExtensionSetLimit = 32
)

var (
	// ErrNotTLS is returned when the first bytes are not those of a TLS
	// handshake record (content type 22, version 3.x).
	ErrNotTLS = errors.New("clienthello: not TLS")

	// ErrTooLarge is returned, wrapped, when a record, the ClientHello or
	// the bytes read would pass their bounds. It is decided from a length
	// field before the bytes it announces are read.
	ErrTooLarge = errors.New("clienthello: too large")

	// ErrMalformed is what every error about a malformed hello matches with
	// errors.Is; the error itself says what was wrong.
	ErrMalformed = errors.New("clienthello: malformed")
)

// malformed is a malformed hello's error: what was wrong. Its values are
// package variables, so returning one costs no allocation.
type malformed string

func (m malformed) Error() string        { return "clienthello: malformed: " + string(m) }
func (m malformed) Is(target error) bool { return target == ErrMalformed }

var (
	errEmptyRecord      error = malformed("empty handshake record")
	errRecordType       error = malformed("a record that is not a handshake record inside the ClientHello")
	errRecordVersion    error = malformed("record version is not 3.x")
	errNotClientHello   error = malformed("first handshake message is not a ClientHello")
	errPastHello        error = malformed("record goes on past the end of the ClientHello")
	errShort            error = malformed("ClientHello ends inside a field")
	errVersion          error = malformed("legacy_version is not 3.x")
	errSessionID        error = malformed("legacy_session_id longer than 32 bytes")
	errCipherSuites     error = malformed("cipher_suites empty or of odd length")
	errCompression      error = malformed("compression_methods empty")
	errTrailing         error = malformed("bytes after the extensions")
	errExtension        error = malformed("extension longer than the extensions block")
	errDupExtension     error = malformed("an extension type appears twice")
	errSNI              error = malformed("server_name extension badly framed")
	errSNIDup           error = malformed("server_name has two host_name entries")
	errSNIEmpty         error = malformed("empty host_name")
	errSNIHost          error = malformed("host_name is not a DNS name")
	errALPN             error = malformed("ALPN extension badly framed")
	errALPNEmptyProto   error = malformed("empty ALPN protocol name")
	errReaderMisbehaved       = errors.New("clienthello: reader returned an impossible count")
)

// Hello is what the relay reads of a TLS ClientHello.
type Hello struct {
	ServerName string   // the SNI host_name, lowercased; "" if the hello has none
	ALPN       []string // the protocols offered (application_layer_protocol_negotiation), in order
}

// Offers reports whether the hello offers the ALPN protocol proto.
func (h Hello) Offers(proto string) bool {
	return slices.Contains(h.ALPN, proto)
}

// Read reads one TLS ClientHello from r and returns it, with every byte it
// read from r, so the caller can replay them to the real TLS server. The
// bytes are exactly the records that carry the hello: Read never reads past
// the record that completes it, and never more than MaxRead bytes.
//
// On an error, the bytes are those read before it, which may be none; the
// error is ErrNotTLS, wraps ErrTooLarge, matches ErrMalformed, or wraps the
// error r returned (io.EOF as it is when r had no byte at all, and as
// io.ErrUnexpectedEOF once some bytes were read).
func Read(r io.Reader) (Hello, []byte, error) {
	buf, msg, err := readMessage(r)
	if err != nil {
		return Hello{}, buf, err
	}
	h, err := parse(msg)
	if err != nil {
		return Hello{}, buf, err
	}
	return h, buf, nil
}

// readErr wraps an error from r, read after n bytes of the hello. An EOF
// after some bytes is a truncated hello, io.ErrUnexpectedEOF.
func readErr(err error, n int) error {
	if n == 0 && err == io.EOF {
		return io.EOF
	}
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("clienthello: reading after %d bytes: %w", n, err)
}

// checkFirstHeader checks the first n bytes of the first record header.
func checkFirstHeader(hdr []byte) error {
	if len(hdr) >= 1 && hdr[0] != recordTypeHandshake {
		return ErrNotTLS
	}
	if len(hdr) >= 2 && hdr[1] != 3 {
		return ErrNotTLS
	}
	return nil
}

// recordLen checks a record's length field.
func recordLen(hdr []byte) (int, error) {
	n := int(binary.BigEndian.Uint16(hdr[3:recordHeaderLen]))
	if n > maxRecord {
		return 0, fmt.Errorf("%w: a record of %d bytes, more than %d", ErrTooLarge, n, maxRecord)
	}
	if n == 0 {
		return 0, errEmptyRecord
	}
	return n, nil
}

// readMessage reads the records that carry the ClientHello. It returns all
// the bytes read, and the handshake message (header included), which is a
// part of buf when one record carries it all and a copy otherwise.
func readMessage(r io.Reader) (buf, msg []byte, err error) {
	// The first header gets its own small buffer: until it is read the
	// size of the first record is unknown. A first Read, rather than
	// io.ReadFull, lets a client that sends a byte or two of something else
	// and waits be told apart at once; it still asks for no more than the
	// header.
	hdr := make([]byte, recordHeaderLen)
	n, rerr := r.Read(hdr)
	if n < 0 || n > len(hdr) {
		return nil, nil, errReaderMisbehaved
	}
	if err := checkFirstHeader(hdr[:n]); err != nil {
		return hdr[:n], nil, err
	}
	if n < len(hdr) {
		if rerr == nil {
			var m int
			m, rerr = io.ReadFull(r, hdr[n:])
			n += m
		}
		if err := checkFirstHeader(hdr[:n]); err != nil {
			return hdr[:n], nil, err
		}
		if rerr != nil {
			return hdr[:n], nil, readErr(rerr, n)
		}
	}
	recLen, err := recordLen(hdr)
	if err != nil {
		return hdr, nil, err
	}
	buf = make([]byte, recordHeaderLen+recLen)
	copy(buf, hdr)

	var (
		hh       [handshakeHeaderLen]byte // the handshake header, gathered
		hhN      int                      // how much of hh is known
		total    = -1                     // the handshake message's length, header included, once known
		have     int                      // handshake bytes read
		records  = 1
		regrowth bool // whether buf was grown since the hello's length is known
	)
	for {
		body := buf[len(buf)-recLen:]
		if m, err := io.ReadFull(r, body); err != nil {
			return buf[:len(buf)-recLen+m], nil, readErr(err, len(buf)-recLen+m)
		}
		if hhN < handshakeHeaderLen {
			hhN += copy(hh[hhN:], body)
			if hh[0] != handshakeClientHello {
				return buf, nil, errNotClientHello
			}
			if hhN == handshakeHeaderLen {
				l := int(hh[1])<<16 | int(hh[2])<<8 | int(hh[3])
				if l > MaxHello {
					return buf, nil, fmt.Errorf("%w: a ClientHello of %d bytes, more than %d", ErrTooLarge, l, MaxHello)
				}
				total = handshakeHeaderLen + l
			}
		}
		have += recLen
		if total >= 0 {
			if have == total {
				break
			}
			if have > total {
				return buf, nil, errPastHello
			}
		}

		// Another record is needed.
		if len(buf)+recordHeaderLen > MaxRead {
			return buf, nil, fmt.Errorf("%w: the ClientHello's records pass %d bytes", ErrTooLarge, MaxRead)
		}
		var want int
		if total >= 0 && !regrowth {
			// Room for the rest in one record: the usual case, exactly.
			want = len(buf) + recordHeaderLen + total - have
			regrowth = true
		}
		buf = grow(buf, recordHeaderLen, want)
		h := buf[len(buf)-recordHeaderLen:]
		if m, err := io.ReadFull(r, h); err != nil {
			return buf[:len(buf)-recordHeaderLen+m], nil, readErr(err, len(buf)-recordHeaderLen+m)
		}
		if h[0] != recordTypeHandshake {
			return buf, nil, errRecordType
		}
		if h[1] != 3 {
			return buf, nil, errRecordVersion
		}
		if recLen, err = recordLen(h); err != nil {
			return buf, nil, err
		}
		if total >= 0 && recLen > total-have {
			return buf, nil, errPastHello
		}
		if len(buf)+recLen > MaxRead {
			return buf, nil, fmt.Errorf("%w: the ClientHello's records pass %d bytes", ErrTooLarge, MaxRead)
		}
		buf = grow(buf, recLen, 0)
		records++
	}

	if records == 1 {
		return buf, buf[recordHeaderLen:], nil
	}
	msg = make([]byte, 0, total)
	for p := 0; p < len(buf); {
		l := int(binary.BigEndian.Uint16(buf[p+3 : p+recordHeaderLen]))
		msg = append(msg, buf[p+recordHeaderLen:p+recordHeaderLen+l]...)
		p += recordHeaderLen + l
	}
	return buf, msg, nil
}

// grow extends buf by n bytes, reallocating to at least want bytes of
// capacity, and otherwise doubling, so that a hello in many small records
// costs a linear amount of copying.
func grow(buf []byte, n, want int) []byte {
	l := len(buf) + n
	if l <= cap(buf) {
		return buf[:l]
	}
	c := max(l, want, min(2*cap(buf), MaxRead))
	nb := make([]byte, l, c)
	copy(nb, buf)
	return nb
}

// cursor reads the fields of a hello from the front of a byte slice.
type cursor []byte

func (c *cursor) bytes(n int) ([]byte, bool) {
	if len(*c) < n {
		return nil, false
	}
	b := (*c)[:n]
	*c = (*c)[n:]
	return b, true
}

func (c *cursor) u8() (int, bool) {
	if len(*c) < 1 {
		return 0, false
	}
	v := (*c)[0]
	*c = (*c)[1:]
	return int(v), true
}

func (c *cursor) u16() (int, bool) {
	if len(*c) < 2 {
		return 0, false
	}
	v := binary.BigEndian.Uint16(*c)
	*c = (*c)[2:]
	return int(v), true
}

// vec8 and vec16 read a vector with a 1- or 2-byte length before it.
func (c *cursor) vec8() (cursor, bool) {
	n, ok := c.u8()
	if !ok {
		return nil, false
	}
	b, ok := c.bytes(n)
	return b, ok
}

func (c *cursor) vec16() (cursor, bool) {
	n, ok := c.u16()
	if !ok {
		return nil, false
	}
	b, ok := c.bytes(n)
	return b, ok
}

// parse parses a ClientHello handshake message, its 4-byte header included
// (already checked by readMessage).
func parse(msg []byte) (Hello, error) {
	s := cursor(msg[handshakeHeaderLen:])

	vers, ok := s.u16()
	if !ok {
		return Hello{}, errShort
	}
	if vers>>8 != 3 {
		return Hello{}, errVersion
	}
	if _, ok := s.bytes(32); !ok { // random
		return Hello{}, errShort
	}
	sid, ok := s.vec8()
	if !ok {
		return Hello{}, errShort
	}
	if len(sid) > maxSessionID {
		return Hello{}, errSessionID
	}
	suites, ok := s.vec16()
	if !ok {
		return Hello{}, errShort
	}
	if len(suites) < 2 || len(suites)%2 != 0 {
		return Hello{}, errCipherSuites
	}
	comp, ok := s.vec8()
	if !ok {
		return Hello{}, errShort
	}
	if len(comp) < 1 {
		return Hello{}, errCompression
	}
	if len(s) == 0 {
		return Hello{}, nil // no extensions
	}
	exts, ok := s.vec16()
	if !ok {
		return Hello{}, errShort
	}
	if len(s) != 0 {
		return Hello{}, errTrailing
	}

	var (
		h       Hello
		sni     cursor
		alpn    cursor
		hasSNI  bool
		hasALPN bool
		seen    seenSet
	)
	for len(exts) > 0 {
		typ, ok := exts.u16()
		if !ok {
			return Hello{}, errExtension
		}
		data, ok := exts.vec16()
		if !ok {
			return Hello{}, errExtension
		}
		if seen.add(uint16(typ)) {
			return Hello{}, errDupExtension
		}
		switch typ {
		case extensionServerName:
			sni, hasSNI = data, true
		case extensionALPN:
			alpn, hasALPN = data, true
		}
	}
	if hasSNI {
		name, err := parseSNI(sni)
		if err != nil {
			return Hello{}, err
		}
		h.ServerName = name
	}
	if hasALPN {
		protos, err := parseALPN(alpn)
		if err != nil {
			return Hello{}, err
		}
		h.ALPN = protos
	}
	return h, nil
}

// seenSet is the set of extension types met so far: a few in an array, as
// real hellos have about twenty, and a bitmap past that, so that a hello
// made of thousands of empty extensions costs linear time.
type seenSet struct {
	small [smallExtensionSetLimit]uint16
	n     int
	bits  *[1 << 16 / 64]uint64
}

// add adds t and reports whether it was already there.
func (s *seenSet) add(t uint16) bool {
	if s.bits == nil {
		if slices.Contains(s.small[:s.n], t) {
			return true
		}
		if s.n < len(s.small) {
			s.small[s.n] = t
			s.n++
			return false
		}
		s.bits = new([1 << 16 / 64]uint64)
		for _, u := range s.small {
			s.bits[u/64] |= 1 << (u % 64)
		}
	}
	w, b := &s.bits[t/64], uint64(1)<<(t%64)
	if *w&b != 0 {
		return true
	}
	*w |= b
	return false
}

// parseSNI parses the server_name extension's data (RFC 6066, section 3)
// and returns its host_name, checked and lowercased.
func parseSNI(data cursor) (string, error) {
	list, ok := data.vec16()
	if !ok || len(data) != 0 || len(list) == 0 {
		return "", errSNI
	}
	var host []byte
	var found bool
	for len(list) > 0 {
		typ, ok := list.u8()
		if !ok {
			return "", errSNI
		}
		name, ok := list.vec16()
		if !ok {
			return "", errSNI
		}
		if typ != sniHostName {
			continue
		}
		if found {
			return "", errSNIDup
		}
		host, found = name, true
	}
	if !found {
		return "", nil
	}
	return hostName(host)
}

// hostName checks a host_name and returns it lowercased, without one
// trailing dot.
func hostName(b []byte) (string, error) {
	if len(b) > 0 && b[len(b)-1] == '.' {
		b = b[:len(b)-1]
	}
	if len(b) == 0 {
		return "", errSNIEmpty
	}
	if len(b) > maxHostName {
		return "", errSNIHost
	}
	upper := false
	label := 0
	for _, c := range b {
		switch {
		case c == '.':
			if label == 0 {
				return "", errSNIHost
			}
			label = 0
			continue
		case 'A' <= c && c <= 'Z':
			upper = true
		case 'a' <= c && c <= 'z', '0' <= c && c <= '9', c == '-', c == '_':
		default:
			return "", errSNIHost
		}
		label++
		if label > maxLabel {
			return "", errSNIHost
		}
	}
	if label == 0 {
		return "", errSNIHost
	}
	if !upper {
		return string(b), nil
	}
	var sb strings.Builder
	sb.Grow(len(b))
	for _, c := range b {
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		sb.WriteByte(c)
	}
	return sb.String(), nil
}

// parseALPN parses the ALPN extension's data (RFC 7301, section 3.1). The
// protocol names share one string, so the list costs two allocations.
func parseALPN(data cursor) ([]string, error) {
	list, ok := data.vec16()
	if !ok || len(data) != 0 || len(list) == 0 {
		return nil, errALPN
	}
	count := 0
	for l := list; len(l) > 0; count++ {
		p, ok := l.vec8()
		if !ok {
			return nil, errALPN
		}
		if len(p) == 0 {
			return nil, errALPNEmptyProto
		}
	}
	all := string(list)
	protos := make([]string, 0, count)
	for i := 0; i < len(all); {
		n := int(all[i])
		protos = append(protos, all[i+1:i+1+n])
		i += 1 + n
	}
	return protos, nil
}
