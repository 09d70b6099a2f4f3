package tunnel

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"tcprelay/internal/copier"
	"tcprelay/internal/proto"
)

// With feature reuse, a pre-opened data connection serves one client after
// another. The relay ends the client's stream with End{seq, bytes} on the
// control connection instead of a FIN; once the agent has that, it ends
// its own stream the same way (End after the relay's), and the relay parks
// the connection again, ready for the next Bind. An agent that ends its
// side first, or cannot tell where the client's stream ended, sends a FIN
// as without reuse, and the connection is not used again.
//
// A Conn on such a connection counts the bytes its application reads and
// writes, stops reading at the relay's count (io.EOF), and on Close hands
// the connection back to the pool instead of closing it. A copier.Link that
// reads and writes it instead (./expose) counts them itself (Counted).

// dataConn is one pre-opened data connection, for its whole life: parked,
// then serving a client, then parked again. The relay's End may come before
// the agent has read Bind, so it is kept here, by the connection's PoolJoin
// number, not in the Conn that Bind makes.
type dataConn struct {
	p    *pool
	seq  uint64
	conn net.Conn

	mu  sync.Mutex
	cur *Conn // the Conn serving the current client; nil while parked
	// The current client's stream, started afresh each time the agent
	// ends its side with End.
	end       int64       // the relay's End (+1): where the client's stream ends; 0: not known yet
	read      int64       // bytes read by the application
	written   int64       // bytes written to the client
	watch     func(int64) // a copier's, when one reads the conn
	readEnded bool        // a copier read the client's stream to its end
	finSent   bool        // this side ended with a FIN: the connection is not used again
	woken     bool        // the read deadline was moved to wake a Read at the end
	deadline  time.Time   // the application's read deadline

	rmu, wmu sync.Mutex // held by a Read or a Write of the application
}

// relayEnd is the relay's End for d's current client.
func (d *dataConn) relayEnd(n int64) {
	d.mu.Lock()
	if d.end != 0 {
		d.mu.Unlock()
		return // one End per client
	}
	d.end = n + 1
	watch := d.watch
	if watch == nil && d.cur != nil && d.read >= n {
		d.woken = true // a Read waiting for more ends now
		d.conn.SetReadDeadline(time.Now())
	}
	d.mu.Unlock()
	if watch != nil {
		watch(n)
	}
}

// readDoneLocked reports whether the current client's stream has been read
// to its end, by the application or a copier. d.mu must be held.
func (d *dataConn) readDoneLocked() bool {
	if d.watch != nil {
		return d.readEnded
	}
	return d.end != 0 && d.read >= d.end-1
}

// readFor is Conn.Read on a data connection that may be used again.
func (d *dataConn) readFor(c *Conn, b []byte) (int, error) {
	d.rmu.Lock()
	defer d.rmu.Unlock()
	for {
		d.mu.Lock()
		if d.cur != c {
			d.mu.Unlock()
			return 0, c.gone()
		}
		if d.watch != nil {
			ended := d.readEnded
			d.mu.Unlock()
			if ended {
				return 0, io.EOF // a copier read it to its end
			}
			return d.conn.Read(b)
		}
		if d.end != 0 {
			left := d.end - 1 - d.read
			if left <= 0 {
				d.mu.Unlock()
				return 0, io.EOF
			}
			b = b[:min(int64(len(b)), left)]
		}
		d.mu.Unlock()
		n, err := d.conn.Read(b)
		d.mu.Lock()
		d.read += int64(n)
		woke := d.woken && errors.Is(err, os.ErrDeadlineExceeded)
		if woke {
			d.woken = false
			d.conn.SetReadDeadline(d.deadline)
		}
		d.mu.Unlock()
		if n > 0 || !woke {
			return n, err
		}
	}
}

// writeFor is Conn.Write on a data connection that may be used again.
func (d *dataConn) writeFor(c *Conn, b []byte) (int, error) {
	d.wmu.Lock()
	defer d.wmu.Unlock()
	if !d.mayWrite(c) {
		return 0, net.ErrClosed
	}
	n, err := d.conn.Write(b)
	d.addWritten(int64(n))
	return n, err
}

// mayWrite reports whether c may still write to its client: it is the
// current one, and this side has not ended with a FIN. d.wmu is held.
func (d *dataConn) mayWrite(c *Conn) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.cur == c && !d.finSent
}

// addWritten counts n bytes written to the current client.
func (d *dataConn) addWritten(n int64) {
	d.mu.Lock()
	d.written += n
	d.mu.Unlock()
}

// readFromFor is c's ReadFrom: through the socket's own (sendfile or
// splice) where it has one, counted when it returns, like a Write.
func (d *dataConn) readFromFor(c *Conn, r io.Reader) (int64, error) {
	rf, ok := d.conn.(io.ReaderFrom)
	if !ok {
		return io.Copy(struct{ io.Writer }{c}, r)
	}
	d.wmu.Lock()
	defer d.wmu.Unlock()
	if !d.mayWrite(c) {
		return 0, net.ErrClosed
	}
	n, err := rf.ReadFrom(r)
	d.addWritten(n)
	return n, err
}

// writeToFor is c's WriteTo: from a plain socket into a conn, with the
// copier, which splices between sockets and ends at the client's count
// (the relay's End); over TLS, into anything else, or after the
// application has read part of the stream, through Read.
func (d *dataConn) writeToFor(c *Conn, w io.Writer) (int64, error) {
	_, plain := d.conn.(rawStream)
	if dst, ok := w.(net.Conn); ok && plain {
		if n, done, err := d.copyTo(c, dst); done {
			return n, err
		}
	}
	return io.Copy(w, struct{ io.Reader }{c})
}

