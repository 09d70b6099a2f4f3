package server

import (
	"math"
	"net"
	"net/netip"
	"time"

	"tcprelay/internal/copier"
	"tcprelay/internal/proto"
)

// One outside client's journey, in the order it happens (the package
// comment has it as a diagram):
//
//	serveClient → admit → bindPooled → link → linkDone
//	                    ↘ announce → (attach | pickupTimeout) → link → linkDone

// servePublic is serveClient for a client of ep's own public port.
func (ep *endpoint) servePublic(c net.Conn) func() {
	ep.s.tunePublic(c)
	return ep.serveClient(c)
}

// serveClient takes one outside client accepted on an endpoint's public
// port: within the endpoint's limits (checked here, in accept order) it is
// joined to a pre-opened data connection of the chosen member if there is
// one, else announced to that member's agent (in the returned function,
// which the accept loop runs in a goroutine of its own).
func (ep *endpoint) serveClient(c net.Conn) func() {
	s := ep.s
	s.count.clients.Add(1)
	accepted := time.Now()
	if tc, ok := c.(*net.TCPConn); ok && s.viaTrustedProxy(c) {
		// Its PROXY header first, in the goroutine: a slow proxy must not
		// hold up the accept loop.
		return func() {
			if c := ep.readProxied(tc, accepted); c != nil {
				if m := ep.admit(c); m != nil {
					s.relayAdmitted(m, c, accepted)
				}
			}
		}
	}
	m := ep.admit(c)
	if m == nil {
		return nil
	}
	return func() { s.relayAdmitted(m, c, accepted) }
}

// relayAdmitted is relay for a client admit let in: a Shutdown waits for
// it until it is linked or waiting (see joining).
func (s *Server) relayAdmitted(m *member, client net.Conn, since time.Time) {
	defer s.joined()
	s.relay(m, client, since)
}

// joined says a client counted in joining is linked, waiting, or gone.
func (s *Server) joined() {
	s.mu.Lock()
	s.joining--
	s.wakeLocked()
	s.mu.Unlock()
}

// relay joins client, accepted at since, to m's agent: through a parked
// data connection if it has one, else announced.
func (s *Server) relay(m *member, client net.Conn, since time.Time) {
	if !s.bindPooled(m, client, since) {
		s.announce(m, client, since)
	}
}

// readProxied reads the PROXY header of a client that came through a
// trusted proxy and returns the client with its true address, or closes it
// and returns nil.
func (ep *endpoint) readProxied(c *net.TCPConn, accepted time.Time) net.Conn {
	s := ep.s
	pc, err := readProxyHeader(c, s.set.handshakeTimeout)
	if err != nil {
		s.count.refused.Add(1)
		s.closeConn(c)
		s.quiet.Warn("closed outside client: a bad PROXY header from a trusted proxy", "port", ep.port, "proxy", c.RemoteAddr().String(), "err", err)
		s.logUnrelayed(ep, nil, c, accepted, "refused: bad PROXY header")
		return nil
	}
	s.mu.Lock()
	delete(s.conns, c)
	s.conns[pc] = struct{}{}
	s.mu.Unlock()
	return pc
}

