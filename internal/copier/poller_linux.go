package copier

import (
	"os"
	"sync"
	"syscall"
)

// The poller holds idle directions without a goroutine each. It is one
// epoll set of the sources that have nothing to read, each armed for one
// event (EPOLLONESHOT). The epoll descriptor is itself pollable, so one
// goroutine waits on it through the runtime's poller and, when a source
// becomes readable, starts a goroutine for its direction. The set exists
// only while some link has a direction in it: with none, its descriptor is
// closed and its goroutine returns.
//
// The directions in the set are found by their source's descriptor, an
// index into dirs: descriptors are small numbers, reused lowest first, so
// the slice is no longer than the process's highest descriptor, and costs
// 8 bytes a direction where a map cost some 24. It is dropped when the set
// is.
type poller struct {
	mu   sync.Mutex
	file *os.File // the epoll set; nil while it is empty
	epfd int      // file's descriptor (file.Fd would make it blocking)
	dirs []*dir   // by source descriptor; nil while the set is empty
	n    int      // directions in dirs
}

// idle is the process's one poller.
var idle poller

// EPOLLRDHUP is not in the syscall package's EpollEvent flags for every
// architecture; its value is the same on all of them.
const epollRDHUP = 0x2000

// arm adds (or re-arms) d's source in the set, for one event, and reports
// whether it did. It runs under d's Link's mu.
func (p *poller) arm(d *dir) bool {
	s := &d.sp
	if s.srcFD < 0 {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.file == nil && !p.start() {
		return false
	}
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN | epollRDHUP | syscall.EPOLLONESHOT, Fd: s.srcFD}
	op := syscall.EPOLL_CTL_MOD
	if !s.registered {
		op = syscall.EPOLL_CTL_ADD
	}
	err := syscall.EpollCtl(p.epfd, op, int(s.srcFD), &ev)
	if err == syscall.EEXIST {
		err = syscall.EpollCtl(p.epfd, syscall.EPOLL_CTL_MOD, int(s.srcFD), &ev)
	}
	if err != nil {
		if p.n == 0 {
			p.stop()
		}
		return false
	}
	s.registered = true
	fd := int(s.srcFD)
	if fd >= len(p.dirs) {
		p.dirs = append(p.dirs, make([]*dir, max(fd+1, 2*len(p.dirs), 64)-len(p.dirs))...)
	}
	if p.dirs[fd] == nil {
		p.n++
	}
	p.dirs[fd] = d
	return true
}

// disarm takes d's source out of the set, if it is there. It runs under
// d's Link's mu, before the source is closed.
func (p *poller) disarm(d *dir) {
	if !d.sp.registered {
		return
	}
	d.sp.registered = false
	p.mu.Lock()
	defer p.mu.Unlock()
	fd := int(d.sp.srcFD)
	if fd >= len(p.dirs) || p.dirs[fd] != d {
		return // the descriptor was closed behind the Link's back, and reused
	}
	p.dirs[fd] = nil
	p.n--
	syscall.EpollCtl(p.epfd, syscall.EPOLL_CTL_DEL, fd, nil)
	if p.n == 0 {
		p.stop()
	}
}

// start creates the epoll set and its goroutine. It runs under p.mu.
func (p *poller) start() bool {
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return false
	}
	if err := syscall.SetNonblock(epfd, true); err != nil {
		syscall.Close(epfd)
		return false
	}
	// A non-blocking descriptor given to os.NewFile joins the runtime's
	// poller, so waiting on it parks a goroutine, not a thread, and Close
	// wakes that goroutine.
	f := os.NewFile(uintptr(epfd), "copier-epoll")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return false
	}
	p.file, p.epfd = f, epfd
	go p.run(rc)
	return true
}

// stop closes the epoll set; its goroutine returns. It runs under p.mu.
func (p *poller) stop() {
	p.file.Close()
	p.file = nil
	p.dirs = nil
}

// run hands each readable source to its direction until the set is closed.
func (p *poller) run(rc syscall.RawConn) {
	var events [64]syscall.EpollEvent
	var n int
	wait := func(fd uintptr) bool {
		var err error
		n, err = syscall.EpollWait(int(fd), events[:], 0)
		if err != nil {
			n = 0
		}
		return n > 0
	}
	ready := make([]*dir, 0, len(events))
	for {
		if err := rc.Read(wait); err != nil {
			return // closed: the set is empty
		}
		p.mu.Lock()
		for _, ev := range events[:n] {
			if fd := int(ev.Fd); fd < len(p.dirs) && p.dirs[fd] != nil {
				ready = append(ready, p.dirs[fd])
			}
		}
		p.mu.Unlock()
		for i, d := range ready {
			d.wake()
			ready[i] = nil
		}
		ready = ready[:0]
	}
}
