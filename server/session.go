package server

import (
	"bufio"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"tcprelay/internal/proto"
)

// session is one authenticated agent's control connection.
type session struct {
	s      *Server
	conn   net.Conn
	br     *bufio.Reader
	bindIP net.IP
	log    *slog.Logger
	done   chan struct{} // closed by close

	wmu  sync.Mutex // serialises writes on conn
	wbuf []byte

	remote   string    // the agent's address
	software string    // what the agent says it is (Hello)
	since    time.Time // when the session was established

	// Guarded by s.mu.
	closed     bool
	tunnels    map[uint32]*tunnel
	nextTunnel uint32
	poolKey    [proto.TokenLen]byte
	pool       []net.Conn // parked pre-opened data connections
}

// tunnel is one public port of a session.
type tunnel struct {
	id   uint32
	sess *session
	ln   net.Listener
	port int

	// Guarded by s.mu.
	conns    int       // outside clients waiting or relayed
	pending  int       // outside clients waiting
	refused  int       // clients refused since the last log line about it
	lastWarn time.Time // when that line was written
}

// runSession authenticates an agent that sent Hello and serves its requests
// until the control connection ends.
func (s *Server) runSession(c net.Conn, hello *proto.Hello, bindIP net.IP) {
	ss := &session{
		s:        s,
		conn:     c,
		br:       bufio.NewReader(c),
		bindIP:   bindIP,
		log:      s.log.With("agent", c.RemoteAddr().String()),
		remote:   c.RemoteAddr().String(),
		software: hello.Agent,
		done:     make(chan struct{}),
		tunnels:  make(map[uint32]*tunnel),
	}
	if err := ss.handshake(); err != nil {
		s.count.handshakeFails.Add(1)
		ss.log.Warn("agent handshake failed", "err", err)
		s.closeConn(c)
		return
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ss.send(&proto.Error{Code: proto.CodeShuttingDown, Message: "relay shutting down"})
		s.closeConn(c)
		return
	}
	// From here the session, not the conn set, owns c.
	s.count.agents.Add(1)
	ss.since = time.Now()
	delete(s.conns, c)
	s.sessions[ss] = struct{}{}
	if max := s.cfg.maxPool(); max > 0 {
		ss.poolKey = proto.NewToken()
		s.poolKeys[ss.poolKey] = ss
	}
	s.mu.Unlock()
	ss.log.Info("agent connected", "software", hello.Agent)
	if max := s.cfg.maxPool(); max > 0 {
		if err := ss.send(&proto.PoolKey{Key: ss.poolKey, Max: uint16(max)}); err != nil {
			ss.close()
			ss.log.Info("agent disconnected", "reason", err)
			return
		}
	}

	if hb := s.cfg.heartbeat(); hb > 0 {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			ss.pingLoop(hb)
		}()
	}
	err := ss.readLoop()
	ss.close()
	ss.log.Info("agent disconnected", "reason", err)
}

// handshake runs challenge-response authentication under the deadline that
// handleConn set, and clears the deadline when it succeeds.
func (ss *session) handshake() error {
	nonce := proto.NewNonce()
	if err := ss.send(&proto.Challenge{Nonce: nonce}); err != nil {
		return fmt.Errorf("send challenge: %w", err)
	}
	t, payload, err := proto.ReadFrame(ss.br, nil, proto.MaxPreAuthPayload)
	if err != nil {
		return fmt.Errorf("read auth: %w", err)
	}
	if t != proto.TypeAuth {
		return fmt.Errorf("read auth: got %s frame", t)
	}
	m, err := proto.Parse(t, payload)
	if err != nil {
		return fmt.Errorf("read auth: %w", err)
	}
	if secret := ss.s.cfg.Secret; secret != "" && !proto.CheckMAC(secret, nonce, m.(*proto.Auth).MAC) {
		ss.s.count.authFails.Add(1)
		ss.send(&proto.Error{Code: proto.CodeAuthFailed, Message: "wrong or missing secret"})
		return errors.New("authentication failed: wrong or missing secret")
	}
	hb := ss.s.cfg.heartbeat()
	if err := ss.send(&proto.Welcome{HeartbeatMillis: uint32(hb.Milliseconds())}); err != nil {
		return fmt.Errorf("send welcome: %w", err)
	}
	return ss.conn.SetDeadline(time.Time{})
}

