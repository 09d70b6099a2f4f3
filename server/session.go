package server

import (
	"cmp"
	"crypto/ed25519"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/netip"
	"strconv"
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
	id       *identity      // nil: an agent without a key
	tenant   *identity      // whose scope and bounds apply: id, or the keyless tenant
	key      [proto.MACLen]byte

	sid      string     // its id for the operator (AgentInfo.ID), set by join
	remote   string     // the agent's address
	src      netip.Addr // its source, for per-source limits (see sourceOf)
	software string     // what the agent says it is (Hello)
	since    time.Time  // when the session was established
	quiet    *quietLog  // the log lines of its requests (see serve)

	ports []int    // the public ports it got, in order (its own goroutine's)
	hosts []string // the names it got on the shared port, in order (the same)

	// Guarded by s.mu.
	ended   string // why the relay ended it, if it did for a reason of its own (the access log's)
	closed  bool
	members map[uint32]*member // by tunnel id
	nextID  uint32
	poolKey [proto.TokenLen]byte
	pool    []parked            // parked pre-opened data connections
	joins   replayWindow        // PoolJoin sequence numbers seen (feature proof)
	counted map[uint64]*counted // its linked data connections, by PoolJoin number (feature reuse)
}

// errThrottled is what an address that spent its authentication tokens is
// told.
const errThrottled = "too many failed authentications from your address: retry in a few seconds"

// errBadRequest marks a frame the relay does not accept from an agent; the
// session ends with an Error.
var errBadRequest = errors.New("bad request")

// name is how logs and the status view call the session's agent.
func (ss *session) name() string {
	if ss.id != nil {
		return ss.id.Name
	}
	return ss.remote
}

// runSession authenticates an agent that sent Hello and serves its requests
// until the control connection ends.
func (s *Server) runSession(c net.Conn, hello *proto.Hello, bindIP net.IP, release func()) {
	ss := &session{
		s:        s,
		ctl:      proto.NewConn(c, s.set.writeTimeout, proto.MaxPreAuthPayload),
		bindIP:   bindIP,
		log:      s.log.With("agent", c.RemoteAddr().String()),
		features: hello.Features & s.features(),
		remote:   c.RemoteAddr().String(),
		src:      sourceOf(c),
		software: hello.Agent,
		members:  make(map[uint32]*member),
	}
	err := ss.handshake(hello)
	release()
	if err != nil {
		s.count.handshakeFails.Add(1)
		s.quiet.Warn("agent handshake failed", "err", err, "remote", ss.remote)
		s.closeConn(c)
		return
	}
	ss.tenant = s.keyless
	if ss.id != nil {
		ss.tenant = ss.id
		ss.log = s.log.With("agent", ss.id.Name, "remote", ss.remote)
	}
	if err := ss.join(); err != nil {
		s.quiet.Warn("agent refused", "err", err, "remote", ss.remote)
		var re *requestError
		if errors.As(err, &re) {
			ss.ctl.Send(&proto.Error{Code: re.code, Message: re.msg})
		}
		s.closeConn(c)
		return
	}
	ss.log.Info("agent connected", "software", hello.Agent, "features", ss.features)

	if ss.features&proto.FeaturePool != 0 {
		err = ss.ctl.Send(&proto.PoolKey{Key: ss.poolKey, Max: uint16(ss.parkLimit())})
	}
	if err == nil {
		ss.ctl.MaxPayload = s.set.maxFrameSize
		err = ss.serve()
		if errors.Is(err, errBadRequest) || errors.Is(err, proto.ErrShortPayload) {
			ss.ctl.Send(&proto.Error{Code: proto.CodeBadRequest, Message: err.Error()})
		}
	}
	ss.close()
	ss.log.Info("agent disconnected", "reason", err)
	if s.access != nil {
		rec := SessionRecord{Event: "session", Start: ss.since, End: time.Now(), Agent: ss.name(), Addr: ss.remote,
			Ports: ss.ports, Hosts: ss.hosts, Reason: ss.endReason(err)}
		if ss.id != nil {
			rec.Key = proto.FormatKey(ss.id.Key)
		}
		s.access.add(rec)
	}
}

