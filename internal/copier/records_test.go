package copier

import (
	"bytes"
	"io"
	"math/rand/v2"
	"net"
	"testing"
)

// recordStream is n TLS-shaped records (type, version, length, body) of
// random lengths, an empty one and, if big, the largest crypto/tls takes
// among them, concatenated; ends are the offsets where each record ends.
func recordStream(n int, seed uint64, big bool) (stream []byte, ends []int) {
	rng := rand.New(rand.NewPCG(seed, 1))
	for i := range n {
		size := rng.IntN(300)
		switch i {
		case 1:
			size = 0
		case 2:
			if big {
				size = 16384 + 256 // maxCiphertextTLS13
			}
		}
		stream = append(stream, 23, 3, 3, byte(size>>8), byte(size))
		body := make([]byte, size)
		for j := range body {
			body[j] = byte(rng.Uint32())
		}
		stream = append(stream, body...)
		ends = append(ends, len(stream))
	}
	return stream, ends
}

// chunked is a socket that has the stream in chunks (cut at the given
// offsets) and checks that no Read asks for bytes past the end of the
// record it is in.
type chunked struct {
	net.Conn
	t      *testing.T
	stream []byte
	cuts   []int // ascending offsets where a chunk ends
	ends   []int
	pos    int
}

func (c *chunked) Read(p []byte) (int, error) {
	if c.pos == len(c.stream) {
		return 0, io.EOF
	}
	// The end of the record being read, or of its header.
	start, bound := 0, len(c.stream)
	for _, e := range c.ends {
		if e > c.pos {
			bound = e
			break
		}
		start = e
	}
	if c.pos < start+recordHeaderLen {
		bound = start + recordHeaderLen
	}
	if c.pos+len(p) > bound {
		c.t.Fatalf("Read of %d bytes at offset %d: past the end of the record's header or body at %d", len(p), c.pos, bound)
	}
	end := len(c.stream)
	for _, cut := range c.cuts {
		if cut > c.pos {
			end = cut
			break
		}
	}
	n := copy(p, c.stream[c.pos:end])
	c.pos += n
	return n, nil
}

// TestRecordsReadsOneRecordAtATime: Records never asks its socket for a
// byte past the end of the current record's header or body, whatever the
// size of the reads asked of it and however the socket has the bytes:
// all at once, or cut at every offset.
func TestRecordsReadsOneRecordAtATime(t *testing.T) {
	sizes := []int{1, 3, 5, 7, 4096, 1 << 20}
	var stream []byte
	var ends []int
	check := func(cuts []int) {
		t.Helper()
		for _, size := range sizes {
			sock := &chunked{t: t, stream: stream, cuts: cuts, ends: ends}
			r := NewRecords(sock)
			var got []byte
			buf := make([]byte, size)
			for {
				// At each record boundary, the socket has been read to
				// exactly that boundary.
				if r.hn == 0 {
					at := false
					for _, e := range append([]int{0}, ends...) {
						at = at || e == sock.pos
					}
					if !at {
						t.Fatalf("Records at a boundary with the socket read to %d, not a record's end", sock.pos)
					}
				}
				n, err := r.Read(buf)
				got = append(got, buf[:n]...)
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatal(err)
				}
			}
			if !bytes.Equal(got, stream) {
				t.Fatalf("reads of %d with cuts %v: got %d bytes, not the stream of %d", size, cuts, len(got), len(stream))
			}
			if r.hn != 0 {
				t.Fatalf("after the whole stream, Records is %d bytes into a header", r.hn)
			}
		}
	}
	stream, ends = recordStream(8, 1, true)
	check(nil) // the socket has every record at once
	for _, e := range ends {
		check([]int{e - 1, e, e + 1, e + 4, e + 5}) // around each boundary
	}
	stream, ends = recordStream(8, 2, false)
	for cut := 1; cut < len(stream); cut++ {
		check([]int{cut}) // split at every offset
	}
}

// TestRecordsReadsAWholeRecordAtOnce: a Read with room for a record's
// header and body returns both, as crypto/tls asks (it reads into a buffer
// with 512 bytes free, and grows that buffer for good if a record takes
// two Reads): a header read apart from its body would leave crypto/tls
// holding twice the memory for each TLS conn.
func TestRecordsReadsAWholeRecordAtOnce(t *testing.T) {
	stream, ends := recordStream(20, 3, true)
	sock := &chunked{t: t, stream: stream, ends: ends}
	r := NewRecords(sock)
	buf := make([]byte, 576)
	start := 0
	for _, end := range ends {
		for want := min(end-start, len(buf)); start < end; want = min(end-start, len(buf)) {
			n, err := r.Read(buf)
			if err != nil {
				t.Fatal(err)
			}
			if n != want {
				t.Fatalf("Read at offset %d returned %d bytes; want %d (the record ends at %d)", start, n, want, end)
			}
			start += n
		}
	}
	// A socket that ends after a header: the header, then its error.
	stream = []byte{23, 3, 3, 0, 100}
	r = NewRecords(&chunked{t: t, stream: stream, ends: []int{105}})
	if n, err := r.Read(buf); n != recordHeaderLen || err != nil {
		t.Fatalf("Read of a header and no body: %d, %v; want %d, nil", n, err, recordHeaderLen)
	}
	if n, err := r.Read(buf); n != 0 || err != io.EOF {
		t.Fatalf("Read after it: %d, %v; want 0, EOF", n, err)
	}
}
