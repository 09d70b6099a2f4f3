package copier

import (
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
)

// recordHeaderLen is the length of a TLS record's header: type (1),
// version (2), length of the body (2).
const recordHeaderLen = 5

// Records is the socket under a TLS conn: give it to tls.Client or
// tls.Server in place of the socket, and a Link can park a direction that
// reads that TLS conn as it parks one that reads a plain socket.
//
// crypto/tls reads its socket through a bytes.Buffer that takes whatever
// the socket has, so after a Read the TLS conn may hold a whole record
// while the socket has nothing left to read: waiting for the socket to be
// readable would then wait for bytes that have already come. Records
// never returns bytes past the end of the current record: each Read
// returns at most the rest of the current record (a header and what has
// come of its body, in one Read when p holds them: crypto/tls's buffer
// then never grows past 576 bytes for a small record, where a header and
// a body read apart grew it to 1,152, kept for the connection's life).
// So once tls.Conn.Read has returned the plaintext of a record into a
// buffer large enough for any record, the TLS conn holds nothing it has
// not returned, and the socket is at a record boundary: the next byte to
// come is the socket's, and its readability is the TLS conn's.
//
// In a Link, Records also never waits at a record boundary: a read there
// that finds nothing to read ends at once with an error that the Link
// takes as "park" (crypto/tls leaves no state behind for an error that
// says it is temporary). Inside a record it waits, as a socket does.
type Records struct {
	net.Conn
	raw      syscall.RawConn // the socket's, if it has one (and Links may park here)
	hdr      [recordHeaderLen]byte
	hn       int         // bytes of the current record's header read so far
	left     int         // bytes of the current record's body not yet read
	nonblock atomic.Bool // set by the Link that reads the TLS conn
	ahead    *ahead      // read past what crypto/tls asked for (only in a Link)

	// While a Link writes a chunk to the TLS conn, the records it makes
	// gather in w and go to the socket in one write (see cork).
	wmu sync.Mutex
	w   *[]byte // nil: writes go straight to the socket
}

// gathered keeps the buffers of corked writes between chunks: an idle
// connection holds none.
var gathered = sync.Pool{New: func() any { b := make([]byte, 0, 2*Chunk); return &b }}

// Write writes p to the socket, or, corked, gathers it for uncork.
func (r *Records) Write(p []byte) (int, error) {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	if r.w != nil {
		*r.w = append(*r.w, p...)
		return len(p), nil
	}
	return r.Conn.Write(p)
}

// cork makes the records the TLS conn writes from now on gather, until
// uncork writes them to the socket at once: crypto/tls writes each record
// (16 KiB at most) with a write(2) of its own.
func (r *Records) cork() {
	r.wmu.Lock()
	r.w = gathered.Get().(*[]byte)
	r.wmu.Unlock()
}

// uncork writes what was gathered since cork, in one write. It holds the
// lock meanwhile: a record written by another goroutine (an alert) waits,
// and goes out after these, in the order the TLS conn numbered them.
func (r *Records) uncork() error {
	r.wmu.Lock()
	defer r.wmu.Unlock()
	w := r.w
	r.w = nil
	_, err := r.Conn.Write(*w)
	*w = (*w)[:0]
	gathered.Put(w)
	return err
}

// NewRecords wraps the socket c, to go under a TLS conn. If c is a
// syscall.Conn, its descriptor must carry c's bytes as they are (nothing
// buffered in c), as for splice.
func NewRecords(c net.Conn) *Records {
	r := &Records{Conn: c}
	if sc, ok := c.(syscall.Conn); ok && canPoll {
		if raw, err := sc.SyscallConn(); err == nil {
			r.raw = raw
		}
	}
	return r
}

// NetConn is the socket.
func (r *Records) NetConn() net.Conn { return r.Conn }

// Read reads at most up to the end of the current record. At a record
// boundary, in a Link, it does not wait; once a header has come, it waits
// for some of the body, as the TLS conn's next Read would.
func (r *Records) Read(p []byte) (int, error) {
	inHeader := r.hn < recordHeaderLen
	n, err := r.step(p)
	if err != nil || !inHeader || r.hn != recordHeaderLen || n == len(p) {
		return n, err
	}
	// The header is whole, and its body not empty: read some of the body
	// too. An error there comes again at the next Read (a socket's errors
	// stay), after the header's bytes have been taken.
	m, _ := r.step(p[n:])
	return n + m, nil
}

// step reads at most up to the end of the current record's header or
// body.
func (r *Records) step(p []byte) (int, error) {
	want := recordHeaderLen - r.hn
	if r.hn == recordHeaderLen {
		want = r.left
	}
	p = p[:min(len(p), want)]
	if len(p) == 0 {
		return 0, nil
	}
	var n int
	var err error
	switch {
	case r.ahead != nil:
		n = copy(p, r.ahead.b[r.ahead.lo:r.ahead.hi])
		if r.ahead.lo += n; r.ahead.lo == r.ahead.hi {
			aheads.Put(r.ahead)
			r.ahead = nil
		}
	case r.raw != nil && r.nonblock.Load():
		// In a Link: read ahead, as much as has come, so that a burst
		// takes a read(2) for several records rather than two for each.
		a := aheads.Get().(*ahead)
		a.lo, a.hi = 0, 0
		if a.hi, err = readNow(r, a.b[:]); a.hi > 0 {
			r.ahead = a
			return r.step(p)
		}
		aheads.Put(a)
		if errors.Is(err, errNothingYet) && r.hn != 0 {
			// Inside a record: wait for the rest, as a socket does.
			n, err = r.Conn.Read(p)
		}
	default:
		n, err = r.Conn.Read(p)
	}
	r.advance(p[:n])
	return n, err
}

// ahead holds what Records read of its socket past what crypto/tls has
// asked for. It is borrowed while it holds any: an idle connection, at a
// record boundary, holds none, and its socket's readability is its own.
type ahead struct {
	b      [64 << 10]byte
	lo, hi int
}

var aheads = sync.Pool{New: func() any { return new(ahead) }}

// advance moves the record position past b, which was just read.
func (r *Records) advance(b []byte) {
	if r.hn < recordHeaderLen {
		r.hn += copy(r.hdr[r.hn:], b)
		if r.hn < recordHeaderLen {
			return
		}
		r.left = int(r.hdr[3])<<8 | int(r.hdr[4])
	} else {
		r.left -= len(b)
	}
	if r.left == 0 {
		r.hn = 0 // the record is whole: a boundary
	}
}

// errNothingYet is Records.Read's answer, in a Link, at a record boundary
// when the socket has nothing to read. It is temporary (net.Error), so
// crypto/tls returns it from Read and keeps the conn usable.
var errNothingYet error = nothingYet{}

type nothingYet struct{}

func (nothingYet) Error() string   { return "copier: nothing to read yet at a TLS record boundary" }
func (nothingYet) Timeout() bool   { return false }
func (nothingYet) Temporary() bool { return true }

// tlsRecords is implemented by a conn that reads a TLS conn over Records
// with nothing buffered on the way (*transport.Conn, *tunnel.Conn): it
// returns the Records, or nil if it is not such a conn now. It must be nil
// until the TLS handshake is done: a Link's reads never wait at a record
// boundary, and the handshake's must.
type tlsRecords interface {
	TLSRecords() *Records
}

// recordsOf is the Records under a TLS conn src that a direction may park
// on, or nil.
func recordsOf(src net.Conn) *Records {
	t, ok := src.(tlsRecords)
	if !ok {
		return nil
	}
	if r := t.TLSRecords(); r != nil && r.raw != nil {
		return r
	}
	return nil
}
