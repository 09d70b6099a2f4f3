package server

import (
	"crypto/tls"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"unsafe"
)

// queued is the bytes waiting in c's socket: received and not yet read,
// and written and not yet acknowledged by the peer.
func queued(c net.Conn) int64 {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return 0
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return 0
	}
	var n int64
	rc.Control(func(fd uintptr) {
		for _, req := range []uintptr{syscall.TIOCINQ, syscall.TIOCOUTQ} {
			var v int32
			if _, _, errno := syscall.Syscall(syscall.SYS_IOCTL, fd, req, uintptr(unsafe.Pointer(&v))); errno == 0 {
				n += int64(v)
			}
		}
	})
	return n
}

// setNotSentLowat keeps what c has written but not yet sent under n bytes:
// a write waits instead.
func setNotSentLowat(c *net.TCPConn, n int) {
	rc, err := c.SyscallConn()
	if err != nil {
		return
	}
	const tcpNotSentLowat = 25 // TCP_NOTSENT_LOWAT
	rc.Control(func(fd uintptr) {
		syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, tcpNotSentLowat, n)
	})
}

// tcpMemPressure is the kernel's TCP memory pressure threshold, in bytes
// (the middle of tcp_mem), or 0 if unknown.
func tcpMemPressure() int64 {
	b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_mem")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) != 3 {
		return 0
	}
	pages, err := strconv.ParseInt(f[1], 10, 64)
	if err != nil {
		return 0
	}
	return pages * int64(os.Getpagesize())
}
