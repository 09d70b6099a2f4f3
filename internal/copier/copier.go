// Package copier joins two connections: the one bidirectional copy loop of
// the project, used by the relay between an outside client and an agent's
// data connection, and by ./expose between a relayed conn and its target.
//
// A direction waits for its source without a goroutine or a buffer (it
// parks on the source's socket) only when the socket's readability says
// everything: nothing the direction has yet to move may sit in user space.
// A plain socket holds nothing. A TLS conn does (crypto/tls reads ahead of
// the record it returns), unless it reads its socket through Records and
// is read a whole record at a time: then after each Read it holds nothing
// and its socket is at a record boundary (see Records and loopTLS).
package copier

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Result reports what a Link moved and why it stopped.
type Result struct {
	AToB, BToA int64 // bytes copied in each direction
	// Err is the first error that ended a direction early (a reset, a write
	// to a closed peer, Close); nil when both directions ended with a clean
	// EOF.
	Err error
	// BFirst: the direction b→a ended first (b's side closed or failed
	// before a's); false, a→b did.
	BFirst bool
}

// Counted is a conn whose streams end at a byte count given out of band
// rather than with a FIN: a pre-opened data connection that serves one
// client after another (docs/PROTOCOL.md, feature reuse). A Link or Copy
// that reads one ends that direction once it has moved the count, as at
// EOF. The conn's CloseWrite ends the stream written to it, and must know
// how long that stream was: what went through its Write, and what the
// copier wrote to its socket directly, which Wrote reports.
type Counted interface {
	// WatchEnd has the conn call end once, from any goroutine, with the
	// count at which the stream read from it ends, when it learns it (it
	// may never). The copier reads the conn from then on.
	WatchEnd(end func(n int64))
	// ReadEnded says the copier has read that stream to its count.
	ReadEnded()
	// Wrote reports n bytes the copier wrote to the conn's socket, not
	// through Write, before it calls CloseWrite.
	Wrote(n int64)
}

// CanCount reports whether a Link or Copy that reads c can end at a
// count (Counted): it reads c's socket itself, plain or TLS over Records
// with a socket under it. Any other conn it reads through Read, which must
// then stop at the count itself.
func CanCount(c net.Conn) bool { return rawConn(c) != nil || recordsOf(c) != nil }

// closeWriter is implemented by *net.TCPConn, *net.UnixConn, *tls.Conn and
// wrappers that embed them.
type closeWriter interface {
	CloseWrite() error
}

// Link copies a→b and b→a until both directions are done, then closes both
// conns and reports. It propagates half-close: EOF read from one side
// becomes CloseWrite on the other while the other direction keeps flowing.
// An error in either direction (a reset, a failed write) closes both conns
// at once, so a reset on one side becomes a close on the other.
//
// Memory is bounded: each direction holds at most one pipe's or one
// buffer's worth of data, so a peer that stops reading blocks the writer on
// the far side (backpressure) instead of growing a buffer.
//
// A direction has a goroutine only while it has bytes to move. When both
// conns are plain sockets (Linux), a direction whose source has nothing to
// read gives back its splice pipe and its goroutine and waits in a shared
// epoll set (see firstQuiet for when): an idle link costs its two sockets and
// one small allocation. A burst that finds the process out of fds for a
// pipe goes through a small buffer instead: a link never fails for want of
// a pipe. A direction from a plain socket to another conn (TLS), or from a
// TLS conn over Records (see TLSRecords on the relay's and the agent's
// conns) to any conn, parks the same way and moves each burst through a
// pooled buffer held only for the burst. Other conns are copied through a
// buffer by one goroutine each way.
//
// A direction given a Bucket (NewLimited) moves its bytes through a buffer
// of Chunk bytes, taking each chunk's tokens before it writes it: it never
// splices, and it parks like any other when its source has nothing to read.
//
// Once a conn is in a Link, close it only with Link.Close: a conn closed
// behind the Link's back may leave a waiting direction unwoken.
//
// A Link is one allocation of at most 416 bytes (TestLinkSize): every idle
// relayed connection holds one at the relay and one at ./expose, so a
// direction keeps no copy of what its Link holds (see dir).
type Link struct {
	a, b     net.Conn
	dirs     [2]dir // a→b, b→a
	done     func(*Link, Result)
	stop     chan struct{} // closed by fail; nil when no direction is limited
	mu       sync.Mutex
	err      error   // Result.Err (under mu)
	left     int8    // directions not yet ended
	oneEnded bool    // a direction has ended, or reached its end (see endedFirst)
	bFirst   bool    // Result.BFirst (under mu)
	closed   bool    // fail ran, or both directions ended
	parked   [2]bool // dirs[i] waits in the poller, with no goroutine (under mu)
	stopped  [2]bool // dirs[i] has left its loop for good (under mu; see endAtCount)
}

