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
// its socket. The RawConn callbacks are methods bound once, so moving a
// chunk allocates nothing.
//
// A burst that cannot have a pipe (the process is at its fd limit, or out
// of pipe memory) goes through a small buffer instead, with read(2) and
// write(2): a pipe is the relay's resource, not the connection's, so
// running short of pipes must slow a link down, never end it. The buffer
// too is held only for the burst, and the next burst tries for a pipe
// again.
type splicer struct {
	dst, src syscall.RawConn
	fill     func(uintptr) bool
	drain    func(uintptr) bool
	srcConn  net.Conn // for its read deadline: the quiet window's timer
	srcFD    int32    // src's descriptor, for the poller
	// w, when dst is not a socket (TLS), is dst: bursts go through buf and
	// are written to it.
	w io.Writer
	// tls, when src is a TLS conn over Records (rec), is src: loopTLS
	// reads it. src, srcConn and srcFD are then the socket's under it.
	tls      net.Conn
	rec      *Records
	readable func(uintptr) bool
	// prog, for a Link's direction, is where the direction's progress is
	// kept, live; nil for Copy.
	prog *progress
	// lim, if set, is the direction's rate limit: every burst goes
	// through buf, and each chunk read waits for its tokens before it is
	// written; stop ends that wait.
	lim  *Bucket
	stop <-chan struct{}
	// canPark makes loop return when src has nothing to read (see
	// firstQuiet) instead of waiting in the runtime's poller.
	canPark bool
	// registered: srcFD is in the poller's set (under the Link's mu). It
	// sits next to canPark, where it costs no padding: every idle Link
	// holds two splicers.
	registered bool
	quiet      time.Duration // the current quiet window (0: park when drained)
	parkedAt   int64         // monotonic ns when loop last returned again
	mark       int64         // written when the read deadline was last set
	written    int64         // bytes moved to dst so far

	// A burst's bytes in flight are in p, or, when no pipe could be had,
	// in buf.
	p       *pipe
	buf     *buffer
	pending int64 // bytes in p or buf not yet moved to dst
	n       int64 // result of the last splice, read or write
	err     error // error of the last splice, read or write
}

// init sets s up to copy src to dst, and reports whether s can: src is a
// socket, or a TLS conn over Records (then loopTLS reads it). dst is
// spliced to if it is a socket too, else written to through a buffer
// (s.w). prog is a Link's direction's progress (nil for Copy): a Link's
// directions may park.
func (s *splicer) init(dst, src net.Conn, prog *progress) bool {
	*s = splicer{prog: prog, canPark: prog != nil, srcFD: -1}
	if rec := recordsOf(src); rec != nil {
		s.tls, s.rec, s.src, s.srcConn = src, rec, rec.raw, rec.Conn
		rec.nonblock.Store(true) // s reads it from now on
	} else if s.src = rawConn(src); s.src != nil {
		s.srcConn = src
	} else {
		return false
	}
	if s.dst = rawConn(dst); s.dst == nil || s.tls != nil {
		s.dst, s.w = nil, dst
	}
	s.src.Control(func(fd uintptr) { s.srcFD = int32(fd) })
	s.fill, s.drain, s.readable = s.doFill, s.doDrain, s.doReadable
	if s.canPark {
		s.quiet = firstQuiet
	}
	return true
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
// are sockets.
func (s *splicer) spliced() bool { return s.w == nil && s.lim == nil }

// limit makes s copy through a buffer, at most lim's rate.
func (s *splicer) limit(lim *Bucket, stop <-chan struct{}) {
	s.lim, s.stop = lim, stop
}

// loop moves bytes until EOF on src (nil), an error, or, if canPark, src
// has nothing to read (again is true; see firstQuiet).
func (s *splicer) loop() (again bool, err error) {
	if s.tls != nil {
		return s.loopTLS()
	}
	defer s.release() // EOF or an error
	s.startWindow()
	for {
		// Fill the pipe from src; fill gives the pipe back while src has
		// nothing to read.
		if err := s.src.Read(s.fill); err != nil {
			if s.quiet == 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
				return false, err
			}
			if !s.nextWindow() {
				return s.parked(), nil
			}
			continue
		}
		if s.err == syscall.EAGAIN { // nothing to read, no quiet window
			s.err = nil
			return s.parked(), nil
		}
		if s.err != nil {
			return false, s.syscallError("read")
		}
		if s.n == 0 {
			return false, nil // EOF: the pipe was empty, so nothing is lost
		}
		// Drain the pipe (or buffer) into dst, waiting for dst to be
		// writable.
		s.pending = s.n
		if err := s.lim.wait(s.n, s.stop); err != nil {
			return false, err
		}
		if s.w != nil {
			if err := s.writeOut(s.buf.out); err != nil {
				return false, err
			}
			s.pending = 0
			continue
		}
		for s.pending > 0 {
			if err := s.dst.Write(s.drain); err != nil {
				return false, err
			}
			if s.err != nil {
				return false, s.syscallError("write")
			}
			if s.n == 0 {
				return false, io.ErrNoProgress
			}
			s.pending -= s.n
			s.written += s.n
			if s.prog != nil {
				s.prog.delivered(s.written)
			}
		}
	}
}

// startWindow starts the quiet window loop waits before it parks (see
// firstQuiet), if it has one.
func (s *splicer) startWindow() {
	if s.canPark && s.parkedAt != 0 && nanotime()-s.parkedAt < int64(hotFor) {
		s.quiet = hotFor
	}
	if s.quiet > 0 {
		s.mark = s.written
		s.srcConn.SetReadDeadline(time.Now().Add(s.quiet))
	}
}

// nextWindow runs when the quiet window's deadline has passed: if bytes
// moved during it, it starts a longer one and reports true; else the
// direction parks, with no window, and it reports false.
func (s *splicer) nextWindow() bool {
	if s.written == s.mark {
		s.quiet = 0
		s.srcConn.SetReadDeadline(time.Time{})
		return false
	}
	s.quiet = min(2*s.quiet, hotFor)
	s.mark = s.written
	s.srcConn.SetReadDeadline(time.Now().Add(s.quiet))
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
			s.n, s.err = syscall.Splice(int(fd), nil, s.p.w, nil, s.p.size, spliceMove|spliceNonblock)
		}
		switch s.err {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			s.release()
			if s.canPark && s.quiet == 0 {
				return true // loop parks
			}
			s.err = nil
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

// noPark makes the direction wait in the runtime's poller from now on.
func (s *splicer) noPark() {
	s.canPark, s.quiet = false, 0
	s.srcConn.SetReadDeadline(time.Time{})
}

// doDrain moves bytes from the pipe (or buffer) to the socket fd; on
// EAGAIN it returns false, so RawConn.Write waits for writability.
func (s *splicer) doDrain(fd uintptr) bool {
	for {
		if s.buf != nil {
			s.write(int(fd))
		} else {
			s.n, s.err = syscall.Splice(s.p.r, nil, int(fd), nil, int(s.pending), spliceMove|spliceNonblock)
		}
		if s.err == syscall.EINTR {
			continue
		}
		if s.err == syscall.EAGAIN && s.prog != nil {
			s.prog.wait() // dst's reader is not keeping up, or stopped
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
	if s.lim != nil || s.w != nil {
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
	s.n, s.err = int64(n), err
	s.buf.out = s.buf.b[:n]
}

func (s *splicer) write(fd int) {
	n, err := syscall.Write(fd, s.buf.out)
	if err != nil {
		n = 0
	}
	s.n, s.err = int64(n), err
	s.buf.out = s.buf.out[n:]
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