// endReason says, for the access log, why the session ended with err.
func (ss *session) endReason(err error) string {
	s := ss.s
	s.mu.Lock()
	draining, ended := s.draining, ss.ended
	s.mu.Unlock()
	var ne net.Error
	switch {
	case ended != "":
		return ended
	case draining:
		return "relay shut down"
	case errors.Is(err, io.EOF):
		return "agent closed"
	case errors.As(err, &ne) && ne.Timeout():
		return "agent silent"
	case err == nil:
		return "closed"
	}
	return err.Error()
}

// handshake runs challenge-response authentication under the deadline that
// handleConn set, and clears the deadline when it succeeds. Before Welcome
// nothing but Auth is accepted.
func (ss *session) handshake(hello *proto.Hello) error {
	s := ss.s
	ch := &proto.Challenge{Nonce: proto.NewNonce(), Features: s.features()}
	var eph *proto.Ephemeral
	if ss.features&proto.FeatureProof != 0 && hello.Eph != ([proto.KeyLen]byte{}) {
		eph = proto.NewEphemeral()
		ch.Eph = eph.Public
	} else {
		ss.features &^= proto.FeatureProof
	}
	if err := ss.ctl.Send(ch); err != nil {
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
	// The check spends a token of the address's throttle first, so that
	// parallel handshakes get no more guesses than one after another.
	src := sourceOf(ss.ctl.NetConn())
	s.mu.Lock()
	allowed := s.auth.takeLocked(src, time.Now())
	s.mu.Unlock()
	if !allowed {
		s.count.authThrottled.Add(1)
		s.quiet.Warn("authentication refused unchecked: too many failed authentications from the address", "remote", ss.remote)
		ss.ctl.Send(&proto.Error{Code: proto.CodeLimit, Message: errThrottled})
		return errors.New("throttled: " + errThrottled)
	}
	binding := proto.TLSBinding(ss.ctl.NetConn())
	if ss.id, err = s.authenticate(ss.features, proto.IdentityMessage(ch.Nonce, hello.Eph, ch.Eph, binding), ch.Nonce, auth); err != nil {
		s.count.authFails.Add(1)
		ss.ctl.Send(&proto.Error{Code: proto.CodeAuthFailed, Message: err.Error()})
		return fmt.Errorf("authentication failed: %w", err)
	}
	s.mu.Lock()
	s.auth.refundLocked(src, time.Now())
	s.mu.Unlock()
	if eph != nil {
		if ss.key, err = eph.SessionKey(hello.Eph, ch.Nonce); err != nil {
			return fmt.Errorf("session key: %w", err)
		}
	}
	if err := ss.ctl.Send(&proto.Welcome{HeartbeatMillis: uint32(s.set.heartbeat.Milliseconds())}); err != nil {
		return fmt.Errorf("send welcome: %w", err)
	}
	return ss.ctl.NetConn().SetDeadline(time.Time{})
}

// authenticate decides who an agent is from its Auth: an identity of the
// agents file (by its key), an anonymous identity (a key on a relay
// without agents file), or nil, the shared secret's one tenant.
func (s *Server) authenticate(features proto.Features, signed []byte, nonce [proto.NonceLen]byte, auth *proto.Auth) (*identity, error) {
	var pub ed25519.PublicKey
	if features&proto.FeatureIdentity != 0 && auth.Key != ([proto.KeyLen]byte{}) {
		pub = ed25519.PublicKey(auth.Key[:])
		if !ed25519.Verify(pub, signed, auth.Sig[:]) {
			return nil, errors.New("bad signature for key " + proto.FormatKey(pub))
		}
	}
	secretOK := s.cfg.Secret != "" && proto.CheckMAC(s.cfg.Secret, nonce, auth.MAC)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cfg.Agents != nil {
		switch {
		case pub != nil && s.ids[string(pub)] != nil:
			return s.ids[string(pub)], nil
		case pub != nil:
			return nil, errors.New("unknown agent key " + proto.FormatKey(pub) + ": it is not in the relay's agents file")
		case secretOK:
			return nil, nil
		}
		return nil, errors.New("this relay admits agents by key: give the agent -key FILE and add its public key to the relay's agents file")
	}
	if s.cfg.Secret != "" && !secretOK {
		return nil, errors.New("wrong or missing secret")
	}
	if pub == nil {
		return nil, nil
	}
	id := s.ids[string(pub)]
	if id == nil {
		// Its own default scope; it shares pools with the other agents of
		// the secret, as an agent without a key does.
		id = newIdentity(Agent{Name: proto.FormatKey(pub), Key: pub, Pools: []string{"*"}}, false)
		s.ids[string(pub)] = id
	}
	return id, nil
}

// join registers an authenticated session with the relay and its identity,
// within the identity's session limit.
func (ss *session) join() error {
	s := ss.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.draining {
		return refusal(proto.CodeShuttingDown, "relay shutting down")
	}
	t := ss.tenant
	switch {
	case t.revoked:
		return refusal(proto.CodeAuthFailed, "agent %s was removed from the relay's agents file", t.Name)
	case ss.id == nil && t.Sessions > 0 && len(t.sessions) >= t.Sessions:
		return refusal(proto.CodeLimit, "the agents without a key have %d sessions already (sessions=%d)", len(t.sessions), t.Sessions)
	case ss.secretClass() && ss.fromSameSourceLocked() >= defaultSessions:
		return refusal(proto.CodeLimit, "the agents of the secret from your address have %d sessions already", defaultSessions)
	case ss.id != nil && len(t.sessions) >= cmp.Or(t.Sessions, defaultSessions):
		return refusal(proto.CodeLimit, "agent %s has %d sessions already (sessions=%d)", t.Name, len(t.sessions), cmp.Or(t.Sessions, defaultSessions))
	case !s.agentRoomLocked(ss):
		return refusal(proto.CodeLimit, "relay busy: at its budget for agents (%d connections), or your share of it; retry later", s.budget.agents)
	}
	t.sessions[ss] = struct{}{}
	// From here the session, not the conn set, owns its connection.
	ss.sid = "s" + strconv.FormatInt(s.count.agents.Add(1), 10)
	ss.since = time.Now()
	delete(s.conns, ss.ctl.NetConn())
	s.sessions[ss] = struct{}{}
	if ss.features&proto.FeaturePool != 0 {
		ss.poolKey = proto.NewToken()
		s.poolKeys[ss.poolKey] = ss
	}
	return nil
}

// handle serves one request from the agent.
func (ss *session) handle(m proto.Message) error {
	switch m := m.(type) {
	case *proto.Listen:
		ss.listen(m)
	case *proto.Close:
		ss.closeTunnel(m.Tunnel)
	case *proto.Ready:
		ss.setReady(m.Tunnel, m.Ready)
	case *proto.End:
		return ss.agentEnd(m)
	default:
		return fmt.Errorf("%w: unexpected %s frame from agent", errBadRequest, m.Type())
	}
	return nil
}

// listen opens or claims a public endpoint with this session as a member,
// and answers the agent. The endpoint starts accepting only after ListenOK
// is sent, so no Incoming can precede it.
func (ss *session) listen(req *proto.Listen) {
	s := ss.s
	refuse := func(code uint16, err error) {
		ss.quiet.Warn("listen request refused", "port", req.Port, "name", req.Hostname, "err", err)
		ss.ctl.Send(&proto.Error{ID: req.ID, Code: code, Message: err.Error()})
	}
	if unknown := req.Flags &^ proto.ListenKnownFlags; unknown != 0 {
		refuse(proto.CodeUnsupported, fmt.Errorf("listen flags 0x%x are not supported by this relay: upgrade the relay", unknown))
		return
	}
	m, ln, resume, err := ss.register(req)
	if err != nil {
		code := proto.CodeInternal
		var re *requestError
		if errors.As(err, &re) {
			code = re.code
		}
		refuse(code, err)
		return
	}
	// On disk before the agent (and its clients) rely on the port: a relay
	// killed right after still knows whose port it is.
	s.saveState(false)
	host := s.cfg.PublicHost
	if m.ep.host != "" {
		host = m.ep.host
	}
	if err := ss.ctl.Send(&proto.ListenOK{ID: req.ID, Tunnel: m.id, Host: host, Port: uint16(m.ep.port), Resume: resume}); err != nil {
		ss.close()
		return
	}
	if m.ep.host != "" {
		ss.quiet.Info("tunnel opened", "name", m.ep.host, "pool", m.ep.pool)
		ss.hosts = append(ss.hosts, m.ep.host)
	} else {
		ss.quiet.Info("tunnel opened", "port", m.ep.port, "pool", m.ep.pool)
		ss.ports = append(ss.ports, m.ep.port)
	}
	m.ep.start(ln)
}

// closeTunnel ends the session's membership of one endpoint at the agent's
// request: an endpoint left without members releases its port at once.
func (ss *session) closeTunnel(id uint32) {
	s := ss.s
	s.mu.Lock()
	m := ss.members[id]
	var ln net.Listener
	var moved []*pending
	if m != nil {
		ln, moved = m.removeLocked(true)
	}
	s.mu.Unlock()
	if m == nil {
		ss.log.Debug("close for unknown tunnel", "tunnel", id)
		return
	}
	if ln != nil {
		ln.Close()
	}
	s.redispatch(moved)
	ss.quiet.Info("tunnel closed by agent", "port", m.ep.port)
}

// setReady records whether the agent's member of a tunnel can take new
// clients, and logs a change.
func (ss *session) setReady(id uint32, ready bool) {
	s := ss.s
	s.mu.Lock()
	m := ss.members[id]
	changed := m != nil && m.ready != ready
	if changed {
		m.ready = ready
	}
	s.mu.Unlock()
	if changed {
		ss.quiet.Info("member readiness", "port", m.ep.port, "ready", ready)
	}
}

// close ends the session: its memberships end (an endpoint left with no
// member closes its public port and stays reserved for its owner) and its
// waiting clients are closed after a grace. Relayed connections already
// joined keep running: they no longer need the control connection. Safe to
// call more than once.
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
	if ss.tenant != nil {
		delete(ss.tenant.sessions, ss)
		s.forgetLocked(ss.id)
	}
	var lns []net.Listener
	var moved []*pending
	for _, m := range ss.members {
		ln, mv := m.removeLocked(false)
		if ln != nil {
			lns = append(lns, ln)
		}
		moved = append(moved, mv...)
	}
	pool := ss.pool
	ss.pool = nil
	linked := ss.counted
	ss.counted = nil
	s.mu.Unlock()

	// Ports first: an agent that sees its control connection end can count
	// on its port being closed, e.g. to claim it back.
	for _, ln := range lns {
		ln.Close()
	}
	for _, p := range pool {
		s.closeConn(p.c)
	}
	for _, c := range linked {
		c.lost()
	}
	ss.ctl.Close()
	s.redispatch(moved)
}

