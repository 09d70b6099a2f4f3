package server

import (
	"errors"
	"net"
	"strings"
	"sync"
	"time"

	"tcprelay/internal/clienthello"
	"tcprelay/internal/proto"
)

// The shared port: one public TLS port (443, say) for every endpoint that
// has a name. Each outside connection on it is routed by the server name
// of its TLS ClientHello to that name's endpoint, whose members, pool,
// access lists and limits then serve it as if it had come to a port of its
// own. The relay reads the ClientHello and nothing else: the bytes it read
// go to the agent first, unchanged, and the client's TLS ends at the
// agent's server, with that server's certificate. After the ClientHello
// the client is a socket like any other, spliced, and parked when idle.
//
// A ClientHello that names the relay itself (Config.NamesDomain, or
// Config.PublicHost) or offers the ALPN protocol proto.ALPN is an agent's:
// it goes to the listener of NamesControl, so a relay can serve its agents
// and their clients on one port.
//
// Until its ClientHello is read, a connection to the shared port is a
// handshake like one on the control port: it counts in the same budget and
// per-source caps (admitHandshake), and is closed at the handshake timeout.

// ServeNames accepts outside clients on ln, the shared port, and routes
// each by the name in its ClientHello, until the server is closed; then it
// returns ErrServerClosed. Config.NamesDomain must be set.
func (s *Server) ServeNames(ln net.Listener) error {
	if s.cfg.NamesDomain == "" {
		ln.Close()
		return errors.New("relay: ServeNames needs Config.NamesDomain")
	}
	registered := func() {
		if a, ok := ln.Addr().(*net.TCPAddr); ok && s.namesPort == 0 {
			s.namesPort = a.Port
			for _, ep := range s.names { // reserved from the state file
				ep.port = a.Port
			}
		}
	}
	return s.serveListener(ln, registered, func(c net.Conn) func() {
		release, ok := s.admitHandshake(c)
		if !ok {
			s.count.namesRejected.Add(1)
			s.quiet.Warn("closed connection on the names port: too many connections in handshake, from its address or in all", "remote", c.RemoteAddr().String())
			s.closeConn(c)
			return nil
		}
		return func() { s.routeByName(c, release) }
	})
}

// NamesControl returns the listener of the agents that come to the shared
// port (see ServeNames): serve it as a control listener, over TLS (the
// relay's own certificate), e.g. srv.Serve(transport.Listen(l, tlsCfg)).
// Its Addr is addr: as with any listener given to Serve, the public ports
// of the agents that come this way bind to its IP (nil or unspecified:
// every interface). Until it is called, such connections are closed.
func (s *Server) NamesControl(addr *net.TCPAddr) net.Listener {
	if addr == nil {
		addr = &net.TCPAddr{}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.namesCtl == nil {
		s.namesCtl = &handoff{conns: make(chan net.Conn), done: make(chan struct{}), addr: addr}
	}
	return s.namesCtl
}

// routeByName reads c's ClientHello and hands c to the endpoint it names,
// or to the control listener, or closes it. release ends its handshake.
func (s *Server) routeByName(c net.Conn, release func()) {
	defer release()
	accepted := time.Now()
	c.SetDeadline(accepted.Add(s.set.handshakeTimeout))
	if tc, ok := c.(*net.TCPConn); ok && s.viaTrustedProxy(c) {
		pc, err := readProxyHeader(tc, s.set.handshakeTimeout)
		if err != nil {
			s.rejectNamed(c, "a bad PROXY header from a trusted proxy", err)
			return
		}
		s.mu.Lock()
		delete(s.conns, c)
		s.conns[pc] = struct{}{}
		s.mu.Unlock()
		c = pc
		c.SetDeadline(accepted.Add(s.set.handshakeTimeout)) // readProxyHeader cleared it
	}
	hello, head, err := clienthello.Read(c)
	if err != nil {
		why := "no TLS ClientHello"
		if errors.Is(err, clienthello.ErrNotTLS) {
			why = "not TLS"
		}
		s.rejectNamed(c, why, err)
		return
	}
	c.SetDeadline(time.Time{})
	name := hello.ServerName
	if s.isRelayName(name) || hello.Offers(proto.ALPN) {
		s.mu.Lock()
		h := s.namesCtl
		s.mu.Unlock()
		if h == nil {
			s.rejectNamed(c, "an agent, but this relay serves no agents on its names port", nil)
			return
		}
		// Serve tracks it from now on, and counts it again as a handshake
		// of the control port, under the deadline it has.
		release()
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		if !h.deliver(&replayed{Conn: c, head: head}, accepted.Add(s.set.handshakeTimeout)) {
			s.count.namesRejected.Add(1)
			c.Close()
			s.quiet.Warn("closed connection on the names port: an agent, but nothing took it before its handshake timeout", "remote", c.RemoteAddr().String())
		}
		return
	}
	s.mu.Lock()
	ep := s.names[name]
	open := ep != nil && ep.ln != nil
	s.mu.Unlock()
	if !open {
		s.count.namesUnknown.Add(1)
		s.quiet.Warn("closed outside client: no tunnel has the name it asked for", "name", name, "client", c.RemoteAddr().String())
		s.closeConn(c)
		if s.access != nil {
			s.access.add(ConnRecord{Event: "connection", Start: accepted, End: time.Now(), Port: s.namesPortNow(), Host: name,
				Client: c.RemoteAddr().String(), Reason: "refused: unknown name"})
		}
		return
	}
	nc := withHead(c, head)
	s.mu.Lock()
	delete(s.conns, c)
	s.conns[nc] = struct{}{}
	s.mu.Unlock()
	release()
	s.tune(nc)
	if serve := ep.serveClient(nc); serve != nil {
		serve()
	}
}

// rejectNamed closes c, a connection to the shared port that could not be
// routed, and says why.
func (s *Server) rejectNamed(c net.Conn, why string, err error) {
	s.count.namesRejected.Add(1)
	s.closeConn(c)
	s.quiet.Warn("closed connection on the names port: "+why, withoutNil([]any{"remote", c.RemoteAddr().String(), "err", err})...)
}

// isRelayName reports whether name, from a ClientHello, is the relay's own.
func (s *Server) isRelayName(name string) bool {
	return name != "" && (name == strings.ToLower(s.cfg.NamesDomain) || name == strings.ToLower(s.cfg.PublicHost))
}

func (s *Server) namesPortNow() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.namesPort
}

