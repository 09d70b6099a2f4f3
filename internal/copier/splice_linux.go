package copier

import (
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"syscall"
)

// Linux splice(2) flags and fcntl(2) commands the syscall package lacks.
const (
	spliceMove     = 0x1
	spliceNonblock = 0x2
	fSetPipeSize   = 1031
	fGetPipeSize   = 1032
)

// pipeSize is the capacity asked for each pipe: the most one splice moves.
const pipeSize = 1 << 20

// spliceCopy copies src to dst through a kernel pipe if both are sockets
// that expose their file descriptors. The pipe is held only while bytes are
// in flight: whenever src has nothing to read, the pipe goes back to the
// pool before the goroutine waits, so an idle connection costs its sockets
// and nothing more. handled is false if splice cannot be used.
func spliceCopy(dst, src net.Conn) (written int64, err error, handled bool) {
	sc, ok := src.(syscall.Conn)
	if !ok {
		return 0, nil, false
	}
	dc, ok := dst.(syscall.Conn)
	if !ok {
		return 0, nil, false
	}
	srcRaw, err := sc.SyscallConn()
	if err != nil {
		return 0, nil, false
	}
	dstRaw, err := dc.SyscallConn()
	if err != nil {
		return 0, nil, false
	}
	written, err = spliceLoop(dstRaw, srcRaw)
	return written, err, true
}

// splicer is one direction's state. The RawConn callbacks are its methods,
// bound once, so moving a chunk allocates nothing.
type splicer struct {
	p      *pipe
	inPipe int64 // bytes in p not yet moved to dst
	n      int64 // result of the last splice
	err    error // error of the last splice
}

func spliceLoop(dst, src syscall.RawConn) (written int64, err error) {
	s := &splicer{}
	fill, drain := s.fill, s.drain
	defer func() {
		if s.p != nil {
			pipes.put(s.p, s.inPipe == 0)
		}
	}()
	for {
		// Fill the pipe from src; fill gives the pipe back and lets the
		// runtime park this goroutine while src has nothing to read.
		if err := src.Read(fill); err != nil {
			return written, err
		}
		if s.err != nil {
			return written, os.NewSyscallError("splice", s.err)
		}
		if s.n == 0 {
			return written, nil // EOF: the pipe was empty, so nothing is lost
		}
		// Drain the pipe into dst, waiting for dst to be writable.
		s.inPipe = s.n
		for s.inPipe > 0 {
			if err := dst.Write(drain); err != nil {
				return written, err
			}
			if s.err != nil {
				return written, os.NewSyscallError("splice", s.err)
			}
			if s.n == 0 {
				return written, io.ErrNoProgress
			}
			s.inPipe -= s.n
			written += s.n
		}
	}
}

// fill moves what the socket fd has into the pipe. On EAGAIN it returns the
// pipe to the pool and false, so RawConn.Read waits for readability.
func (s *splicer) fill(fd uintptr) bool {
	for {
		if s.p == nil {
			if s.p, s.err = pipes.get(); s.err != nil {
				return true
			}
		}
		s.n, s.err = syscall.Splice(int(fd), nil, s.p.w, nil, s.p.size, spliceMove|spliceNonblock)
		switch s.err {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			pipes.put(s.p, true)
			s.p = nil
			return false
		}
		return true
	}
}

// drain moves bytes from the pipe to the socket fd; on EAGAIN it returns
// false, so RawConn.Write waits for writability.
func (s *splicer) drain(fd uintptr) bool {
	for {
		s.n, s.err = syscall.Splice(s.p.r, nil, int(fd), nil, int(s.inPipe), spliceMove|spliceNonblock)
		if s.err == syscall.EINTR {
			continue
		}
		return s.err != syscall.EAGAIN
	}
}

// pipe is a kernel pipe used as splice's buffer.
type pipe struct {
	r, w int
	size int // capacity in bytes
}

// pipePool keeps empty pipes for reuse, so a busy relay does not create two
// file descriptors per burst. Pipes left in the pool are dropped by the
// garbage collector, whose finalizer closes them: an idle process keeps no
// pipes for long.
type pipePool struct{ pool sync.Pool }

var pipes pipePool

func (pp *pipePool) get() (*pipe, error) {
	if p, ok := pp.pool.Get().(*pipe); ok {
		return p, nil
	}
	var fds [2]int
	if err := syscall.Pipe2(fds[:], syscall.O_CLOEXEC|syscall.O_NONBLOCK); err != nil {
		return nil, os.NewSyscallError("pipe2", err)
	}
	p := &pipe{r: fds[0], w: fds[1]}
	// A bigger pipe moves more per splice. The kernel may refuse (a
	// per-user quota of pipe memory); the default size works too.
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
}

func fcntl(fd, cmd, arg int) (int, error) {
	r, _, errno := syscall.Syscall(syscall.SYS_FCNTL, uintptr(fd), uintptr(cmd), uintptr(arg))
	if errno != 0 {
		return 0, errno
	}
	return int(r), nil
}
