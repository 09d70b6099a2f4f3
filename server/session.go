package server

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

	"tcprelay/internal/proto"
)

// session is one authenticated agent's control connection. It owns its
// members (one per tunnel it opened) and its pre-opened data connections.
type session struct {
	s        *Server
	ctl      *proto.Conn
	bindIP   net.IP
	log      *slog.Logger
	features proto.Features // spoken by both sides

	remote   string    // the agent's address
	software string    // what the agent says it is (Hello)
	since    time.Time // when the session was established

	// Guarded by s.mu.
	closed  bool
	members map[uint32]*member // by tunnel id
	nextID  uint32
	poolKey [proto.TokenLen]byte
	pool    []net.Conn // parked pre-opened data connections
}

// errBadRequest marks a frame the relay does not accept from an agent; the
// session ends with an Error.
var errBadRequest = errors.New("bad request")

// runSession authenticates an agent that sent Hello and serves its requests
// until the control connection ends.
func (s *Server) runSession(c net.Conn, hello *proto.Hello, bindIP net.IP) {
	ss := &session{
		s:        s,
		ctl:      proto.NewConn(c, s.set.writeTimeout, proto.MaxPreAuthPayload),
		bindIP:   bindIP,
		log:      s.log.With("agent", c.RemoteAddr().String()),
		features: hello.Features & s.features(),
		remote:   c.RemoteAddr().String(),
		software: hello.Agent,
		members:  make(map[uint32]*member),
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
		ss.ctl.Send(&proto.Error{Code: proto.CodeShuttingDown, Message: "relay shutting down"})
		s.closeConn(c)
		return
	}
	// From here the session, not the conn set, owns c.
	s.count.agents.Add(1)
	ss.since = time.Now()
	delete(s.conns, c)
	s.sessions[ss] = struct{}{}
	if ss.features&proto.FeaturePool != 0 {
		ss.poolKey = proto.NewToken()
		s.poolKeys[ss.poolKey] = ss
	}
	s.mu.Unlock()
	ss.log.Info("agent connected", "software", hello.Agent, "features", ss.features)

	err := error(nil)
	if ss.features&proto.FeaturePool != 0 {
		err = ss.ctl.Send(&proto.PoolKey{Key: ss.poolKey, Max: uint16(s.set.maxPool)})
	}
	if err == nil {
		ss.ctl.MaxPayload = s.set.maxFrameSize
		err = ss.ctl.Serve(s.set.heartbeat, ss.handle)
		if errors.Is(err, errBadRequest) || errors.Is(err, proto.ErrShortPayload) {
			ss.ctl.Send(&proto.Error{Code: proto.CodeBadRequest, Message: err.Error()})
		}
	}
	ss.close()
	ss.log.Info("agent disconnected", "reason", err)
}

// handshake runs challenge-response authentication under the deadline that
// handleConn set, and clears the deadline when it succeeds. Before Welcome
// nothing but Auth is accepted.
func (ss *session) handshake() error {
	nonce := proto.NewNonce()
	if err := ss.ctl.Send(&proto.Challenge{Nonce: nonce, Features: ss.s.features()}); err != nil {
		return fmt.Errorf("send challenge: %w", err)
	}
	m, err := ss.ctl.Read()
	if err != nil {
		return fmt.Errorf("read auth: %w", err)
	}
	auth, ok := m.(*proto.Auth)
	if !ok {
		return fmt.Errorf("read auth: got %s frame", m.Type())
	}
	if secret := ss.s.cfg.Secret; secret != "" && !proto.CheckMAC(secret, nonce, auth.MAC) {
		ss.s.count.authFails.Add(1)
		ss.ctl.Send(&proto.Error{Code: proto.CodeAuthFailed, Message: "wrong or missing secret"})
		return errors.New("authentication failed: wrong or missing secret")
	}
	if err := ss.ctl.Send(&proto.Welcome{HeartbeatMillis: uint32(ss.s.set.heartbeat.Milliseconds())}); err != nil {
		return fmt.Errorf("send welcome: %w", err)
	}
	return ss.ctl.NetConn().SetDeadline(time.Time{})
}

// handle serves one request from the agent.
func (ss *session) handle(m proto.Message) error {
	switch m := m.(type) {
	case *proto.Listen:
		ss.listen(m)
	case *proto.Close:
		ss.closeTunnel(m.Tunnel)
	default:
		return fmt.Errorf("%w: unexpected %s frame from agent", errBadRequest, m.Type())
	}
	return nil
}

