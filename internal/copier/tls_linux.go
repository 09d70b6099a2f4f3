package copier

import (
	"errors"
	"io"
	"net"
	"os"
	"syscall"
)

// canPoll: Records can read its socket without waiting, and a direction
// can park on it.
const canPoll = true

// readNow is Records.Read at a record boundary in a Link: one read(2) that
// does not wait; errNothingYet if the socket has nothing to read.
func readNow(r *Records, p []byte) (int, error) {
	var n int
	var errno error
	err := r.raw.Read(func(fd uintptr) bool {
		for {
			n, errno = syscall.Read(int(fd), p)
			if errno != syscall.EINTR {
				return true
			}
		}
	})
	switch {
	case err != nil: // closed, or past the read deadline
		return 0, err
	case errno == syscall.EAGAIN:
		return 0, errNothingYet
	case errno != nil:
		return 0, &net.OpError{Op: "read", Net: "tcp", Source: r.LocalAddr(), Addr: r.RemoteAddr(), Err: os.NewSyscallError("read", errno)}
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

// maxPlaintext is the most plaintext a TLS record carries (RFC 8446, 5.1).
const maxPlaintext = 1 << 14

// loopTLS is loop for a direction whose source is a TLS conn over Records
// (src, s.rec): it reads a record's plaintext at a time into a buffer
// held only for that record, and writes it to dst. Since the buffer
// holds any record whole, a Read leaves the TLS conn holding nothing, at a
// record boundary; a Read there that finds the socket with nothing to read
// ends with errNothingYet, and the direction waits for the socket to be
// readable (or parks) as a plain one does, with no buffer.
//
// Post-handshake messages (a TLS 1.3 session ticket, a key update) are
// read by the TLS conn inside its Read, which goes on to the next record:
// one that has not come yet ends that Read with errNothingYet too, so a
// session ticket wakes the direction and it parks again. A close_notify
// ends the Read with io.EOF.
func (s *splicer) loopTLS(dst, src net.Conn) (again bool, err error) {
	defer func() {
		s.release()
		if !again { // ended: a read of the TLS conn past here waits again
			s.rec.nonblock.Store(false)
		}
	}()
	mark := s.startWindow(src)
	for {
		if s.atEnd() {
			return false, nil // as at EOF
		}
		s.buf = bufs.Get().(*buffer)
		n, err := src.Read(s.buf.b[:])
		// More records while they have come and the buffer has room for
		// any record's plaintext (less would leave some in the TLS conn):
		// one write to dst for several records.
		for k := n; err == nil && k > 0 && len(s.buf.b)-n >= maxPlaintext; n += k {
			k, err = src.Read(s.buf.b[n:])
		}
		if n > 0 {
			if err := s.wait(int64(n)); err != nil {
				return false, err
			}
			if err := s.writeOut(dst, s.buf.b[:n]); err != nil {
				return false, err
			}
		}
		s.release()
		switch {
		case err == nil:
			continue
		case err == io.EOF:
			return false, nil
		case errors.Is(err, errNothingYet):
			if s.atEnd() {
				return false, nil // as at EOF
			}
			if s.canPark && s.quiet == 0 {
				return s.parked(), nil
			}
			s.mode = readable
			err = s.src.Read(s.do) // no buffer while waiting
			if err == nil && s.err != 0 {
				// The peek took the socket's error (a reset): it is
				// this direction's, not a clean EOF for the next read.
				err, s.err = os.NewSyscallError("recvfrom", s.err), 0
			}
		}
		if err == nil || s.endWoke(src, err) {
			continue
		}
		// The quiet window may end in the wait for readability or inside a
		// record (then the TLS conn keeps what it has of it, and the
		// socket has the rest to come).
		if s.quiet == 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
			return false, err
		}
		if !s.nextWindow(src, &mark) {
			return s.parked(), nil
		}
	}
}

// doReadable reports whether the socket fd has something to read (bytes,
// EOF, an error), without reading it; RawConn.Read waits until it has. An
// error (a reset) is consumed by the peek: it is kept in s.err.
func (s *splicer) doReadable(fd uintptr) bool {
	var b [1]byte
	for {
		_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		switch err {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		case nil:
		default:
			s.err = errno(err)
		}
		return true
	}
}

// writeOut writes b to a dst that is not a socket, keeping the
// direction's progress.
func (s *splicer) writeOut(dst net.Conn, b []byte) (err error) {
	if s.wrec != nil {
		s.wrec.cork()
		defer func() {
			if uerr := s.wrec.uncork(); err == nil {
				err = uerr
			}
		}()
	}
	for len(b) > 0 {
		if s.d != nil {
			s.d.wait()
		}
		n, err := dst.Write(b)
		b = b[n:]
		s.written += int64(n)
		if s.d != nil {
			s.d.delivered(s.written)
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return io.ErrNoProgress
		}
	}
	return nil
}
