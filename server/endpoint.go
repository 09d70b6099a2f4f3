package server

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"iter"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"tcprelay/internal/proto"
)

// endpoint is what outside clients connect to: a public port. It owns the
// listener, the admission limits and the client count, and it is served by
// its members. It belongs to an owner and outlives its members: when the
// last one leaves without releasing it, the endpoint closes its listener
// but stays reserved for its owner for Config.PortGrace, and only the owner
// can claim it back.
type endpoint struct {
	s     *Server
	port  int    // its public port: the shared port's for a name
	host  string // its name on the shared port (see ServeNames), or empty
	owner string // who may claim it back: "key:..." for an identity, "resume:..." for a token, "pool:..." or "secret-pool:..."
	pool  string // the pool it serves; empty: one agent's own
	// secret: it was opened by an agent the secret admitted (see
	// session.secretClass); a pool's members are all of that class.
	secret bool

	// Guarded by s.mu.
	group    string       // whose share of the agents' budget its listener counts in (see session.group)
	src      netip.Addr   // the address of the agent that opened it last
	ln       net.Listener // nil while reserved
	until    time.Time    // while reserved: when the reservation ends
	expiry   *time.Timer  // ends the reservation
	closed   bool         // released for good
	cut      bool         // outside its owner's scope: released, not reserved, when its last member leaves
	members  []*member
	conns    int                // outside clients waiting or relayed
	bySource map[netip.Addr]int // the same, by source address (with a limit on it)
	pending  int                // outside clients waiting
	denied   int                // outside clients closed by the access lists
	draining bool               // the operator stopped its new clients (DrainEndpoint)
	// bytesDone is what the endpoint's links that ended relayed (the live
	// ones' bytes are in their Progress).
	bytesDone byteCount
	// For the status page's charts (history.go): the most clients at once
	// since the last sample, and the samples.
	peak int
	hist *history
}

// member is one session's registration serving an endpoint. It owns its
// in-flight clients (waiting for it, or relayed through it); its session
// owns the control connection and the pre-opened data connections.
type member struct {
	id   uint32 // the tunnel id in its session's messages
	sess *session
	ep   *endpoint

	// Guarded by s.mu.
	allow, deny []netip.Prefix // its agent's own access lists (Listen.Allow, Listen.Deny)

	removed bool // no longer serves ep: it gets no new clients
	cut     bool // ended by a revocation or a narrowed scope: its waiting clients go at once, unclaimed
	ready   bool // its agent says it can take clients
	clients int  // outside clients waiting for it or relayed through it
}

// requestError is a refused request, with the code the agent gets.
type requestError struct {
	code uint16
	msg  string
}

func (e *requestError) Error() string { return e.msg }

func refusal(code uint16, format string, a ...any) error {
	return &requestError{code, fmt.Sprintf(format, a...)}
}

// resumeOwner is the owner string of a resume token: its hash, so neither
// the state file nor memory holds a credential.
func resumeOwner(tok [proto.TokenLen]byte) string {
	h := sha256.Sum256(tok[:])
	return "resume:" + hex.EncodeToString(h[:])
}