// viaTrustedProxy reports whether c comes from a peer of
// Config.ProxyProtocolFrom, which starts it with a PROXY header.
func (s *Server) viaTrustedProxy(c net.Conn) bool {
	ip := clientIP(c)
	for _, p := range s.cfg.ProxyProtocolFrom {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// admit counts c against the endpoint's limits and the relay's budget, and
// picks the member to serve it, or closes c and returns nil.
func (ep *endpoint) admit(c net.Conn) *member {
	s := ep.s
	src, ip := sourceOf(c), clientIP(c)
	s.mu.Lock()
	var why string
	var m *member
	switch {
	case ep.closed:
		why = "tunnel closed"
	case ep.draining:
		why = "tunnel draining"
	case !ep.admitsLocked(ip):
		ep.denied++
		s.mu.Unlock()
		s.count.denied.Add(1)
		s.closeConn(c)
		s.quiet.Warn("closed outside client: not allowed by the tunnel's access lists", "port", ep.port, "client", c.RemoteAddr().String())
		s.logUnrelayed(ep, nil, c, time.Now(), "denied")
		return nil
	case ep.conns >= s.set.maxConns:
		why = "tunnel at its connection limit"
	case ep.bySource[src] >= s.set.maxPerSource:
		why = "source address at its limit of clients on this tunnel"
	case !s.clientRoomLocked(ep):
		why = "relay at its budget of clients: this tunnel has its fair share"
	default:
		if m = ep.pickLocked(ip); m == nil {
			why = "tunnel has no ready agent"
			break
		}
		ep.addClientLocked(src, 1)
		m.clients++
		s.joining++ // until relayAdmitted has linked or announced it
		s.mu.Unlock()
		return m
	}
	s.mu.Unlock()
	s.count.refused.Add(1)
	s.closeConn(c)
	s.quiet.Warn("closed outside client: "+why, "port", ep.port, "client", c.RemoteAddr().String())
	s.logUnrelayed(ep, nil, c, time.Now(), "refused: "+why)
	return nil
}

// admitsLocked reports whether a client from ip may reach ep: one of its
// members' access lists let it in (or it has no member yet). s.mu must be
// held.
func (ep *endpoint) admitsLocked(ip netip.Addr) bool {
	for _, m := range ep.members {
		if m.admitsLocked(ip) {
			return true
		}
	}
	return len(ep.members) == 0
}

// clientIP is the address an outside client connects from, whole (access
// lists match it exactly, where per-source limits group IPv6 by /64).
func clientIP(c net.Conn) netip.Addr {
	if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		ip, _ := netip.AddrFromSlice(a.IP)
		return ip.Unmap()
	}
	return netip.Addr{}
}

// logUnrelayed writes the access log's line for an outside client that
// was closed before it was relayed; m is the member it waited for, if
// any.
func (s *Server) logUnrelayed(ep *endpoint, m *member, c net.Conn, since time.Time, reason string) {
	if s.access == nil {
		return
	}
	rec := ConnRecord{Event: "connection", Start: since, End: time.Now(), Port: ep.port, Host: ep.host, Pool: ep.pool,
		Client: c.RemoteAddr().String(), Reason: reason}
	if m != nil {
		rec.Agent, rec.AgentAddr = m.sess.name(), m.sess.remote
	}
	s.access.add(rec)
}

// addClientLocked counts delta outside clients from src on ep, in the
// endpoint's and the relay's totals. s.mu must be held.
func (ep *endpoint) addClientLocked(src netip.Addr, delta int) {
	s := ep.s
	before := ep.conns
	ep.conns += delta
	ep.peak = max(ep.peak, ep.conns)
	s.clientsTotal += delta
	switch {
	case before == 0 && ep.conns > 0:
		s.activeEndpoints++
	case before > 0 && ep.conns == 0:
		s.activeEndpoints--
	}
	if s.set.maxPerSource == math.MaxInt {
		return
	}
	if ep.bySource == nil {
		ep.bySource = make(map[netip.Addr]int)
	}
	if ep.bySource[src] += delta; ep.bySource[src] <= 0 {
		delete(ep.bySource, src)
	}
}

// bindPooled joins client, accepted at since, to a parked data connection
// of m's session if it has one, and reports whether it did. The Bind frame
// tells the agent which tunnel and client it is; the bytes after it are
// the client's.
func (s *Server) bindPooled(m *member, client net.Conn, since time.Time) bool {
	for {
		p, ok := m.sess.takePooled()
		if !ok {
			return false
		}
		data := p.c
		frame := proto.Append(nil, &proto.Bind{Tunnel: m.id,
			Client: client.RemoteAddr().String(), Local: client.LocalAddr().String()})
		frame = append(frame, clientHead(client)...) // in the same segment
		data.SetWriteDeadline(time.Now().Add(s.set.writeTimeout))
		if _, err := data.Write(frame); err != nil {
			s.closeConn(data)
			continue
		}
		data.SetWriteDeadline(time.Time{})
		s.count.poolHits.Add(1)
		s.link(m, client, data, since, p.seq)
		return true
	}
}

// pending is an outside client waiting for its agent's data connection.
type pending struct {
	token  [proto.TokenLen]byte
	client net.Conn
	member *member
	since  time.Time   // when the relay accepted the client (for the status views)
	timer  *time.Timer // the pickup timeout; set under s.mu with the entry
}

// announce sends Incoming for c, accepted at since, to m's agent and keeps
// c waiting until the agent's data connection claims it (attach) or the
// pickup timeout closes it.
func (s *Server) announce(m *member, c net.Conn, since time.Time) {
	p := &pending{token: proto.NewToken(), client: c, member: m, since: since}
	ep := m.ep
	s.mu.Lock()
	if removed := m.removed; removed || ep.pending >= s.set.maxPending {
		s.mu.Unlock()
		why := "no agent"
		if !removed {
			why = "refused: tunnel at its limit of clients waiting for the agent"
		}
		s.dropClient(p, why)
		if !removed {
			s.count.refused.Add(1)
			s.quiet.Warn("closed outside client: tunnel at its limit of clients waiting for the agent",
				"port", ep.port, "client", c.RemoteAddr().String(), "pending", s.set.maxPending)
		}
		return
	}
	ep.pending++
	s.pending[p.token] = p
	// The timer starts once the entry exists, so whenever it fires it
	// finds the entry, or finds it already claimed.
	p.timer = time.AfterFunc(s.set.pickupTimeout, func() { s.pickupTimeout(p) })
	s.mu.Unlock()
	s.count.poolMisses.Add(1)

	err := m.sess.ctl.Send(&proto.Incoming{Tunnel: m.id, Token: p.token,
		Client: c.RemoteAddr().String(), Local: c.LocalAddr().String()})
	if err != nil {
		m.sess.close() // its waiting clients, c among them, are closed after the grace
	}
}

// attach joins a data connection to the outside client waiting for its
// token, if it proves it belongs to the token's session (feature proof).
// It reports whether it took ownership of c.
func (s *Server) attach(c net.Conn, a *proto.Attach) bool {
	p := s.takePending(a.Token, func(p *pending) bool {
		ss := p.member.sess
		ok := !p.member.cut && (ss.features&proto.FeatureProof == 0 || proto.CheckProof(ss.key, "attach", a.MAC, a.Token[:]))
		if ok {
			s.joining++ // under s.mu, with the pending client's removal
		}
		return ok
	})
	if p == nil {
		s.dropConn(c, "data connection with an unknown, used or expired token, or no proof of its session", nil)
		return false
	}
	// Until the link holds the client, a Shutdown waits for it as for a
	// client still waiting: it would close both conns.
	defer s.joined()
	p.timer.Stop()
	if head := clientHead(p.client); len(head) > 0 {
		c.SetWriteDeadline(time.Now().Add(s.set.writeTimeout))
		if _, err := c.Write(head); err != nil {
			s.dropConn(c, "data connection failed before its client's first bytes", err)
			s.dropClient(p, "agent failed")
			return false
		}
	}
	c.SetDeadline(time.Time{})
	s.tune(c)
	s.link(p.member, p.client, c, p.since, 0)
	return true
}

// takePending removes and returns the client waiting for token, or nil;
// with ok set, only if ok accepts it (a refused claim leaves the token to
// its owner). A token is usable once: whoever takes it first owns the
// client.
func (s *Server) takePending(token [proto.TokenLen]byte, ok func(*pending) bool) *pending {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.pending[token]
	if p != nil && ok != nil && !ok(p) {
		return nil
	}
	if p != nil {
		delete(s.pending, token)
		p.member.ep.pending--
		s.wakeLocked()
	}
	return p
}

// pickupTimeout closes a client that no data connection claimed in time.
func (s *Server) pickupTimeout(p *pending) {
	if s.takePending(p.token, nil) == nil {
		return // claimed, or the server closed
	}
	s.count.pickupTimeouts.Add(1)
	p.member.sess.log.Warn("closed outside client: no data connection from the agent in time",
		"port", p.member.ep.port, "client", p.client.RemoteAddr().String())
	s.dropClient(p, "pickup timeout")
}

// claimGrace is how long a waiting client outlives its member. The agent
// may already have accepted it: its data connection, racing the end of the
// control connection on another socket, can still claim it.
const claimGrace = time.Second

// expireWaitingLocked gives the waiting clients that match claimGrace (or
// what is left of the pickup timeout, if less) before they are closed.
// s.mu must be held.
func (s *Server) expireWaitingLocked(match func(*pending) bool) {
	for _, p := range s.pending {
		if match(p) {
			p.timer.Reset(min(claimGrace, s.set.pickupTimeout))
		}
	}
}

// takeWaitingLocked takes the clients waiting for m out of the waiting set,
// for redispatch: their tokens die, and their places in the endpoint are
// kept. s.mu must be held.
func (s *Server) takeWaitingLocked(m *member) []*pending {
	var moved []*pending
	for tok, p := range s.pending {
		if p.member == m {
			delete(s.pending, tok)
			p.timer.Stop()
			m.ep.pending--
			m.clients--
			moved = append(moved, p)
		}
	}
	s.wakeLocked()
	return moved
}

// redispatch gives clients whose member left to another member of their
// endpoint. Nothing was read from them yet, so they lose nothing: their
// bytes wait in their sockets for the new member's data connection.
func (s *Server) redispatch(moved []*pending) {
	for _, p := range moved {
		ep := p.member.ep
		s.mu.Lock()
		m := ep.pickLocked(clientIP(p.client))
		if m == nil {
			ep.addClientLocked(sourceOf(p.client), -1)
			s.mu.Unlock()
			s.closeConn(p.client)
			s.logUnrelayed(ep, p.member, p.client, p.since, "no agent")
			continue
		}
		m.clients++
		s.mu.Unlock()
		s.relay(m, p.client, p.since)
	}
}

// dropClient closes an outside client that will not be relayed, for
// reason, and frees its place.
func (s *Server) dropClient(p *pending, reason string) {
	if p.timer != nil {
		p.timer.Stop()
	}
	s.closeConn(p.client)
	s.mu.Lock()
	p.member.ep.addClientLocked(sourceOf(p.client), -1)
	p.member.clients--
	s.mu.Unlock()
	s.logUnrelayed(p.member.ep, p.member, p.client, p.since, reason)
}

// linkInfo is what the relay knows of a relayed connection.
type linkInfo struct {
	member       *member
	client, data net.Conn
	accepted     time.Time // when the relay accepted the client
	since        time.Time // when it was joined to its data connection

	// Watched (see watch.go), under s.mu.
	moved   int64     // bytes both ways when last looked at
	changed time.Time // when that last changed
	reason  string    // why the relay closed it, if it did (for the access log)
}

// endedBy records why the relay closes the link, if nothing else did
// first. s.mu must be held.
func (info *linkInfo) endedBy(reason string) {
	if info.reason == "" {
		info.reason = reason
	}
}

// link copies between an outside client and the data connection joined to
// it, in the background, until both directions end. An idle link holds no
// goroutine. A link of a tenant with a Rate goes through its buckets (and
// a buffer); any other splices.
func (s *Server) link(m *member, client, data net.Conn, accepted time.Time, seq uint64) {
	sock := plainSocket(data) // what the link holds
	now := time.Now()
	var cd *counted
	var linked net.Conn = sock
	countIt := seq != 0 && copier.CanCount(sock)
	s.mu.Lock()
	if ss := m.sess; countIt && !ss.closed {
		// The streams end by End, and the connection serves the next client.
		cd = &counted{Conn: sock, ss: ss, seq: seq, head: int64(len(clientHead(client)))}
		if ss.counted == nil {
			ss.counted = make(map[uint64]*counted)
		}
		ss.counted[seq] = cd
		linked = cd
	}
	in, out := m.sess.tenant.buckets()
	l := copier.NewLimited(client, linked, in, out, func(l *copier.Link, res copier.Result) {
		if cd != nil {
			s.countedDone(cd)
		}
		s.linkDone(m, client, l, res)
	})
	// From now on the link owns both conns, and Close reaches them through
	// it.
	delete(s.conns, client)
	delete(s.conns, data)
	s.links[l] = &linkInfo{member: m, client: client, data: sock, accepted: accepted, since: now, changed: now}
	s.wg.Add(1)
	s.mu.Unlock()
	l.Start()
}

// linkDone records a link's end and frees the client's place. Its bytes
// move from the live links to the finished totals in one critical
// section, so the byte counters (finished plus live, read under s.mu) never
// count them twice nor dip.
func (s *Server) linkDone(m *member, client net.Conn, l *copier.Link, res copier.Result) {
	s.count.relayed.Add(1)
	if res.Err != nil {
		s.count.relayErrors.Add(1)
	}
	res.AToB += int64(len(clientHead(client))) // sent before the link began
	s.mu.Lock()
	info := s.links[l]
	s.bytesDone.add(res.AToB, res.BToA)
	m.ep.bytesDone.add(res.AToB, res.BToA)
	delete(s.links, l)
	m.ep.addClientLocked(sourceOf(client), -1)
	m.clients--
	s.wakeLocked()
	s.mu.Unlock()
	s.log.Debug("connection closed", withoutNil([]any{"port", m.ep.port, "client", client.RemoteAddr().String(),
		"bytes_in", res.AToB, "bytes_out", res.BToA, "err", res.Err})...)
	if s.access != nil {
		reason := info.reason
		switch {
		case reason != "":
		case res.BFirst:
			reason = "agent closed"
		default:
			reason = "client closed"
		}
		s.access.add(ConnRecord{Event: "connection", Start: info.accepted, End: time.Now(), Port: m.ep.port, Host: m.ep.host, Pool: m.ep.pool,
			Agent: m.sess.name(), AgentAddr: m.sess.remote, Client: client.RemoteAddr().String(),
			BytesIn: res.AToB, BytesOut: res.BToA, Reason: reason})
	}
	s.wg.Done()
}

// clientHead is what the relay read of client to route it, which its
// agent gets before the rest (see withHead).
func clientHead(client net.Conn) []byte {
	if p, ok := client.(*proxied); ok {
		return p.head
	}
	return nil
}