// listen opens a public endpoint with this session as its member, and
// answers the agent. The endpoint starts accepting only after ListenOK is
// sent, so no Incoming can precede it.
func (ss *session) listen(req *proto.Listen) {
	s := ss.s
	refuse := func(code uint16, err error) {
		ss.log.Warn("listen request refused", "port", req.Port, "err", err)
		ss.ctl.Send(&proto.Error{ID: req.ID, Code: code, Message: err.Error()})
	}
	if unknown := req.Flags &^ proto.ListenKnownFlags; unknown != 0 {
		refuse(proto.CodeUnsupported, fmt.Errorf("listen flags 0x%x are not supported by this relay: upgrade the relay", unknown))
		return
	}
	// The limit is checked before a port is bound. A session's requests
	// are served one at a time, so it still holds when the member is added.
	s.mu.Lock()
	n := len(ss.members)
	s.mu.Unlock()
	if n >= s.set.maxTunnels {
		refuse(proto.CodeLimit, fmt.Errorf("tunnel limit reached: %d per agent", s.set.maxTunnels))
		return
	}
	ep, err := s.openEndpoint(ss.bindIP, int(req.Port), req.Flags&proto.ListenPortRequired != 0)
	if err != nil {
		code := proto.CodePortUnavailable
		if errors.Is(err, errNoFreePort) {
			code = proto.CodeLimit
		}
		refuse(code, err)
		return
	}
	m := ss.addMember(ep)
	if m == nil { // the session ended meanwhile
		s.ports.close(ep.ln)
		return
	}
	if err := ss.ctl.Send(&proto.ListenOK{ID: req.ID, Tunnel: m.id, Host: s.cfg.PublicHost, Port: uint16(ep.port)}); err != nil {
		ss.close()
		return
	}
	ss.log.Info("tunnel opened", "tunnel", m.id, "port", ep.port)
	ep.start()
}

// addMember makes the session a member of ep, or returns nil if the
// session has ended.
func (ss *session) addMember(ep *endpoint) *member {
	s := ss.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if ss.closed {
		return nil
	}
	ss.nextID++
	m := &member{id: ss.nextID, sess: ss, ep: ep}
	ss.members[m.id] = m
	ep.members = append(ep.members, m)
	s.endpoints[ep] = struct{}{}
	return m
}

// closeTunnel ends the session's membership of one endpoint.
func (ss *session) closeTunnel(id uint32) {
	s := ss.s
	s.mu.Lock()
	m := ss.members[id]
	var last *endpoint
	if m != nil {
		last = m.removeLocked()
	}
	s.mu.Unlock()
	if m == nil {
		ss.log.Debug("close for unknown tunnel", "tunnel", id)
		return
	}
	if last != nil {
		s.ports.close(last.ln)
	}
	ss.log.Info("tunnel closed by agent", "tunnel", id, "port", m.ep.port)
}

// goAway tells the agent the relay is leaving, then closes the session.
func (ss *session) goAway(reason string) {
	ss.ctl.Send(&proto.GoAway{Message: reason})
	ss.close()
}

// close ends the session: its memberships end (an endpoint left with no
// member closes its public port) and its waiting clients are closed after
// a grace. Relayed connections already joined keep running: they no longer
// need the control connection. Safe to call more than once.
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
	var emptied []*endpoint
	for _, m := range ss.members {
		if ep := m.removeLocked(); ep != nil {
			emptied = append(emptied, ep)
		}
	}
	pool := ss.pool
	ss.pool = nil
	s.mu.Unlock()

	// Ports first: an agent that sees its control connection end can count
	// on its port being free again, e.g. to ask for it back.
	for _, ep := range emptied {
		s.ports.close(ep.ln)
	}
	for _, c := range pool {
		s.closeConn(c)
	}
	ss.ctl.Close()
}

// park keeps a pre-opened data connection for the session that owns key. It
// reports whether it took ownership of c.
func (s *Server) park(c net.Conn, key [proto.TokenLen]byte) bool {
	s.mu.Lock()
	ss := s.poolKeys[key]
	ok := ss != nil && !ss.closed && len(ss.pool) < s.set.maxPool
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
// open and silent, or nil. Dead ones are closed on the way.
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