// progress is what a direction has done, read live by Link.Progress and
// Link.Waiting while it runs.
type progress struct {
	moved   atomic.Int64 // bytes delivered to dst so far
	waiting atomic.Int64 // nanotime (+1) since which a write to dst waits; 0: none
}

// wait records that a write to dst has to wait for dst to take bytes.
func (p *progress) wait() {
	if p.waiting.Load() == 0 {
		p.waiting.Store(nanotime() + 1)
	}
}

// delivered records bytes delivered to dst: the direction moves again.
func (p *progress) delivered(total int64) {
	p.moved.Store(total)
	if p.waiting.Load() != 0 {
		p.waiting.Store(0)
	}
}

// dir is one direction of a Link: from a to b (dirs[0]), or from b to a.
// Its conns, its stop channel and whether it is parked are its Link's; its
// Result count is its progress (moved) once it has ended.
type dir struct {
	progress
	// endAt is the count (+1) at which src's stream ends, when src is
	// Counted and has said; 0: not known.
	endAt atomic.Int64
	l     *Link
	lim   *Bucket // nil: unlimited
	// sp moves the bytes, if it could be set up (sp.ok: src is a socket,
	// or TLS over one, Records); else io.Copy does, in run.
	sp splicer
}

// i is d's index in its Link's dirs.
func (d *dir) i() int {
	if d == &d.l.dirs[0] {
		return 0
	}
	return 1
}

// src and dst are the conns d copies from and to.
func (d *dir) src() net.Conn {
	if d.i() == 0 {
		return d.l.a
	}
	return d.l.b
}

func (d *dir) dst() net.Conn {
	if d.i() == 0 {
		return d.l.b
	}
	return d.l.a
}

// Start joins a and b in the background and returns at once: New, then
// Link.Start.
func Start(a, b net.Conn, done func(*Link, Result)) *Link {
	l := New(a, b, done)
	l.Start()
	return l
}

// New prepares a link between a and b; Start starts the copying. done is
// called once, from another goroutine (or from Close's), with the Link,
// when both directions have ended and both conns are closed; it must not
// block. A Link closed before it starts still calls done once started.
func New(a, b net.Conn, done func(*Link, Result)) *Link {
	return NewLimited(a, b, nil, nil, done)
}

// NewLimited is New with a rate limit on each direction: aToB bounds the
// bytes per second moved from a to b, bToA those from b to a, each shared
// with every other direction given the same Bucket. A nil Bucket leaves
// its direction unlimited, on the same path as New's (splice).
func NewLimited(a, b net.Conn, aToB, bToA *Bucket, done func(*Link, Result)) *Link {
	l := &Link{a: a, b: b, done: done, left: 2}
	l.dirs[0] = dir{l: l, lim: aToB}
	l.dirs[1] = dir{l: l, lim: bToA}
	if aToB != nil || bToA != nil {
		l.stop = make(chan struct{})
	}
	// Both set up before either runs: a direction that fails at once
	// reads the other's state. The directions share the sockets' RawConns.
	ra, rb := rawConn(a), rawConn(b)
	l.dirs[0].sp.init(a, b, rb, ra, &l.dirs[0])
	l.dirs[1].sp.init(b, a, ra, rb, &l.dirs[1])
	for i, c := range []net.Conn{a, b} {
		if cc, ok := c.(Counted); ok && l.dirs[i].sp.ok() {
			cc.WatchEnd(l.dirs[i].endAtCount)
		}
	}
	return l
}

// endAtCount ends d once it has moved n bytes: d's Counted source says its
// stream ends there. A parked direction runs again to see it; a running
// one waiting for its source is woken by a read deadline in the past. One
// that has stopped already (it saw the count as soon as it was stored) is
// not: its source may by then serve the next client, parked again with
// its deadline cleared, and a late deadline would end that wait instead.
func (d *dir) endAtCount(n int64) {
	d.endAt.Store(n + 1)
	l := d.l
	l.mu.Lock()
	parked := l.parked[d.i()]
	l.parked[d.i()] = false
	if !parked && !l.stopped[d.i()] {
		d.sp.wakeFor(d.src())
	}
	l.mu.Unlock()
	if parked {
		go d.run()
	}
}

// atEnd reports whether d has moved all its Counted source's stream.
func (d *dir) atEnd(written int64) bool {
	e := d.endAt.Load()
	return e != 0 && written >= e-1
}