// parkLimit is how many pre-opened data connections the session may park:
// the relay's per-agent limit, and no more than its tenant's.
func (ss *session) parkLimit() int {
	return min(ss.s.set.maxPool, ss.tenantParkLimit())
}

// tenantParkLimit bounds the parked connections of all the sessions of
// ss's tenant: its parked=, else the relay's per-agent limit for an
// identity, and no such bound for the keyless tenant (its agents are
// bounded each, and by their address's fair share of the budget).
func (ss *session) tenantParkLimit() int {
	switch {
	case ss.tenant.Parked > 0:
		return ss.tenant.Parked
	case ss.id == nil:
		return math.MaxInt
	}
	return ss.s.set.maxPool
}

// fromSameSourceLocked counts the other sessions the secret admitted (see
// secretClass) from ss's source address. s.mu must be held.
func (ss *session) fromSameSourceLocked() int {
	n := 0
	for other := range ss.s.sessions {
		if other.secretClass() && other.src == ss.src && other != ss {
			n++
		}
	}
	return n
}

// park keeps a pre-opened data connection for the session that owns its
// key, if it proves it belongs to that session (feature proof) and the
// session and its identity have room. It reports whether it took c.
func (s *Server) park(c net.Conn, join *proto.PoolJoin) bool {
	s.mu.Lock()
	ss := s.poolKeys[join.Key]
	why := ""
	switch {
	case s.draining:
		why = "relay shutting down"
	case ss == nil || ss.closed:
		why = "unknown key"
	case ss.features&proto.FeatureProof != 0 && !proto.CheckProof(ss.key, "pool-join", join.MAC, join.Key[:], be64(join.Seq)):
		why = "bad proof"
	case ss.features&proto.FeatureProof != 0 && !ss.joins.fresh(join.Seq):
		why = "replayed"
	case !ss.roomToParkLocked():
		why = "pool full"
	default:
		p := parked{c: c}
		if ss.reusing() {
			p.seq = join.Seq
		}
		ss.pool = append(ss.pool, p)
	}
	s.mu.Unlock()
	if why != "" {
		s.dropConn(c, "pre-opened data connection refused: "+why, nil)
		return false
	}
	c.SetDeadline(time.Time{})
	s.tune(c) // once: parked again after each client, it keeps its options
	return true
}

