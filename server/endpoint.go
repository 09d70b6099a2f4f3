package server

import (
	"net"
	"slices"
	"time"
)

// endpoint is what outside clients connect to: a public port. It owns the
// listener, the admission limits and the client count, and it is served by
// its members. Today an endpoint has exactly one member, and it closes
// with it.
type endpoint struct {
	s    *Server
	ln   net.Listener
	port int

	// Guarded by s.mu.
	closed   bool
	members  []*member
	conns    int       // outside clients waiting or relayed
	pending  int       // outside clients waiting
	refused  int       // clients refused since the last log line about it
	lastWarn time.Time // when that line was written
}

// member is one session's registration serving an endpoint. It owns its
// in-flight clients (waiting for it, or relayed through it); its session
// owns the control connection and the pre-opened data connections.
type member struct {
	id   uint32 // the tunnel id in its session's messages
	sess *session
	ep   *endpoint

	// Guarded by s.mu.
	removed bool // no longer serves ep: it gets no new clients
	clients int  // outside clients waiting for it or relayed through it
}

// openEndpoint binds a public port on ip (see portAllocator.listen). The
// endpoint accepts nothing until start.
func (s *Server) openEndpoint(ip net.IP, port int, required bool) (*endpoint, error) {
	ln, err := s.ports.listen(ip, port, required)
	if err != nil {
		return nil, err
	}
	return &endpoint{s: s, ln: ln, port: ln.Addr().(*net.TCPAddr).Port}, nil
}

// start accepts outside clients in the background until the endpoint's
// listener closes.
func (ep *endpoint) start() {
	s := ep.s
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.acceptLoop(ep.ln, ep.serveClient)
	}()
}

// removeLocked ends m's membership: it gets no new clients, and its
// waiting clients are closed after a grace (see expireWaitingLocked). If m
// was the endpoint's last member, the endpoint is closed and returned: the
// caller closes its port, outside s.mu. s.mu must be held.
func (m *member) removeLocked() *endpoint {
	s, ep := m.sess.s, m.ep
	m.removed = true
	delete(m.sess.members, m.id)
	ep.members = slices.DeleteFunc(ep.members, func(x *member) bool { return x == m })
	s.expireWaitingLocked(func(p *pending) bool { return p.member == m })
	if len(ep.members) > 0 || ep.closed {
		return nil
	}
	ep.closed = true
	delete(s.endpoints, ep)
	return ep
}

// pickLocked chooses the member that serves the next client, or nil if
// there is none. s.mu must be held.
func (ep *endpoint) pickLocked() *member {
	if len(ep.members) == 0 {
		return nil
	}
	return ep.members[0]
}

// refusedLocked counts a refused client and returns how many to report
// now: at most one log line per second per endpoint, so a flood past a
// limit cannot flood the log too. s.mu must be held.
func (ep *endpoint) refusedLocked() int {
	ep.refused++
	if now := time.Now(); now.Sub(ep.lastWarn) >= time.Second {
		n := ep.refused
		ep.refused, ep.lastWarn = 0, now
		return n
	}
	return 0
}

// logRefused writes the line refusedLocked allowed, if any.
func (ep *endpoint) logRefused(why string, n int) {
	if n > 0 {
		s := ep.s
		s.log.Warn("closed outside client: "+why, "port", ep.port,
			"conns", s.set.maxConns, "pending", s.set.maxPending, "refused", n)
	}
}
