package server

import (
	"errors"
	"net"
	"syscall"
)

// errBytes marks a parked connection on which the agent sent bytes before
// Bind.
var errBytes = errors.New("bytes before bind")

// idle reports whether a parked data connection is still open and silent,
// with one non-blocking peek at its socket. Under TLS the socket is peeked
// too: a parked TLS connection that has anything to read (a close_notify,
// a FIN) is as dead as a plain one. Where peeking is not possible, the
// connection is assumed to be idle.
func idle(c net.Conn) bool {
	c = socketOf(c)
	sc, ok := c.(syscall.Conn)
	if !ok {
		return true
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	var perr error
	err = rc.Read(func(fd uintptr) bool {
		perr = peek(fd)
		return true
	})
	return err == nil && perr == nil
}