// roomToParkLocked reports whether ss may park one more data connection:
// its own limit, its tenant's, and the agents' budget. s.mu must be held.
func (ss *session) roomToParkLocked() bool {
	return len(ss.pool) < ss.parkLimit() && ss.tenant.parkedLocked() < ss.tenantParkLimit() && ss.s.agentRoomLocked(ss)
}

// parkedLocked counts the pre-opened data connections of all the
// identity's sessions. s.mu must be held.
func (id *identity) parkedLocked() int {
	n := 0
	for ss := range id.sessions {
		n += len(ss.pool)
	}
	return n
}

// takePooled returns a parked data connection of the session that is still
// open and silent, if it has one. Dead ones are closed on the way.
func (ss *session) takePooled() (parked, bool) {
	s := ss.s
	for {
		s.mu.Lock()
		n := len(ss.pool)
		if n == 0 {
			s.mu.Unlock()
			return parked{}, false
		}
		p := ss.pool[n-1]
		ss.pool = ss.pool[:n-1]
		s.mu.Unlock()
		if idle(p.c) {
			return p, true
		}
		s.closeConn(p.c) // the agent closed it, or broke the protocol
	}
}

// be64 is v in 8 big-endian bytes.
func be64(v uint64) []byte {
	return []byte{byte(v >> 56), byte(v >> 48), byte(v >> 40), byte(v >> 32), byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}
}

// replayWindow accepts each sequence number once: numbers above the
// highest seen, and the 63 below it not seen yet (pre-opened connections
// are dialled in parallel and may arrive out of order).
type replayWindow struct {
	top  uint64 // highest number seen
	seen uint64 // bit i: top-i was seen
}

func (w *replayWindow) fresh(seq uint64) bool {
	switch {
	case seq == 0:
		return false
	case seq > w.top:
		if shift := seq - w.top; shift < 64 {
			w.seen <<= shift
		} else {
			w.seen = 0
		}
		w.seen |= 1
		w.top = seq
		return true
	case w.top-seq >= 64:
		return false
	}
	bit := uint64(1) << (w.top - seq)
	if w.seen&bit != 0 {
		return false
	}
	w.seen |= bit
	return true
}
