package copier

import (
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Linux splice(2) flags and fcntl(2) commands the syscall package lacks.
const (
	spliceMove     = 0x1
	spliceNonblock = 0x2
	fSetPipeSize   = 1031
	fGetPipeSize   = 1032
)

// When a direction's source has nothing to read, it either parks at once
// (its goroutine returns and the poller wakes a new one when bytes come) or
// waits in the runtime's poller, goroutine and all, for a quiet window
// before it parks. Parking at once on every wait would cost a busy
// request-response connection an epoll_ctl and a new goroutine per
// message; waiting long on every connection would keep a goroutine per
// idle connection. So:
//
//   - a new link waits firstQuiet: its first reply is usually on its way;
//   - a direction woken less than hotFor after it parked is busy: it waits
//     hotFor;
//   - any other wake parks as soon as the source is drained;
//   - a window that saw bytes is followed by one twice as long, up to
//     hotFor, so a busy connection pays one timer per hotFor, not one per
//     message.
var (
	firstQuiet = 10 * time.Millisecond
	hotFor     = 100 * time.Millisecond
)

// pipeSize is the capacity asked for each pipe: the most one splice moves,
// and the most a stalled direction pins in the kernel besides its socket
// buffers. In BenchmarkCopy and BenchmarkJoin, 256 KiB moved as many bytes
// per second as 1 MiB (within 1%, under a noise of some 10%); 128 KiB moved
// some 7% fewer for 13% more CPU per byte, and 64 KiB, the kernel's
// default, 12-24% fewer. Through the relay and ./expose, a single iperf3
// stream lost some 5% with 256 KiB against 1 MiB; 512 KiB (with
// notSentLowat at 256 KiB) matched the build with 1 MiB pipes.
const pipeSize = 512 << 10

// splicer copies one direction between two sockets through a kernel pipe,
// held only while bytes are in flight: whenever src has nothing to read,
// the pipe goes back to the pool, so an idle direction costs nothing but
// its socket. The RawConn callback is a method bound once, so moving a
// chunk allocates nothing.
//
// A burst that cannot have a pipe (the process is at its fd limit, or out
// of pipe memory) goes through a small buffer instead, with read(2) and
// write(2): a pipe is the relay's resource, not the connection's, so
// running short of pipes must slow a link down, never end it. The buffer
// too is held only for the burst, and the next burst tries for a pipe
// again.
//
// Every idle Link holds two splicers (see TestLinkSize): the conns are
// not kept here but given to loop, and what a Link's direction has (its
// progress, its rate limit) is reached through d.
type splicer struct {
	// dst and src are the sockets' RawConns; nil dst: dst is not a socket
	// (TLS), and bursts go through buf and are written to the dst conn.
	// When src is a TLS conn over Records (rec), src is the socket under
	// it, and loopTLS reads the TLS conn.
	dst, src syscall.RawConn
	rec      *Records
	// wrec is the Records under dst when dst is a TLS conn over one: each
	// chunk's records go to the socket in one write.
	wrec *Records
	// do is the RawConn callback, a method value bound once so that moving
	// a chunk allocates nothing: doFill, doDrain or doReadable, as mode
	// says.
	do func(uintptr) bool
	// d, for a Link's direction, is that direction: its progress, kept
	// live, and its rate limit, if any: every burst then goes through buf,
	// and each chunk read waits for its tokens before it is written. nil
	// for Copy.
	d        *dir
	quiet    time.Duration // the current quiet window (0: park when drained)
	parkedAt int64         // monotonic ns when loop last returned again
	written  int64         // bytes moved to dst so far

	// A burst's bytes in flight are in p, or, when no pipe could be had,
	// in buf.
	p       *pipe
	buf     *buffer
	pending int32         // bytes in p or buf not yet moved to dst (at most a pipe's)
	n       int32         // result of the last splice, read or write
	err     syscall.Errno // error of the last splice, read, write or peek (0: none)

	srcFD int32 // src's descriptor, for the poller
	mode  uint8 // what do runs: fill, drain or readable
	// canPark makes loop return when src has nothing to read (see
	// firstQuiet) instead of waiting in the runtime's poller.
	canPark bool
	// registered: srcFD is in the poller's set (under the Link's mu).
	registered bool
}

// The splicer's callbacks, for its mode.
const (
	fill     = iota // doFill
	drain           // doDrain
	readable        // doReadable
)

// init sets s up to copy src to dst, and reports whether s can (ok): src
// is a socket (srcRaw), or a TLS conn over Records (then loopTLS reads
// it). dst is spliced to if it is a socket too (dstRaw), else written to
// through a buffer. d is a Link's direction (nil for Copy): a Link's
// directions may park.
func (s *splicer) init(src, dst net.Conn, dstRaw, srcRaw syscall.RawConn, d *dir) bool {
	*s = splicer{d: d, canPark: d != nil, srcFD: -1}
	if dstRaw == nil {
		s.wrec = recordsOf(dst)
	}
	if rec := recordsOf(src); rec != nil {
		s.rec, s.src = rec, rec.raw
		rec.nonblock.Store(true) // s reads it from now on
	} else if s.src, s.dst = srcRaw, dstRaw; s.src == nil {
		s.dst = nil
		return false
	}
	s.src.Control(func(fd uintptr) { s.srcFD = int32(fd) })
	s.do = s.call
	if s.canPark {
		s.quiet = firstQuiet
	}
	return true
}

// ok reports whether init set s up.
func (s *splicer) ok() bool { return s.src != nil }

// call is the RawConn callback: doFill, doDrain or doReadable, as s.mode
// says.
func (s *splicer) call(fd uintptr) bool {
	switch s.mode {
	case drain:
		return s.doDrain(fd)
	case readable:
		return s.doReadable(fd)
	}
	return s.doFill(fd)
}

// rawConn is c's socket, if c is one whose descriptor carries its bytes
// as they are; else nil.
func rawConn(c net.Conn) syscall.RawConn {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return raw
}

// spliced reports whether s moves its bytes with splice(2): both conns
// are sockets, and there is no rate limit.
func (s *splicer) spliced() bool { return s.dst != nil && s.bucket() == nil }

// bucket is the rate limit of s's direction; nil: none.
func (s *splicer) bucket() *Bucket {
	if s.d == nil {
		return nil
	}
	return s.d.lim
}

// wait takes n bytes' tokens from s's direction's rate limit, if it has
// one.
func (s *splicer) wait(n int64) error {
	if lim := s.bucket(); lim != nil {
		return lim.wait(n, s.d.l.stop)
	}
	return nil
}

// sock is the socket whose read deadline times the quiet window: src, or
// the socket under it if it is TLS.
func (s *splicer) sock(src net.Conn) net.Conn {
	if s.rec != nil {
		return s.rec.Conn
	}
	return src
}

// loop moves bytes until EOF on src (nil), an error, or, if canPark, src
// has nothing to read (again is true; see firstQuiet).
func (s *splicer) loop(dst, src net.Conn) (again bool, err error) {
	if s.rec != nil {
		return s.loopTLS(dst, src)
	}
	defer s.release() // EOF or an error
	mark := s.startWindow(src)
	for {
		if s.atEnd() {
			return false, nil // as at EOF
		}
		// Fill the pipe from src; doFill gives the pipe back while src has
		// nothing to read.
		s.mode = fill
		if err := s.src.Read(s.do); err != nil {
			if s.endWoke(src, err) {
				continue
			}
			if s.quiet == 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
				return false, err
			}
			if !s.nextWindow(src, &mark) {
				return s.parked(), nil
			}
			continue
		}
		if s.err == syscall.EAGAIN { // nothing to read, no quiet window
			s.err = 0
			if s.atEnd() {
				return false, nil // as at EOF
			}
			return s.parked(), nil
		}
		if s.err != 0 {
			return false, s.syscallError("read")
		}
		if s.n == 0 {
			return false, nil // EOF: the pipe was empty, so nothing is lost
		}
		// Drain the pipe (or buffer) into dst, waiting for dst to be
		// writable.
		s.pending = s.n
		if err := s.wait(int64(s.n)); err != nil {
			return false, err
		}
		if s.dst == nil {
			if err := s.writeOut(dst, s.buf.out); err != nil {
				return false, err
			}
			s.pending = 0
			continue
		}
		s.mode = drain
		for s.pending > 0 {
			if err := s.dst.Write(s.do); err != nil {
				return false, err
			}
			if s.err != 0 {
				return false, s.syscallError("write")
			}
			if s.n == 0 {
				return false, io.ErrNoProgress
			}
			s.pending -= s.n
			s.written += int64(s.n)
			if s.d != nil {
				s.d.delivered(s.written)
			}
		}
	}
}

