//go:build !linux

package server

import "net"

// queued cannot look into sockets here.
func queued(c net.Conn) int64 { return 0 }

// setNotSentLowat is Linux only.
func setNotSentLowat(c *net.TCPConn, n int) {}

// tcpMemPressure is unknown here.
func tcpMemPressure() int64 { return 0 }