// register serves a Listen: it joins the session to the endpoint it asks
// for (a pool's, or a reserved one it owns, reopened) or to a new one. The
// endpoint accepts nothing until it is started on ln. resume is the token
// for the agent's next claim (zero for an identity, whose key is its
// claim, and for a pool, which anyone allowed may join).
func (ss *session) register(req *proto.Listen) (m *member, ln net.Listener, resume [proto.TokenLen]byte, err error) {
	s := ss.s
	allow, err := proto.ParsePrefixes(req.Allow)
	if err != nil {
		return nil, nil, resume, refusal(proto.CodeBadRequest, "allow: %v", err)
	}
	deny, err := proto.ParsePrefixes(req.Deny)
	if err != nil {
		return nil, nil, resume, refusal(proto.CodeBadRequest, "deny: %v", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if ss.closed || s.draining {
		return nil, nil, resume, refusal(proto.CodeShuttingDown, "relay shutting down")
	}
	var name string
	if req.Hostname != "" {
		if name, err = ss.checkNameLocked(req); err != nil {
			return nil, nil, resume, err
		}
	}
	var ep *endpoint
	switch {
	case req.Pool != "":
		ep, err = ss.poolLocked(req, name)
	case name != "":
		ep, err = ss.claimNameLocked(req, name)
	default:
		ep, err = ss.claimLocked(req)
	}
	if err != nil {
		return nil, nil, resume, err
	}
	owner := poolOwner(req.Pool, ss.secretClass())
	switch {
	case req.Pool != "":
	case ss.id != nil:
		owner = ss.id.owner
	default:
		resume = proto.NewToken()
		owner = resumeOwner(resume)
	}
	if ep == nil || ep.ln == nil {
		if ep == nil {
			if err := ss.checkTunnelLimitLocked(); err != nil {
				return nil, nil, resume, err
			}
		}
		if !s.agentRoomLocked(ss) {
			return nil, nil, resume, refusal(proto.CodeLimit, "relay busy: at its budget for agents (%d descriptors), or your share of it; retry later", s.budget.agents)
		}
	}
	switch {
	case ep != nil:
		if err := ep.reopenLocked(ss.bindIP); err != nil {
			return nil, nil, resume, err
		}
	case name != "":
		ep = &endpoint{s: s, ln: nameListener{name}, port: s.namesPort, host: name, pool: req.Pool, secret: ss.secretClass()}
		s.names[name] = ep
	default:
		var allowed func(int) bool
		if len(ss.tenant.Ports) > 0 {
			allowed = ss.tenant.allowsPort
		}
		ln, err := s.ports.listen(ss.bindIP, int(req.Port), req.Flags&proto.ListenPortRequired != 0 || req.Pool != "", allowed)
		if err != nil {
			code := proto.CodePortUnavailable
			if errors.Is(err, errNoFreePort) {
				code = proto.CodeLimit
			}
			return nil, nil, resume, &requestError{code, err.Error()}
		}
		ep = &endpoint{s: s, ln: ln, port: ln.Addr().(*net.TCPAddr).Port, pool: req.Pool, secret: ss.secretClass()}
		s.endpoints[ep.port] = ep
	}
	if len(ep.members) == 0 {
		ep.group, ep.src = ss.group(), ss.src
	}
	ep.owner = owner // a claim by token gets a fresh one
	ss.nextID++
	m = &member{id: ss.nextID, sess: ss, ep: ep, ready: req.Flags&proto.ListenUnready == 0, allow: allow, deny: deny}
	ss.members[m.id] = m
	ep.members = append(ep.members, m)
	return m, ep.ln, resume, nil
}

// poolLocked returns the endpoint of the pool a Listen asks to join,
// reopened if it was reserved; nil if the pool has none yet. The pool's
// port, or name, is the one its first member got: a request for another is
// refused, never silently moved. name is the request's full name, if any.
func (ss *session) poolLocked(req *proto.Listen, name string) (*endpoint, error) {
	s := ss.s
	if !ss.tenant.allowsPool(req.Pool) {
		return nil, refusal(proto.CodePortUnavailable, "pool %q is not allowed for this agent (its pools=%s)", req.Pool, strings.Join(ss.tenant.Pools, ","))
	}
	// The agents of the agents file and those of the secret have pools of
	// their own: one name on each side is two pools, so neither side can
	// join, nor take first, a pool of the other.
	var ep *endpoint
	for e := range s.allEndpointsLocked() {
		if e.pool == req.Pool && e.secret == ss.secretClass() {
			ep = e
		}
	}
	switch {
	case ep == nil && name != "" && s.names[name] != nil:
		return nil, ss.heldElsewhereLocked(s.names[name])
	case ep == nil && name == "" && req.Port != 0 && s.endpoints[int(req.Port)] != nil:
		return nil, ss.heldElsewhereLocked(s.endpoints[int(req.Port)])
	case ep == nil:
		return nil, nil
	case ep.host != "" && !ss.tenant.allowsHost(ep.host, s.cfg.NamesDomain):
		return nil, refusal(proto.CodePortUnavailable, "%s is not allowed for this agent", ep.what())
	case name != "" && name != ep.host:
		return nil, refusal(proto.CodePortUnavailable, "pool %q is on %s, not name %s", req.Pool, ep.what(), name)
	case name == "" && ep.host != "" && req.Port != 0:
		return nil, refusal(proto.CodePortUnavailable, "pool %q is on %s, not port %d", req.Pool, ep.what(), req.Port)
	case name == "" && req.Port != 0 && int(req.Port) != ep.port:
		return nil, refusal(proto.CodePortUnavailable, "pool %q is on port %d, not %d", req.Pool, ep.port, req.Port)
	}
	for _, m := range ep.members {
		if m.sess == ss {
			return nil, refusal(proto.CodeBadRequest, "this session is already a member of pool %q", req.Pool)
		}
	}
	return ep, nil
}

// heldElsewhereLocked is the refusal of a port that ep holds, for an agent
// that asked for it by number and may not have it. Another tenant's port is
// "not allowed", like one outside the agent's scope: the refusal does not
// tell who holds what.
func (ss *session) heldElsewhereLocked(ep *endpoint) error {
	switch {
	case ep.pool != "" && ss.mayJoinLocked(ep):
		return refusal(proto.CodePortUnavailable, "%s serves pool %q: join it with that pool name", ep.what(), ep.pool)
	case ep.pool != "" || !ss.tenantHolds(ep):
		return refusal(proto.CodePortUnavailable, "%s is not allowed for this agent", ep.what())
	case ep.ln != nil:
		return refusal(proto.CodePortUnavailable, "%s is in use", ep.what())
	}
	return refusal(proto.CodePortReserved, "%s is reserved for its previous owner for another %v",
		ep.what(), time.Until(ep.until).Round(time.Second))
}

// what names ep in messages: "port 40000", or "name db.example.com".
func (ep *endpoint) what() string {
	if ep.host != "" {
		return "name " + ep.host
	}
	return "port " + strconv.Itoa(ep.port)
}

// checkNameLocked returns the full name a Listen asks for, or why it may
// not have it: the relay has no shared port, the name is malformed, or the
// agent's scope (hosts=) leaves it out. A name another tenant holds is
// refused in the same words as one outside the scope (heldElsewhereLocked).
func (ss *session) checkNameLocked(req *proto.Listen) (string, error) {
	s := ss.s
	if s.cfg.NamesDomain == "" || s.namesPort == 0 {
		return "", refusal(proto.CodeUnsupported, "this relay routes no names: it has no shared TLS port (-sni-addr)")
	}
	if req.Port != 0 {
		return "", refusal(proto.CodeBadRequest, "a name and a port exclude each other: the name's port is the shared one, %d", s.namesPort)
	}
	name, err := proto.FullHostname(req.Hostname, s.cfg.NamesDomain)
	if err != nil {
		return "", refusal(proto.CodeBadRequest, "hostname %q: %v", req.Hostname, err)
	}
	switch short := strings.TrimSuffix(name, "."+strings.ToLower(s.cfg.NamesDomain)); {
	case strings.Trim(short, "0123456789") == "":
		// The operator's commands and /ready/ would read it as a port.
		return "", refusal(proto.CodeBadRequest, "hostname %q: a name of digits alone reads as a port; add a letter", req.Hostname)
	case s.isRelayName(name):
		return "", refusal(proto.CodePortUnavailable, "name %s is the relay's own", name)
	}
	if !ss.tenant.allowsHost(name, s.cfg.NamesDomain) {
		return "", refusal(proto.CodePortUnavailable, "name %s is not allowed for this agent", name)
	}
	return name, nil
}

// claimNameLocked returns the endpoint of name, not a pool's, if the
// session may have it back (reserved for it); nil if no endpoint has the
// name. A name is never swapped for another: any other case is refused.
func (ss *session) claimNameLocked(req *proto.Listen, name string) (*endpoint, error) {
	ep := ss.s.names[name]
	switch {
	case ep == nil:
		return nil, nil
	case ep.pool != "" || !ss.tenantHolds(ep) || ep.ln != nil || !ss.owns(ep, req.Resume):
		return nil, ss.heldElsewhereLocked(ep)
	}
	return ep, nil
}

// allEndpointsLocked yields every endpoint, those of ports and those of
// names. s.mu must be held.
func (s *Server) allEndpointsLocked() iter.Seq[*endpoint] {
	return func(yield func(*endpoint) bool) {
		for _, ep := range s.endpoints {
			if !yield(ep) {
				return
			}
		}
		for _, ep := range s.names {
			if !yield(ep) {
				return
			}
		}
	}
}

// mayJoinLocked reports whether ss may join pool endpoint ep: its tenant's
// scope names the pool, and the pool's members are of its class.
func (ss *session) mayJoinLocked(ep *endpoint) bool {
	return ss.tenant.allowsPool(ep.pool) && ep.secret == ss.secretClass()
}

// tenantHolds reports whether ep, not a pool's, is held by ss's tenant: its
// identity's key, or a resume token of an agent without a key.
func (ss *session) tenantHolds(ep *endpoint) bool {
	if ss.id != nil {
		return ep.owner == ss.id.owner
	}
	return strings.HasPrefix(ep.owner, "resume:")
}

// poolOwner is the owner string of a pool's port: of the agents of the
// agents file, or of those the secret admits.
func poolOwner(pool string, secret bool) string {
	if secret {
		return "secret-pool:" + pool
	}
	return "pool:" + pool
}

// claimLocked returns the endpoint a Listen (without a pool) asks for if it
// exists and the session may have it, reopening it if it was reserved; nil
// if the port is not an endpoint's. An identity asking for any port gets
// back one it reserved, so a restarted agent keeps its address.
func (ss *session) claimLocked(req *proto.Listen) (*endpoint, error) {
	s := ss.s
	var ep *endpoint
	if req.Port != 0 {
		ep = s.endpoints[int(req.Port)]
	} else if ss.id != nil {
		for _, e := range s.endpoints {
			if e.ln == nil && e.owner == ss.id.owner && ss.tenant.allowsPort(e.port) && (ep == nil || e.until.After(ep.until)) {
				ep = e
			}
		}
	}
	required := req.Flags&proto.ListenPortRequired != 0
	switch {
	case ep == nil:
		return nil, nil
	case required && (ep.pool != "" || !ss.tenantHolds(ep) || ep.ln != nil || !ss.owns(ep, req.Resume)):
		return nil, ss.heldElsewhereLocked(ep)
	case ep.pool != "" || ep.ln != nil || !ss.owns(ep, req.Resume):
		return nil, nil // not required: the agent gets another port
	}
	return ep, nil
}

// reopenLocked binds a reserved endpoint's port again, on ip; an open one
// is left as it is.
func (ep *endpoint) reopenLocked(ip net.IP) error {
	if ep.ln != nil {
		return nil
	}
	var ln net.Listener = nameListener{ep.host}
	if ep.host == "" {
		var err error
		if ln, err = ep.s.ports.rebind(ip, ep.port); err != nil {
			return refusal(proto.CodePortUnavailable, "%v", err)
		}
	}
	ep.ln, ep.until = ln, time.Time{}
	if ep.expiry != nil {
		ep.expiry.Stop()
	}
	return nil
}

// owns reports whether the session may claim ep back: it is the same
// identity, or it shows the token that ep's owner was given.
func (ss *session) owns(ep *endpoint, resume [proto.TokenLen]byte) bool {
	if ss.id != nil {
		return ep.owner == ss.id.owner
	}
	return resume != [proto.TokenLen]byte{} && ep.owner == resumeOwner(resume)
}

// checkTunnelLimitLocked refuses a new endpoint past the limits of the
// session's tenant: an identity's endpoints count over all its sessions,
// reserved ones included, up to its tunnels= (or the relay's per-agent
// limit); the agents without a key have that limit each, and their secret
// line's tunnels= over all of them. And every agent the secret admits
// (without a key, or with a key of its own making) counts against its
// source address's limit, the relay's per-agent one: keys cost nothing to
// make.
func (ss *session) checkTunnelLimitLocked() error {
	s, t := ss.s, ss.tenant
	all := 0
	for ep := range s.allEndpointsLocked() {
		if ep.pool == "" && ss.tenantHolds(ep) {
			all++
		}
	}
	for other := range t.sessions {
		for _, m := range other.members {
			if m.ep.pool != "" {
				all++
			}
		}
	}
	switch limit := cmp.Or(t.Tunnels, s.set.maxTunnels); {
	case ss.id != nil && all >= limit:
		return refusal(proto.CodeLimit, "tunnel limit reached: agent %s holds %d ports (tunnels=%d)", t.Name, all, limit)
	case ss.id == nil && len(ss.members) >= s.set.maxTunnels:
		return refusal(proto.CodeLimit, "tunnel limit reached: %d per agent", s.set.maxTunnels)
	case ss.id == nil && t.Tunnels > 0 && all >= t.Tunnels:
		return refusal(proto.CodeLimit, "tunnel limit reached: the agents without a key hold %d ports (tunnels=%d)", all, t.Tunnels)
	}
	if !ss.secretClass() {
		return nil
	}
	fromSrc := 0
	for ep := range s.allEndpointsLocked() {
		if ep.pool == "" && ep.secret && ep.src == ss.src {
			fromSrc++
		}
	}
	for other := range s.sessions {
		if other.secretClass() && other.src == ss.src {
			for _, m := range other.members {
				if m.ep.pool != "" {
					fromSrc++
				}
			}
		}
	}
	if fromSrc >= s.set.maxTunnels {
		return refusal(proto.CodeLimit, "tunnel limit reached: the agents of the secret from your address hold %d ports", fromSrc)
	}
	return nil
}

// start accepts outside clients in the background until the endpoint's
// listener closes.
func (ep *endpoint) start(ln net.Listener) {
	s := ep.s
	if ep.host != "" {
		return // ServeNames routes its clients
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.acceptLoop(ln, ep.servePublic)
	}()
}

// removeLocked ends m's membership: it gets no new clients. Its waiting
// clients go to another ready member (returned in moved, for the caller to
// redispatch outside s.mu), or if there is none, are closed after a grace
// (see expireWaitingLocked). If m was the endpoint's last member, the
// endpoint closes its listener and is reserved for its owner, or released
// if release is set (the agent said so), grace is off or the owner was
// revoked. The listener is returned for the caller to close outside s.mu.
// s.mu must be held.
func (m *member) removeLocked(release bool) (ln net.Listener, moved []*pending) {
	s, ep := m.sess.s, m.ep
	m.removed = true
	delete(m.sess.members, m.id)
	ep.members = slices.DeleteFunc(ep.members, func(x *member) bool { return x == m })
	switch {
	case ep.pickLocked(netip.Addr{}) != nil:
		moved = s.takeWaitingLocked(m)
	case m.cut:
		for _, p := range s.pending {
			if p.member == m {
				p.timer.Reset(0)
			}
		}
	default:
		s.expireWaitingLocked(func(p *pending) bool { return p.member == m })
	}
	if len(ep.members) > 0 || ep.ln == nil {
		return nil, moved
	}
	ln = ep.ln
	ep.ln = nil
	if release || s.set.portGrace == 0 || ep.cut {
		ep.releaseLocked()
	} else {
		ep.reserveLocked(time.Now().Add(s.set.portGrace))
	}
	return ln, moved
}

// reserveLocked keeps ep, without a listener, for its owner until until.
func (ep *endpoint) reserveLocked(until time.Time) {
	s := ep.s
	ep.until = until
	if ep.expiry == nil {
		ep.expiry = time.AfterFunc(time.Until(until), ep.expire)
	} else {
		ep.expiry.Reset(time.Until(until))
	}
	s.saveStateSoonLocked()
}

// expire ends a reservation that nobody claimed.
func (ep *endpoint) expire() {
	s := ep.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if ep.ln == nil && !ep.closed && !ep.until.After(time.Now()) {
		s.log.Info("reservation ended", "endpoint", ep.what())
		ep.releaseLocked()
	}
}

// releaseLocked gives ep's port back to the range for good.
func (ep *endpoint) releaseLocked() {
	s := ep.s
	ep.closed = true
	if ep.expiry != nil {
		ep.expiry.Stop()
	}
	switch {
	case ep.host != "":
		if s.names[ep.host] == ep {
			delete(s.names, ep.host)
		}
	case s.endpoints[ep.port] == ep:
		delete(s.endpoints, ep.port)
		s.ports.release(ep.port, nil)
	default:
		s.ports.release(ep.port, nil)
	}
	s.saveStateSoonLocked()
	if k, ok := strings.CutPrefix(ep.owner, "key:"); ok {
		if key, err := proto.ParseKey(k); err == nil {
			s.forgetLocked(s.ids[string(key)])
		}
	}
}

// admitsLocked reports whether m may be given a client from ip: its
// tenant's access lists, and its agent's own, let it in. A zero ip is any
// client. s.mu must be held.
func (m *member) admitsLocked(ip netip.Addr) bool {
	t := m.sess.tenant
	return !ip.IsValid() || admits(t.Allow, t.Deny, ip) && admits(m.allow, m.deny, ip)
}

// pickLocked chooses the member that serves the next client, from ip (zero:
// any client), or nil if none is ready and admits it: among those, the
// ones with a pre-opened data connection parked (the client then costs no
// round trip), and of two picked at random, the one with fewer clients.
// s.mu must be held.
func (ep *endpoint) pickLocked(ip netip.Addr) *member {
	var ready, parked []*member
	for _, m := range ep.members {
		if m.ready && !m.cut && m.admitsLocked(ip) {
			ready = append(ready, m)
			if len(m.sess.pool) > 0 {
				parked = append(parked, m)
			}
		}
	}
	cands := ready
	if len(parked) > 0 {
		cands = parked
	}
	switch len(cands) {
	case 0:
		return nil
	case 1:
		return cands[0]
	}
	a, b := cands[rand.IntN(len(cands))], cands[rand.IntN(len(cands))]
	if b.clients < a.clients {
		return b
	}
	return a
}