// atEnd reports whether s's direction has moved all of its Counted
// source's stream.
func (s *splicer) atEnd() bool { return s.d != nil && s.d.atEnd(s.written) }

// endWoke reports whether err, from a wait for src, is the deadline with
// which endAtCount woke it: the loop then goes round again, and ends if
// the count is reached. Before the count, the wait goes on as it was.
func (s *splicer) endWoke(src net.Conn, err error) bool {
	if s.d == nil || s.d.endAt.Load() == 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
		return false
	}
	if !s.atEnd() {
		if s.quiet > 0 {
			return false // the quiet window's deadline, or as good as it
		}
		s.sock(src).SetReadDeadline(time.Time{})
	}
	return true
}

// counted tells Counted conns what s's finished direction did: that it
// read src's stream to its count, and how many bytes it wrote to dst's
// socket itself (into a TLS dst, it wrote through Write). A direction that
// moved more than the count did not end at it: the peer sent more than it
// said, and the connection must not serve another client.
func (s *splicer) counted(dst, src net.Conn, n int64) {
	if c, ok := src.(Counted); ok && s.atEnd() && s.written == s.d.endAt.Load()-1 {
		c.ReadEnded()
	}
	if c, ok := dst.(Counted); ok && s.dst != nil {
		c.Wrote(n)
	}
}