// Spliced reports, for each direction, whether it moves its bytes with
// splice(2): both conns are sockets, on Linux, and the direction has no
// Bucket. (A burst that finds the process out of fds for a pipe goes
// through a buffer all the same.)
func (l *Link) Spliced() (aToB, bToA bool) {
	d := &l.dirs
	return d[0].sp.spliced(), d[1].sp.spliced()
}

// Progress returns the bytes each direction has delivered so far, live.
func (l *Link) Progress() (aToB, bToA int64) {
	return l.dirs[0].moved.Load(), l.dirs[1].moved.Load()
}

// Waiting returns how long the direction that has waited longest has been
// waiting for its destination to take bytes (a reader that stopped
// reading, or a slow one), or 0 if no direction waits.
func (l *Link) Waiting() time.Duration {
	var since int64
	for i := range l.dirs {
		if w := l.dirs[i].waiting.Load(); w != 0 && (since == 0 || w < since) {
			since = w
		}
	}
	if since == 0 {
		return 0
	}
	return time.Duration(nanotime() + 1 - since)
}

// Idle returns how long both directions have been parked: waiting in the
// poller for their sources, with nothing moved since (see firstQuiet for
// when a direction parks). It is 0 while either direction runs, or on a
// link whose directions cannot park (TLS).
func (l *Link) Idle() time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.parked[0] || !l.parked[1] {
		return 0
	}
	return time.Duration(nanotime() - max(l.dirs[0].sp.parkedAt, l.dirs[1].sp.parkedAt))
}

// Start runs both directions in the background. Call it once.
func (l *Link) Start() {
	for i := range l.dirs {
		go l.dirs[i].run()
	}
}

// Join is Start that waits: it returns the Result when the link is done.
func Join(a, b net.Conn) Result {
	ch := make(chan Result, 1)
	Start(a, b, func(_ *Link, r Result) { ch <- r })
	return <-ch
}

// Close ends the link at once: it closes both conns, and the Result's Err
// is net.ErrClosed unless the link had already failed. done still runs.
func (l *Link) Close() { l.fail(net.ErrClosed) }

// run copies until the source has nothing to read (then parks, and a new
// goroutine runs again once it has), EOF, or an error.
func (d *dir) run() {
	var n int64
	var err error
	if !d.sp.ok() {
		var w io.Writer = progressWriter{d.dst(), &d.progress}
		if d.lim != nil {
			w = limitedWriter{w, d.lim, d.l.stop}
		}
		n, err = io.Copy(w, d.src())
	} else {
		for {
			var again bool
			again, err = d.sp.loop(d.dst(), d.src())
			if !again {
				break
			}
			if d.l.park(d) {
				return // woken by the poller into a new goroutine
			}
			d.sp.noPark(d.src()) // wait in the runtime's poller from now on
		}
		n = d.sp.written
	}
	// Before the half-close, which lets the other side end in turn: the
	// order of the ends is then that of their causes.
	d.l.endedFirst(d)
	if err == nil {
		d.sp.counted(d.dst(), d.src(), n)
		err = halfClose(d.dst())
	}
	d.end(n, err)
}

// endedFirst records that d has stopped, and that it ended first
// (Result.BFirst) unless one did before.
func (l *Link) endedFirst(d *dir) {
	l.mu.Lock()
	l.stopped[d.i()] = true
	if !l.oneEnded {
		l.oneEnded = true
		l.bFirst = d.i() == 1
	}
	l.mu.Unlock()
}

// progressWriter is a direction's dst when it is copied through a buffer
// (TLS): it keeps the direction's progress.
type progressWriter struct {
	w io.Writer
	p *progress
}

func (w progressWriter) Write(b []byte) (int, error) {
	w.p.wait()
	n, err := w.w.Write(b)
	w.p.delivered(w.p.moved.Load() + int64(n))
	return n, err
}

// limitedWriter is a limited direction's dst when it is copied through a
// buffer (TLS): it takes each chunk's tokens before writing it.
type limitedWriter struct {
	w    io.Writer
	lim  *Bucket
	stop <-chan struct{}
}

func (w limitedWriter) Write(b []byte) (int, error) {
	var done int
	for done < len(b) {
		chunk := b[done:min(len(b), done+Chunk)]
		if err := w.lim.wait(int64(len(chunk)), w.stop); err != nil {
			return done, err
		}
		n, err := w.w.Write(chunk)
		done += n
		if err != nil {
			return done, err
		}
	}
	return done, nil
}

