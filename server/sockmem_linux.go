package server

import (
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// queued is the bytes waiting in c's socket: received and not yet read,
// and written and not yet acknowledged by the peer.
func queued(c net.Conn) int64 {
	c = socketOf(c)
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

// readBufferSetter returns how relayed sockets get a receive buffer of n
// bytes, or nil if they cannot here (see readBufferOpt).
func readBufferSetter(n int) func(*net.TCPConn) {
	opt := readBufferOpt(n)
	if opt == 0 {
		return nil
	}
	return func(c *net.TCPConn) {
		if rc, err := c.SyscallConn(); err == nil {
			rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, opt, n) })
		}
	}
}

// readBufferOpt is the socket option that gives a socket a receive buffer
// of n bytes, or 0 if none can here. setsockopt(SO_RCVBUF) is capped at
// net.core.rmem_max (208 KiB on a stock Debian), so with a lower cap it
// would shrink every link's window instead of bounding it: then
// SO_RCVBUFFORCE, which needs CAP_NET_ADMIN, or else nothing (the kernel's
// autotuning stays, and with it the relay-wide watch alone).
func readBufferOpt(n int) int {
	if fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0); err == nil {
		err = syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_RCVBUFFORCE, n)
		syscall.Close(fd)
		if err == nil {
			return syscall.SO_RCVBUFFORCE
		}
	}
	if rmemMax() >= int64(n) {
		return syscall.SO_RCVBUF
	}
	return 0
}

// publicListenConfig is how public ports listen. A socket accepted on
// Linux inherits the listening socket's keepalive and receive buffer, so
// the listener gets them once, for all its clients: keepalive as Go sets
// it on each accepted conn (15 s idle, 15 s between probes, 9 probes), and
// the receive buffer of linkBuffer bytes (0: the kernel's). Each client
// then costs two setsockopt calls (Go's TCP_NODELAY, and
// TCP_NOTSENT_LOWAT, which the kernel does not pass on) instead of seven.
// inherited reports that it does.
func publicListenConfig(linkBuffer int) (lc net.ListenConfig, inherited bool) {
	opts := [][3]int{
		{syscall.SOL_SOCKET, syscall.SO_KEEPALIVE, 1},
		{syscall.IPPROTO_TCP, syscall.TCP_KEEPIDLE, 15},
		{syscall.IPPROTO_TCP, syscall.TCP_KEEPINTVL, 15},
		{syscall.IPPROTO_TCP, syscall.TCP_KEEPCNT, 9},
	}
	if linkBuffer > 0 {
		if opt := readBufferOpt(linkBuffer); opt != 0 {
			opts = append(opts, [3]int{syscall.SOL_SOCKET, opt, linkBuffer})
		}
	}
	lc.KeepAlive = -1 // no keepalive calls on each accepted conn: it has the listener's
	lc.Control = func(_, _ string, rc syscall.RawConn) error {
		// As tune's: a port opens even if an option cannot be had.
		return rc.Control(func(fd uintptr) {
			for _, o := range opts {
				syscall.SetsockoptInt(int(fd), o[0], o[1], o[2])
			}
		})
	}
	return lc, true
}

// rmemMax is net.core.rmem_max, or 0 if unknown.
func rmemMax() int64 { return readProcInt("/proc/sys/net/core/rmem_max", 0) }

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
	return readProcInt("/proc/sys/net/ipv4/tcp_mem", 1) * int64(os.Getpagesize())
}

// readProcInt reads the i-th number of a file in /proc, or 0.
func readProcInt(path string, i int) int64 {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if i >= len(f) {
		return 0
	}
	v, _ := strconv.ParseInt(f[i], 10, 64)
	return v
}

// received reports what c's peer has sent: the bytes in all, and how long
// ago the last of them came. ok is false where the kernel does not say.
func received(c net.Conn) (bytes uint64, idle time.Duration, ok bool) {
	c = socketOf(c)
	sc, isSys := c.(syscall.Conn)
	if !isSys {
		return 0, 0, false
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return 0, 0, false
	}
	rc.Control(func(fd uintptr) {
		info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
		if err == nil {
			bytes, idle, ok = info.Bytes_received, time.Duration(info.Last_data_recv)*time.Millisecond, true
		}
	})
	return bytes, idle, ok
}
