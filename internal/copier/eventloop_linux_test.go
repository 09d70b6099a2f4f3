package copier

// Issue 17 asked whether an event-loop copier (one level-triggered epoll
// set, one shared buffer, no goroutine per direction) would bring short,
// hot links to haproxy's cost. evloop is the smallest such copier that
// can carry the benchmark below: pairs of sockets, small messages, no
// backpressure (a write that would block is retried), no half-close state
// beyond passing a FIN on. It exists to be measured against Link, not
// used.

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

type evloop struct {
	file *os.File // the epoll set, waited on through the runtime's poller
	epfd int
	mu   sync.Mutex
	peer map[int32]int32 // each socket's other end
	keep []net.Conn      // the conns whose descriptors it uses
	done chan struct{}
}

func newEvloop(tb testing.TB) *evloop {
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		tb.Fatal(err)
	}
	syscall.SetNonblock(epfd, true)
	l := &evloop{file: os.NewFile(uintptr(epfd), "evloop"), epfd: epfd, peer: map[int32]int32{}, done: make(chan struct{})}
	rc, err := l.file.SyscallConn()
	if err != nil {
		tb.Fatal(err)
	}
	go l.run(rc)
	tb.Cleanup(func() {
		l.file.Close()
		<-l.done
		for _, c := range l.keep {
			c.Close()
		}
	})
	return l
}

func fdOf(c net.Conn) int32 {
	var fd int32 = -1
	if rc, err := c.(syscall.Conn).SyscallConn(); err == nil {
		rc.Control(func(f uintptr) { fd = int32(f) })
	}
	return fd
}

// add copies between a and b, both ways, until each direction's EOF.
func (l *evloop) add(a, b net.Conn) {
	fa, fb := fdOf(a), fdOf(b)
	l.mu.Lock()
	l.peer[fa], l.peer[fb] = fb, fa
	l.keep = append(l.keep, a, b)
	l.mu.Unlock()
	for _, fd := range []int32{fa, fb} {
		ev := syscall.EpollEvent{Events: syscall.EPOLLIN | epollRDHUP, Fd: fd}
		syscall.EpollCtl(l.epfd, syscall.EPOLL_CTL_ADD, int(fd), &ev)
	}
}

func (l *evloop) run(rc syscall.RawConn) {
	defer close(l.done)
	var events [128]syscall.EpollEvent
	var n int
	buf := make([]byte, 64<<10)
	wait := func(fd uintptr) bool {
		n, _ = syscall.EpollWait(int(fd), events[:], 0)
		return n > 0
	}
	for {
		if err := rc.Read(wait); err != nil {
			return
		}
		for _, ev := range events[:n] {
			fd := int(ev.Fd)
			l.mu.Lock()
			peer := int(l.peer[ev.Fd])
			l.mu.Unlock()
			m, err := syscall.Read(fd, buf)
			if err == syscall.EAGAIN {
				continue
			}
			if m <= 0 {
				syscall.EpollCtl(l.epfd, syscall.EPOLL_CTL_DEL, fd, nil)
				syscall.Shutdown(peer, syscall.SHUT_WR)
				continue
			}
			for out := buf[:m]; len(out) > 0; {
				w, err := syscall.Write(peer, out)
				if err == syscall.EAGAIN {
					continue // no backpressure here: the benchmark never fills a socket
				}
				if err != nil {
					break
				}
				out = out[w:]
			}
		}
	}
}

// BenchmarkSmallMessages: 50 clients, each sending a 16-byte message and
// waiting for its echo, through a hop (Link or evloop) to an echo server,
// all in this process, or straight to it (direct). It reports the
// process's CPU per message (every syscall of the clients, the hop and the
// echo server) and messages per second: a hop costs its figure less
// direct's.
func BenchmarkSmallMessages(b *testing.B) {
	for _, hop := range []string{"direct", "link", "evloop"} {
		b.Run(hop, func(b *testing.B) { benchSmallMessages(b, hop) })
	}
}

func benchSmallMessages(b *testing.B, hop string) {
	const clients, size = 50, 16
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer echo.Close()
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 4096)
				for {
					n, err := c.Read(buf)
					if err != nil {
						return
					}
					c.Write(buf[:n])
				}
			}()
		}
	}()
	front, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer front.Close()
	var ev *evloop
	if hop == "evloop" {
		ev = newEvloop(b)
	}
	var links sync.WaitGroup
	go func() {
		for {
			c, err := front.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", echo.Addr().String())
			if err != nil {
				c.Close()
				continue
			}
			if ev != nil {
				ev.add(c, s)
			} else {
				links.Add(1)
				Start(c, s, func(*Link, Result) { links.Done() })
			}
		}
	}()
	addr := front.Addr().String()
	if hop == "direct" {
		addr = echo.Addr().String()
	}
	conns := make([]net.Conn, clients)
	for i := range conns {
		if conns[i], err = net.Dial("tcp", addr); err != nil {
			b.Fatal(err)
		}
	}
	var left atomic.Int64
	left.Store(int64(b.N))
	var ru0, ru1 syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru0)
	start := time.Now()
	b.ResetTimer()
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for _, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			msg := make([]byte, size)
			got := make([]byte, size)
			c.SetDeadline(time.Now().Add(time.Minute))
			for left.Add(-1) >= 0 {
				if _, err := c.Write(msg); err != nil {
					errs <- err
					return
				}
				if _, err := io.ReadFull(c, got); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	b.StopTimer()
	elapsed := time.Since(start)
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru1)
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
	cpu := time.Duration(syscall.TimevalToNsec(ru1.Utime) - syscall.TimevalToNsec(ru0.Utime) +
		syscall.TimevalToNsec(ru1.Stime) - syscall.TimevalToNsec(ru0.Stime))
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N), "cpu-ns/msg")
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "msgs/s")
	for _, c := range conns {
		c.(*net.TCPConn).CloseWrite()
		if _, err := io.ReadAll(c); err != nil && !errors.Is(err, net.ErrClosed) {
			b.Error(err)
		}
		c.Close()
	}
	links.Wait()
}