// readLoop serves the agent's requests. With heartbeats on, an agent that
// sends nothing (not even a Pong) for three heartbeats is dropped.
func (ss *session) readLoop() error {
	hb := ss.s.cfg.heartbeat()
	max := ss.s.cfg.maxFrameSize()
	buf := make([]byte, 0, 256)
	for {
		if hb > 0 {
			ss.conn.SetReadDeadline(time.Now().Add(3 * hb))
		}
		t, payload, err := proto.ReadFrame(ss.br, buf, max)
		if err != nil {
			return err
		}
		m, err := proto.Parse(t, payload)
		if errors.Is(err, proto.ErrUnknownType) {
			ss.log.Debug("skipped unknown frame", "type", t)
			continue
		}
		if err != nil {
			ss.send(&proto.Error{Code: proto.CodeBadRequest, Message: err.Error()})
			return err
		}
		switch m := m.(type) {
		case *proto.Listen:
			ss.listen(m)
		case *proto.Close:
			ss.closeTunnel(m.Tunnel)
		case *proto.Ping:
			if err := ss.send(&proto.Pong{Data: m.Data}); err != nil {
				return err
			}
		case *proto.Pong:
			// Its arrival already renewed the read deadline.
		default:
			err := fmt.Errorf("unexpected %s frame from agent", t)
			ss.send(&proto.Error{Code: proto.CodeBadRequest, Message: err.Error()})
			return err
		}
	}
}

func (ss *session) pingLoop(every time.Duration) {
	tick := time.NewTicker(every)
	defer tick.Stop()
	for seq := uint64(1); ; seq++ {
		select {
		case <-ss.done:
			return
		case <-tick.C:
			if ss.send(&proto.Ping{Data: seq}) != nil {
				ss.close()
				return
			}
		}
	}
}

// send writes one frame under the write timeout.
func (ss *session) send(m proto.Message) error {
	ss.wmu.Lock()
	defer ss.wmu.Unlock()
	ss.wbuf = proto.Append(ss.wbuf[:0], m)
	ss.conn.SetWriteDeadline(time.Now().Add(ss.s.cfg.writeTimeout()))
	_, err := ss.conn.Write(ss.wbuf)
	return err
}

// listen opens a public port and answers the agent. The tunnel starts
// accepting only after ListenOK is sent, so no Incoming can precede it.
func (ss *session) listen(req *proto.Listen) {
	s := ss.s
	ln, err := s.ports.listen(ss.bindIP, int(req.Port), req.Flags&proto.ListenPortRequired != 0)
	if err != nil {
		ss.log.Warn("listen request refused", "port", req.Port, "err", err)
		code := proto.CodePortUnavailable
		if errors.Is(err, errNoFreePort) {
			code = proto.CodeLimit
		}
		ss.send(&proto.Error{ID: req.ID, Code: code, Message: err.Error()})
		return
	}
	port := ln.Addr().(*net.TCPAddr).Port

	s.mu.Lock()
	if ss.closed {
		s.mu.Unlock()
		s.ports.close(ln)
		return
	}
	if max := s.cfg.maxTunnels(); len(ss.tunnels) >= max {
		s.mu.Unlock()
		s.ports.close(ln)
		err := fmt.Errorf("tunnel limit reached: %d per agent", max)
		ss.log.Warn("listen request refused", "err", err)
		ss.send(&proto.Error{ID: req.ID, Code: proto.CodeLimit, Message: err.Error()})
		return
	}
	ss.nextTunnel++
	t := &tunnel{id: ss.nextTunnel, sess: ss, ln: ln, port: port}
	ss.tunnels[t.id] = t
	s.mu.Unlock()

	if err := ss.send(&proto.ListenOK{ID: req.ID, Tunnel: t.id, Host: s.cfg.PublicHost, Port: uint16(port)}); err != nil {
		ss.close()
		return
	}
	ss.log.Info("tunnel opened", "tunnel", t.id, "port", port)
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.acceptLoop(ln, t.handleClient)
	}()
}

