// Package copier joins two connections: the one bidirectional copy loop of
// the project, used by the relay between an outside client and an agent's
// data connection, and by ./expose between a relayed conn and its target.
package copier

import (
	"errors"
	"io"
	"net"
	"sync"
)

// Result reports what Join moved and why it stopped.
type Result struct {
	AToB, BToA int64 // bytes copied in each direction
	// Err is the first error that ended a direction early (a reset, a write
	// to a closed peer); nil when both directions ended with a clean EOF.
	Err error
}

// closeWriter is implemented by *net.TCPConn, *net.UnixConn, *tls.Conn and
// wrappers that embed them.
type closeWriter interface {
	CloseWrite() error
}

// Join copies a→b and b→a until both directions are done, then closes both
// conns and reports. It propagates half-close: EOF read from one side becomes
// CloseWrite on the other while the other direction keeps flowing. An error
// in either direction (a reset, a failed write) closes both conns at once, so
// a reset on one side becomes a close on the other.
//
// Memory is bounded: each direction holds at most one pipe's or one buffer's
// worth of data, so a peer that stops reading blocks the writer on the far
// side (backpressure) instead of growing a buffer. See Copy for when the
// bytes move with splice(2), never through user space, and why an idle
// connection holds no pipe.
func Join(a, b net.Conn) Result {
	j := &join{a: a, b: b}
	done := make(chan struct{})
	go func() {
		defer close(done)
		j.copyBToA()
	}()
	j.copyAToB()
	<-done
	a.Close()
	b.Close()
	return j.res
}

type join struct {
	a, b      net.Conn
	res       Result
	mu        sync.Mutex
	abortOnce sync.Once
}

// The two directions are named methods so stack dumps say which is which.
func (j *join) copyAToB() {
	n, err := j.forward(j.b, j.a)
	j.mu.Lock()
	j.res.AToB = n
	j.mu.Unlock()
	j.fail(err)
}

func (j *join) copyBToA() {
	n, err := j.forward(j.a, j.b)
	j.mu.Lock()
	j.res.BToA = n
	j.mu.Unlock()
	j.fail(err)
}

// Copy copies src to dst until EOF on src or an error, like io.Copy. When
// both are sockets that expose their descriptors (syscall.Conn: a
// *net.TCPConn, or a *tunnel.Conn over plain TCP) the bytes move with
// splice(2) on Linux, through a pipe held only while bytes are in flight:
// a connection waiting for data holds no pipe. Anything else (TLS) is
// copied through a buffer.
func Copy(dst, src net.Conn) (int64, error) {
	if n, err, ok := spliceCopy(dst, src); ok {
		return n, err
	}
	return io.Copy(dst, src)
}

// forward copies src to dst until EOF, then half-closes dst.
func (j *join) forward(dst, src net.Conn) (int64, error) {
	n, err := Copy(dst, src)
	if err != nil {
		return n, err
	}
	cw, ok := dst.(closeWriter)
	if !ok {
		// dst cannot carry a half-close: ending the whole connection is the
		// only way to tell its peer that no more bytes are coming.
		return n, errNoHalfClose
	}
	return n, cw.CloseWrite()
}

var errNoHalfClose = errors.New("peer does not support half-close")

// fail records the first error and closes both conns so the other direction
// unblocks. Errors that are only the echo of that close are not recorded.
func (j *join) fail(err error) {
	if err == nil {
		return
	}
	j.abortOnce.Do(func() {
		if err != errNoHalfClose {
			j.mu.Lock()
			j.res.Err = err
			j.mu.Unlock()
		}
		j.a.Close()
		j.b.Close()
	})
}