// copyTo copies c's client's stream to dst with the copier, if nothing of
// it has been read yet (done).
func (d *dataConn) copyTo(c *Conn, dst net.Conn) (n int64, done bool, err error) {
	d.rmu.Lock() // as a Read: a Close meanwhile is a real close
	defer d.rmu.Unlock()
	d.mu.Lock()
	fresh := d.cur == c && d.read == 0 && d.watch == nil
	d.mu.Unlock()
	if !fresh {
		return 0, false, nil
	}
	n, err = copier.Copy(dst, c)
	return n, true, err
}

// endWrite ends this side of c's stream. If the client's stream has been
// read to its end, with End: c is then done, and the connection waits for
// the next client. Otherwise with a FIN, as without reuse, and the
// connection is not used again.
func (d *dataConn) endWrite(c *Conn) error {
	d.mu.Lock()
	if d.cur != c || d.finSent {
		d.mu.Unlock()
		return net.ErrClosed
	}
	if !d.readDoneLocked() {
		d.finSent = true
		d.mu.Unlock()
		return closeWrite(d.conn)
	}
	return d.finishLocked(c, 0)
}

// closeFor is Conn.Close: when the client's stream has ended (the relay's
// End came) and this side has not sent a FIN, it ends this side with End
// and the connection waits for the next client, after reading what the
// application left unread. Otherwise, or while the application still
// reads or writes (Close must unblock those), it closes the connection.
func (d *dataConn) closeFor(c *Conn) error {
	d.mu.Lock()
	if d.cur != c {
		d.mu.Unlock()
		if c.ended.Load() {
			return nil // done with End already
		}
		return net.ErrClosed
	}
	if d.end != 0 && !d.finSent && (d.watch == nil || d.readEnded) && d.rmu.TryLock() {
		if d.wmu.TryLock() {
			d.wmu.Unlock()
			d.rmu.Unlock()
			return d.finishLocked(c, max(d.end-1-d.read, 0))
		}
		d.rmu.Unlock()
	}
	d.cur = nil
	d.mu.Unlock()
	d.p.forget(d)
	return d.conn.Close()
}

// finishLocked ends c with End, and parks the connection again once it has
// read the unread rest of c's client's stream. The relay may bind the
// next client as soon as it has the End, and tell its end at once: d is
// started afresh before the End is sent, and c no longer reaches it.
// d.mu is held, and unlocked on return.
func (d *dataConn) finishLocked(c *Conn, unread int64) error {
	written := d.written
	d.cur = nil
	c.ended.Store(true)
	d.end, d.read, d.written, d.watch, d.readEnded, d.finSent, d.woken = 0, 0, 0, nil, false, false, false
	d.deadline = time.Time{}
	d.mu.Unlock()
	if err := d.p.c.conn.Send(&proto.End{Seq: d.seq, Bytes: uint64(written)}); err != nil {
		d.p.forget(d)
		d.conn.Close()
		return err
	}
	// Parked from now on: the pool closes it with the others if the
	// session ends, and waits for this goroutine.
	p := d.p
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		p.forget(d)
		return d.conn.Close()
	}
	p.open[d.conn] = struct{}{}
	p.again.Add(1)
	p.mu.Unlock()
	go func() {
		defer p.again.Done()
		d.conn.SetDeadline(time.Time{})
		if unread > 0 {
			if _, err := io.CopyN(io.Discard, d.conn, unread); err != nil {
				p.mu.Lock()
				delete(p.open, d.conn)
				p.mu.Unlock()
				p.forget(d)
				d.conn.Close()
				return
			}
		}
		p.wait(d.conn, d, true)
	}()
	return nil
}

// setReadDeadline keeps the application's read deadline, which a wake for
// the end of the stream moves for a moment.
func (d *dataConn) setReadDeadline(c *Conn, t time.Time) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cur != c {
		return c.gone()
	}
	d.deadline = t
	if d.woken {
		return nil // the woken Read sets it
	}
	return d.conn.SetReadDeadline(t)
}

// setWriteDeadline is the application's, while the connection serves c.
func (d *dataConn) setWriteDeadline(c *Conn, t time.Time) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cur != c {
		return c.gone()
	}
	return d.conn.SetWriteDeadline(t)
}

// gone is what c's reads and settings return once c no longer has the
// connection: EOF after its streams ended with End, else closed.
func (c *Conn) gone() error {
	if c.ended.Load() {
		return io.EOF
	}
	return net.ErrClosed
}

// closeWrite half-closes conn, or closes it if it cannot.
func closeWrite(conn net.Conn) error {
	if cw, ok := conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return conn.Close()
}

// Conn's copier.Counted methods: a Link that reads and writes the conn
// itself ends its streams at the relay's counts.
var _ copier.Counted = (*Conn)(nil)

// WatchEnd has end called with where the client's stream ends, when the
// relay says. Over a connection that is not used again, never.
func (c *Conn) WatchEnd(end func(int64)) {
	d := c.d
	if d == nil {
		return
	}
	d.mu.Lock()
	if d.cur != c {
		d.mu.Unlock()
		return
	}
	d.watch = end
	n := d.end
	d.mu.Unlock()
	if n != 0 {
		end(n - 1)
	}
}

// ReadEnded: the Link read the client's stream to its end.
func (c *Conn) ReadEnded() {
	if d := c.d; d != nil {
		d.mu.Lock()
		if d.cur == c {
			d.readEnded = true
		}
		d.mu.Unlock()
	}
}

// Wrote counts n bytes a copier wrote to the client through the socket.
func (c *Conn) Wrote(n int64) {
	if d := c.d; d != nil {
		d.mu.Lock()
		if d.cur == c {
			d.written += n
		}
		d.mu.Unlock()
	}
}