// wakeFor ends a wait for src's bytes at once, with a deadline in the past.
func (s *splicer) wakeFor(src net.Conn) { s.sock(src).SetReadDeadline(time.Now()) }

// forCopy makes s Copy's: it waits in the runtime's poller, and never parks.
func (s *splicer) forCopy() { s.canPark, s.quiet = false, 0 }

// startWindow starts the quiet window loop waits before it parks (see
// firstQuiet), if it has one, on src's read deadline. It returns the mark
// nextWindow takes: the bytes written when the window started.
func (s *splicer) startWindow(src net.Conn) (mark int64) {
	if s.canPark && s.parkedAt != 0 && nanotime()-s.parkedAt < int64(hotFor) {
		s.quiet = hotFor
	}
	if s.quiet > 0 {
		s.sock(src).SetReadDeadline(time.Now().Add(s.quiet))
	}
	return s.written
}

// nextWindow runs when the quiet window's deadline has passed: if bytes
// moved during it (since *mark), it starts a longer one, moves *mark and
// reports true; else the direction parks, with no window, and it reports
// false.
func (s *splicer) nextWindow(src net.Conn, mark *int64) bool {
	if s.written == *mark {
		s.quiet = 0
		s.sock(src).SetReadDeadline(time.Time{})
		return false
	}
	s.quiet = min(2*s.quiet, hotFor)
	*mark = s.written
	s.sock(src).SetReadDeadline(time.Now().Add(s.quiet))
	return true
}

// doFill moves what the socket fd has into the pipe (or buffer). On EAGAIN
// it gives the pipe or buffer back, then returns true with s.err EAGAIN if
// the direction should park, else false, so RawConn.Read waits for
// readability.
func (s *splicer) doFill(fd uintptr) bool {
	for {
		if s.p == nil && s.buf == nil {
			s.take()
		}
		if s.buf != nil {
			s.read(int(fd))
		} else {
			n, err := syscall.Splice(int(fd), nil, s.p.w, nil, s.p.size, spliceMove|spliceNonblock)
			s.n, s.err = int32(n), errno(err)
		}
		switch s.err {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			s.release()
			if s.canPark && s.quiet == 0 || s.atEnd() {
				return true // loop parks, or ends
			}
			s.err = 0
			return false
		}
		return true
	}
}

// parked records when loop handed its direction to the poller.
func (s *splicer) parked() bool {
	s.parkedAt = nanotime()
	return true
}

// noPark makes the direction from src wait in the runtime's poller from
// now on.
func (s *splicer) noPark(src net.Conn) {
	s.canPark, s.quiet = false, 0
	s.sock(src).SetReadDeadline(time.Time{})
}

// doDrain moves bytes from the pipe (or buffer) to the socket fd; on
// EAGAIN it returns false, so RawConn.Write waits for writability.
func (s *splicer) doDrain(fd uintptr) bool {
	for {
		if s.buf != nil {
			s.write(int(fd))
		} else {
			n, err := syscall.Splice(s.p.r, nil, int(fd), nil, int(s.pending), spliceMove|spliceNonblock)
			s.n, s.err = int32(n), errno(err)
		}
		if s.err == syscall.EINTR {
			continue
		}
		if s.err == syscall.EAGAIN && s.d != nil {
			s.d.wait() // dst's reader is not keeping up, or stopped
		}
		return s.err != syscall.EAGAIN
	}
}

// take gets what a new burst moves its bytes through: a pipe, or, when
// none can be had (the pipes at their bound, see SetMaxPipes, or pipe2
// failing with EMFILE, ENFILE or ENOMEM: the process or the system is out
// of descriptors or pipe memory), a buffer.
// Any pipe2 error means the same: it says nothing about the connection.
func (s *splicer) take() {
	if s.bucket() != nil || s.dst == nil {
		s.buf = bufs.Get().(*buffer)
		return
	}
	var err error
	if s.p, err = pipes.get(); err != nil {
		s.buf = bufs.Get().(*buffer)
	}
}