// withHead returns c, an outside client's socket, with head, the bytes the
// relay read to route it: they go to the agent before any other (see
// link). It is still a socket the copier splices.
func withHead(c net.Conn, head []byte) net.Conn {
	switch c := c.(type) {
	case *proxied:
		c.head = head
		return c
	case *net.TCPConn:
		return &proxied{TCPConn: c, remote: c.RemoteAddr(), head: head}
	}
	return &replayed{Conn: c, head: head}
}

// replayed is a conn whose first bytes, read already, are read again.
// Only the relay's own TLS runs over it (an agent on the shared port), or
// a test's conn: it hides the socket, so nothing splices past head.
type replayed struct {
	net.Conn
	mu   sync.Mutex
	head []byte
}

// NetConn returns the socket, for what the relay asks the kernel of it
// (see socketOf).
func (c *replayed) NetConn() net.Conn { return c.Conn }

func (c *replayed) Read(p []byte) (int, error) {
	c.mu.Lock()
	if len(c.head) > 0 {
		n := copy(p, c.head)
		c.head = c.head[n:]
		c.mu.Unlock()
		return n, nil
	}
	c.mu.Unlock()
	return c.Conn.Read(p)
}

// handoff is a listener whose conns another goroutine accepted.
type handoff struct {
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
	addr  net.Addr
}

// deliver hands c to Accept by deadline, and reports whether it did
// (false: the listener is closed, or nothing accepted it in time).
func (h *handoff) deliver(c net.Conn, deadline time.Time) bool {
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case h.conns <- c:
		return true
	case <-h.done:
	case <-t.C:
	}
	return false
}

func (h *handoff) Accept() (net.Conn, error) {
	select {
	case c := <-h.conns:
		return c, nil
	case <-h.done:
		return nil, net.ErrClosed
	}
}

func (h *handoff) Close() error {
	h.once.Do(func() { close(h.done) })
	return nil
}

func (h *handoff) Addr() net.Addr { return h.addr }

// nameListener stands for a name endpoint's listener: the shared port's
// routing is its accept loop, so it only marks the endpoint open.
type nameListener struct{ host string }

func (l nameListener) Accept() (net.Conn, error) { return nil, net.ErrClosed }
func (l nameListener) Close() error              { return nil }
func (l nameListener) Addr() net.Addr            { return hostAddr(l.host) }

type hostAddr string

func (a hostAddr) Network() string { return "tcp" }
func (a hostAddr) String() string  { return string(a) }
