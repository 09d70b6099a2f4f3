//go:build !linux

package server

import (
	"net"
	"time"
)

// queued cannot look into sockets here.
func queued(c net.Conn) int64 { return 0 }

// readBufferSetter sets SO_RCVBUF: elsewhere, no cap is known.
func readBufferSetter(n int) func(*net.TCPConn) {
	return func(c *net.TCPConn) { c.SetReadBuffer(n) }
}

// publicListenConfig is Go's default here: each accepted conn gets its
// keepalive, and tune its receive buffer.
func publicListenConfig(linkBuffer int) (lc net.ListenConfig, inherited bool) {
	return lc, false
}

// rmemMax is unknown here.
func rmemMax() int64 { return 0 }

// setNotSentLowat is Linux only.
func setNotSentLowat(c *net.TCPConn, n int) {}

// tcpMemPressure is unknown here.
func tcpMemPressure() int64 { return 0 }

// received cannot look into sockets here.
func received(c net.Conn) (bytes uint64, idle time.Duration, ok bool) { return 0, 0, false }
