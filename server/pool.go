package server

import (
	"errors"
	"net"
	"syscall"
	"time"

	"tcprelay/internal/proto"
)

// Pre-opened data connections. An agent that received a PoolKey keeps a
// few data connections open in advance (PoolJoin). The relay parks them
// with the session and, when an outside client arrives, writes Bind on one
// and joins it to the client at once: no Incoming, no dial, no round trip
// to the agent on the new client's path.

// park keeps a pre-opened data connection for the session that owns key. It
// reports whether it took ownership of c.
func (s *Server) park(c net.Conn, key [proto.TokenLen]byte) bool {
	s.mu.Lock()
	ss := s.poolKeys[key]
	ok := ss != nil && !ss.closed && len(ss.pool) < s.cfg.maxPool()
	if ok {
		ss.pool = append(ss.pool, c)
	}
	s.mu.Unlock()
	if !ok {
		s.dropConn(c, "pre-opened data connection with an unknown key, or the pool is full", nil)
		return false
	}
	c.SetDeadline(time.Time{})
	return true
}

// takePooled returns a parked data connection of the session that is still
// open, or nil.
func (ss *session) takePooled() net.Conn {
	s := ss.s
	for {
		s.mu.Lock()
		n := len(ss.pool)
		if n == 0 {
			s.mu.Unlock()
			return nil
		}
		c := ss.pool[n-1]
		ss.pool = ss.pool[:n-1]
		s.mu.Unlock()
		if idle(c) {
			return c
		}
		s.closeConn(c) // the agent closed it, or broke the protocol
	}
}

// errBytes marks a parked connection on which the agent sent bytes before
// Bind.
var errBytes = errors.New("bytes before bind")

// idle reports whether a parked connection is still open and silent, with
// one non-blocking peek. Connections without a descriptor (TLS) are
// assumed to be.
func idle(c net.Conn) bool {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return true
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	var perr error
	var buf [1]byte
	err = rc.Read(func(fd uintptr) bool {
		var n int
		n, _, perr = syscall.Recvfrom(int(fd), buf[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		switch {
		case perr == syscall.EAGAIN:
			perr = nil // open and silent: what we want
		case perr == nil && n == 0:
			perr = net.ErrClosed
		case perr == nil:
			perr = errBytes
		}
		return true
	})
	return err == nil && perr == nil
}

// bindPooled joins client to a parked data connection if the session has
// one, and reports whether it did.
func (t *tunnel) bindPooled(client net.Conn) bool {
	s := t.sess.s
	for {
		data := t.sess.takePooled()
		if data == nil {
			return false
		}
		frame := proto.Append(nil, &proto.Bind{Tunnel: t.id,
			Client: client.RemoteAddr().String(), Local: client.LocalAddr().String()})
		data.SetWriteDeadline(time.Now().Add(s.cfg.writeTimeout()))
		if _, err := data.Write(frame); err != nil {
			s.closeConn(data)
			continue
		}
		data.SetWriteDeadline(time.Time{})
		s.count.poolHits.Add(1)
		s.relayLink(t, client, data)
		return true
	}
}