// Copy copies src to dst until EOF on src or an error, like io.Copy. When
// both are sockets that expose their descriptors (syscall.Conn: a
// *net.TCPConn, or a *tunnel.Conn over plain TCP) the bytes move with
// splice(2) on Linux, through a pipe held only while bytes are in flight:
// a connection waiting for data holds no pipe. When no pipe can be had
// (the process is at its fd limit), the bytes go through a small buffer
// until src next has nothing to read. A TLS src over Records, or a plain
// src to another dst, goes through a buffer held only while bytes are in
// flight: waiting, Copy holds its goroutine and nothing more. Anything
// else is copied through a buffer. A Counted src ends at its count, as at
// EOF.
func Copy(dst, src net.Conn) (int64, error) {
	var sp splicer
	var d *dir // only for a Counted src's end
	cs, counted := src.(Counted)
	if counted {
		d = new(dir)
	}
	if !sp.init(src, dst, rawConn(dst), rawConn(src), d) {
		return io.Copy(dst, src) // through src's Read, which stops at the count
	}
	sp.forCopy()
	if counted {
		// No wake once the loop has returned: src may by then wait for
		// its next client with its deadline cleared (see endAtCount).
		var mu sync.Mutex
		stopped := false
		defer func() {
			mu.Lock()
			stopped = true
			mu.Unlock()
		}()
		cs.WatchEnd(func(n int64) {
			d.endAt.Store(n + 1)
			mu.Lock()
			if !stopped {
				sp.wakeFor(src)
			}
			mu.Unlock()
		})
	}
	_, err := sp.loop(dst, src)
	if err == nil {
		sp.counted(dst, src, sp.written)
	}
	return sp.written, err
}

// halfClose tells dst's peer that no more bytes are coming.
func halfClose(dst net.Conn) error {
	cw, ok := dst.(closeWriter)
	if !ok {
		// dst cannot carry a half-close: ending the whole connection is the
		// only way to tell its peer that no more bytes are coming.
		return errNoHalfClose
	}
	return cw.CloseWrite()
}

var errNoHalfClose = errors.New("peer does not support half-close")

// end records that d is done; the last direction to end closes the link.
func (d *dir) end(n int64, err error) {
	l := d.l
	if err != nil {
		l.fail(err)
	}
	l.mu.Lock()
	d.moved.Store(n) // what the direction's Result field reports
	if !l.oneEnded { // ended without running to its end (Close, a failure)
		l.oneEnded = true
		l.bFirst = d.i() == 1
	}
	l.left--
	last := l.left == 0
	var res Result
	if last {
		l.closed = true // a later Close changes nothing
		l.unregisterLocked()
		res = Result{AToB: l.dirs[0].moved.Load(), BToA: l.dirs[1].moved.Load(), Err: l.err, BFirst: l.bFirst}
	}
	l.mu.Unlock()
	if last {
		l.a.Close()
		l.b.Close()
		l.done(l, res)
	}
}

// fail records the first error and closes both conns so the other
// direction ends too; a parked direction is ended here, since nothing will
// wake it. Errors that are only the echo of that close are not recorded.
func (l *Link) fail(err error) {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return
	}
	l.closed = true
	if l.stop != nil {
		close(l.stop) // ends a wait for tokens
	}
	if err != errNoHalfClose {
		l.err = err
	}
	var parked []*dir
	for i := range l.dirs {
		if l.parked[i] {
			l.parked[i] = false
			parked = append(parked, &l.dirs[i])
		}
	}
	// Out of the poller's set while the descriptors are still open.
	l.unregisterLocked()
	l.mu.Unlock()
	l.a.Close()
	l.b.Close()
	for _, d := range parked {
		d.end(d.sp.written, nil)
	}
}

// park hands d to the poller until its source is readable, and reports
// whether it did; false means d's goroutine must go on waiting itself.
func (l *Link) park(d *dir) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed || d.atEnd(d.sp.written) || !idle.arm(d) {
		return false
	}
	l.parked[d.i()] = true
	return true
}

// wake runs a parked direction again in a new goroutine; the poller calls
// it when d's source is readable (or by chance: a spurious wake costs one
// splice that finds nothing and parks again).
func (d *dir) wake() {
	l := d.l
	l.mu.Lock()
	ok := l.parked[d.i()]
	l.parked[d.i()] = false
	l.mu.Unlock()
	if ok {
		go d.run()
	}
}

// unregisterLocked takes both sources out of the poller's set.
func (l *Link) unregisterLocked() {
	for i := range l.dirs {
		idle.disarm(&l.dirs[i])
	}
}

// nanotime is a monotonic clock in nanoseconds.
func nanotime() int64 { return int64(time.Since(epoch)) }

var epoch = time.Now()
