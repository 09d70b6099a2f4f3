//go:build unix

package server

import (
	"net"
	"syscall"
)

// peek looks at socket fd without blocking or consuming: nil if it is open
// and has nothing to read.
func peek(fd uintptr) error {
	var buf [1]byte
	n, _, err := syscall.Recvfrom(int(fd), buf[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
	switch {
	case err == syscall.EAGAIN:
		return nil // open and silent: what we want
	case err != nil:
		return err
	case n == 0:
		return net.ErrClosed
	}
	return errBytes
}