func (ss *session) closeTunnel(id uint32) {
	ss.s.mu.Lock()
	t := ss.tunnels[id]
	delete(ss.tunnels, id)
	ss.s.expireWaitingLocked(func(p *pending) bool { return p.tunnel == t })
	ss.s.mu.Unlock()
	if t == nil {
		ss.log.Debug("close for unknown tunnel", "tunnel", id)
		return
	}
	ss.s.ports.close(t.ln)
	ss.log.Info("tunnel closed by agent", "tunnel", id, "port", t.port)
}

// goAway tells the agent the relay is leaving, then closes the session.
func (ss *session) goAway(reason string) {
	ss.send(&proto.GoAway{Message: reason})
	ss.close()
}

// close ends the session: its public ports close and its waiting clients are
// closed at once. Relayed connections already joined keep running: they no
// longer need the control connection. Safe to call more than once.
func (ss *session) close() {
	s := ss.s
	s.mu.Lock()
	if ss.closed {
		s.mu.Unlock()
		return
	}
	ss.closed = true
	delete(s.sessions, ss)
	delete(s.poolKeys, ss.poolKey)
	tunnels := ss.tunnels
	ss.tunnels = nil
	pool := ss.pool
	ss.pool = nil
	s.expireWaitingLocked(func(p *pending) bool { return p.tunnel.sess == ss })
	s.mu.Unlock()

	// Ports first: an agent that sees its control connection end can count
	// on its port being free again, e.g. to ask for it back.
	for _, t := range tunnels {
		s.ports.close(t.ln)
	}
	for _, c := range pool {
		s.closeConn(c)
	}
	close(ss.done)
	ss.conn.Close()
}

// handleClient serves one outside client: within the tunnel's limits, it
// is joined to a parked data connection if there is one, else announced to
// the agent.
func (t *tunnel) handleClient(c net.Conn) {
	t.sess.s.count.clients.Add(1)
	if !t.admit(c) {
		return
	}
	if t.bindPooled(c) {
		return
	}
	t.announce(c)
}

// admit counts c against the tunnel's connection limit, or refuses it.
func (t *tunnel) admit(c net.Conn) bool {
	s := t.sess.s
	s.mu.Lock()
	var why string
	switch {
	case t.sess.closed:
		why = "tunnel closed"
	case t.conns >= s.cfg.maxConns():
		why = "tunnel at its connection limit"
	default:
		t.conns++
		s.mu.Unlock()
		return true
	}
	n := t.refusedLocked()
	s.mu.Unlock()
	s.count.refused.Add(1)
	s.closeConn(c)
	t.logRefused(why, n)
	return false
}

// announce sends Incoming for c and parks it until the agent's data
// connection claims it or the pickup timeout closes it.
func (t *tunnel) announce(c net.Conn) {
	s := t.sess.s
	p := &pending{token: proto.NewToken(), client: c, tunnel: t}
	p.timer = time.AfterFunc(s.cfg.pickupTimeout(), func() {
		if s.takePending(p.token) != nil {
			s.count.pickupTimeouts.Add(1)
			t.sess.log.Warn("closed outside client: no data connection from the agent in time",
				"tunnel", t.id, "client", c.RemoteAddr().String())
			s.dropClient(p)
		}
	})
	s.mu.Lock()
	if closed := t.sess.closed; closed || t.pending >= s.cfg.maxPending() {
		n := 0
		if !closed {
			n = t.refusedLocked()
		}
		s.mu.Unlock()
		s.dropClient(p)
		if !closed {
			s.count.refused.Add(1)
			t.logRefused("tunnel at its limit of clients waiting for the agent", n)
		}
		return
	}
	t.pending++
	s.pending[p.token] = p
	s.mu.Unlock()
	s.count.poolMisses.Add(1)

	err := t.sess.send(&proto.Incoming{Tunnel: t.id, Token: p.token,
		Client: c.RemoteAddr().String(), Local: c.LocalAddr().String()})
	if err != nil {
		t.sess.close() // its waiting clients, c among them, are closed after the grace
	}
}