// release gives back what the burst held, once it has ended.
func (s *splicer) release() {
	if s.p != nil {
		pipes.put(s.p, s.pending == 0)
		s.p = nil
	}
	if s.buf != nil {
		s.buf.out = nil
		bufs.Put(s.buf)
		s.buf = nil
	}
}

// read and write are doFill's and doDrain's splice for a burst through
// buf, with splice's results.
func (s *splicer) read(fd int) {
	n, err := syscall.Read(fd, s.buf.b[:min(len(s.buf.b), Chunk)])
	if err != nil {
		n = 0
	}
	s.n, s.err = int32(n), errno(err)
	s.buf.out = s.buf.b[:n]
}

func (s *splicer) write(fd int) {
	n, err := syscall.Write(fd, s.buf.out)
	if err != nil {
		n = 0
	}
	s.n, s.err = int32(n), errno(err)
	s.buf.out = s.buf.out[n:]
}

// errno is err, an error of the syscall package, as its Errno (0 for nil).
func errno(err error) syscall.Errno {
	if err == nil {
		return 0
	}
	if e, ok := err.(syscall.Errno); ok {
		return e
	}
	return syscall.EIO
}

// syscallError names the call that failed: splice, or, in a burst through
// the buffer, op (read or write).
func (s *splicer) syscallError(op string) error {
	if s.buf == nil {
		op = "splice"
	}
	return os.NewSyscallError(op, s.err)
}

// buffer stands in for a pipe in a burst that cannot have one. 32 KiB, as
// io.Copy's: small enough that a few thousand links short of pipes at once
// cost tens of MiB, large enough that a burst makes few syscalls.
type buffer struct {
	b   [32 << 10]byte
	out []byte // the part of b read from src, not yet written to dst
}

// bufs keeps buffers for reuse between bursts.
var bufs = sync.Pool{New: func() any { return new(buffer) }}

// pipe is a kernel pipe used as splice's buffer.
type pipe struct {
	r, w int
	size int // capacity in bytes
}

// pipePool keeps empty pipes for reuse, so a busy relay does not create two
// file descriptors per burst. Pipes left in the pool are dropped by the
// garbage collector, whose finalizer closes them: an idle process keeps no
// pipes for long. The pipes alive (in use or pooled) are bounded by
// SetMaxPipes: past it a burst goes through a buffer.
type pipePool struct {
	pool  sync.Pool
	alive atomic.Int64
	max   atomic.Int64 // 0: no bound
}

var pipes pipePool

// errNoPipe: the pipes alive are at their bound.
var errNoPipe = errors.New("splice pipes at their bound")

// SetMaxPipes bounds the splice pipes the process keeps alive, in use or
// pooled for reuse, to n (two file descriptors each): a burst that finds
// none free moves through a small buffer with read(2) and write(2) instead.
// A relay sets it from its budget of file descriptors. Zero or negative:
// no bound, as by default.
func SetMaxPipes(n int) { pipes.max.Store(int64(max(n, 0))) }

// PipesAlive is the number of splice pipes the process holds now.
func PipesAlive() int { return int(pipes.alive.Load()) }

func (pp *pipePool) get() (*pipe, error) {
	if p, ok := pp.pool.Get().(*pipe); ok {
		return p, nil
	}
	if n, m := pp.alive.Add(1), pp.max.Load(); m > 0 && n > m {
		pp.alive.Add(-1)
		return nil, errNoPipe
	}
	var fds [2]int
	if err := syscall.Pipe2(fds[:], syscall.O_CLOEXEC|syscall.O_NONBLOCK); err != nil {
		pp.alive.Add(-1)
		return nil, os.NewSyscallError("pipe2", err)
	}
	p := &pipe{r: fds[0], w: fds[1]}
	// The kernel may refuse (a per-user quota of pipe memory); the
	// default size works too.
	fcntl(p.w, fSetPipeSize, pipeSize)
	size, err := fcntl(p.w, fGetPipeSize, 0)
	if err != nil || size <= 0 {
		size = 64 << 10
	}
	p.size = size
	runtime.SetFinalizer(p, (*pipe).close)
	return p, nil
}

// put returns p for reuse if it is empty, else closes it: bytes left in a
// pipe belong to a connection that failed.
func (pp *pipePool) put(p *pipe, empty bool) {
	if empty {
		pp.pool.Put(p)
		return
	}
	runtime.SetFinalizer(p, nil)
	p.close()
}

func (p *pipe) close() {
	syscall.Close(p.r)
	syscall.Close(p.w)
	pipes.alive.Add(-1)
}

func fcntl(fd, cmd, arg int) (int, error) {
	r, _, errno := syscall.Syscall(syscall.SYS_FCNTL, uintptr(fd), uintptr(cmd), uintptr(arg))
	if errno != 0 {
		return 0, errno
	}
	return int(r), nil
}