func (t *tunnel) logRefused(why string, n int) {
	if n > 0 {
		s := t.sess.s
		t.sess.log.Warn("closed outside client: "+why, "tunnel", t.id, "port", t.port,
			"conns", s.cfg.maxConns(), "pending", s.cfg.maxPending(), "refused", n)
	}
}

// refusedLocked counts a refused client and returns how many to report
// now: at most one log line per second per tunnel, so a flood past a limit
// cannot flood the log too. s.mu must be held.
func (t *tunnel) refusedLocked() int {
	t.refused++
	if now := time.Now(); now.Sub(t.lastWarn) >= time.Second {
		n := t.refused
		t.refused, t.lastWarn = 0, now
		return n
	}
	return 0
}

// claimGrace is how long a waiting client outlives its tunnel. The agent
// may already have accepted it: its data connection, racing the end of the
// control connection on another socket, can still claim it.
const claimGrace = time.Second

// expireWaitingLocked gives the waiting clients that match claimGrace (or
// what is left of the pickup timeout, if less) before they are closed.
// s.mu must be held.
func (s *Server) expireWaitingLocked(match func(*pending) bool) {
	for _, p := range s.pending {
		if match(p) {
			p.timer.Reset(min(claimGrace, s.cfg.pickupTimeout()))
		}
	}
}

// dropClient closes an outside client that will not be relayed and frees
// its place in its tunnel.
func (s *Server) dropClient(p *pending) {
	p.timer.Stop()
	s.closeConn(p.client)
	s.mu.Lock()
	p.tunnel.conns--
	s.mu.Unlock()
}

// errNoFreePort means every port of the allowed range is taken.
var errNoFreePort = errors.New("no free public port in the allowed range")

// portAllocator hands out public ports. With a range it walks the range
// round-robin, so a port just released is the last to be reused: an agent
// that reconnects has the best chance to get its old port back.
type portAllocator struct {
	mu             sync.Mutex
	min, max, next int
	used           map[int]bool
}

func (pa *portAllocator) listen(ip net.IP, want int, required bool) (net.Listener, error) {
	pa.mu.Lock()
	defer pa.mu.Unlock()
	bind := func(port int) (net.Listener, error) {
		return net.ListenTCP("tcp", &net.TCPAddr{IP: ip, Port: port})
	}
	if pa.min == 0 && pa.max == 0 {
		if want != 0 {
			ln, err := bind(want)
			if err == nil || required {
				return ln, err
			}
		}
		return bind(0)
	}
	if want != 0 {
		var err error
		switch {
		case want < pa.min || want > pa.max:
			err = fmt.Errorf("port %d is outside the allowed range %d-%d", want, pa.min, pa.max)
		case pa.used[want]:
			err = fmt.Errorf("port %d is in use", want)
		default:
			var ln net.Listener
			if ln, err = bind(want); err == nil {
				pa.used[want] = true
				return ln, nil
			}
		}
		if required {
			return nil, err
		}
	}
	for range pa.max - pa.min + 1 {
		port := pa.next
		pa.next++
		if pa.next > pa.max {
			pa.next = pa.min
		}
		if pa.used[port] {
			continue
		}
		if ln, err := bind(port); err == nil {
			pa.used[port] = true
			return ln, nil
		}
	}
	return nil, fmt.Errorf("%w (%d-%d)", errNoFreePort, pa.min, pa.max)
}

// close closes a public listener and returns its port to the range.
func (pa *portAllocator) close(ln net.Listener) {
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	pa.mu.Lock()
	delete(pa.used, port)
	pa.mu.Unlock()
}
