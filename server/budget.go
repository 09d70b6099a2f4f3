package server

import (
	"container/list"
	"net"
	"net/netip"
	"time"

	"tcprelay/internal/copier"
)

// The relay's budget: the file descriptors it may hold, shared out so that
// no stranger, tenant or flood can take what another needs, and so that
// what nobody else needs can be used. Every connection and listener the
// relay holds is one descriptor; a relayed client is two (its socket and
// its data connection).
//
// Three classes hold descriptors, each under a cap:
//
//	handshakes: connections to the control port that have not finished
//	            their handshake (anyone on the internet): at most a tenth
//	            of the limit, and a share of that per source address;
//	agents:     control connections, pre-opened data connections and
//	            public listeners: at most an eighth. Those of the agents
//	            that the secret admits (keyless, or with a key of their own
//	            making) are shared by max-min fairness between their source
//	            addresses, and take at most half of it when an agents file
//	            is in force: the agents it lists keep the other half;
//	clients:    outside clients, waiting or relayed: no cap of their own.
//
// Caps are bounds, not reservations. What is kept aside for good is the
// reserve: 64 descriptors (control listeners, the state file, metrics and
// logs) and the splice pipes' part, a fortieth (a pipe is two descriptors,
// borrowed by a link only while it moves bytes; past the bound a burst
// goes through a buffer). And handshakes and agents each have a floor, a
// fortieth of the limit: while a class holds less than its floor, the rest
// of its floor is kept free for it. Any class may take one more
// descriptor, within its cap, while, after it, what the three hold, each
// of handshakes and agents counted as at least its floor, fits in the
// limit less the reserve (see budget.fits). So an agent can always
// register, and its pool refill, however many clients there are, and a
// tunnel alone on the relay may have every client the rest allows:
// budget.clients, 9,218 under 20,000 fds.
//
// Between tunnels, clients are shared by max-min fairness, made room for
// when the budget is spent: a client of a tunnel that holds at least two
// fewer clients than the biggest tunnel is admitted by closing one of the
// biggest tunnel's relayed connections, the one idle longest of a sample
// (see reclaimLocked). So a tunnel that came first may use everything,
// and gives back to newcomers until all have as many, no more.
type budget struct {
	fds        int // the process's limit
	handshakes int // the most connections in handshake
	perSource  int // handshakes per source address
	agents     int // the most agents' descriptors
	pipes      int // splice pipes alive at once (see copier.SetMaxPipes)
	reserve    int // kept aside: 64, and two descriptors per pipe
	// Floors: what is kept free for handshakes and agents while they hold
	// less.
	handshakeFloor, agentFloor int
	// clients is the most outside clients: those that fit while
	// handshakes and agents hold no more than their floors.
	clients int
}

func newBudget(fds int) budget {
	b := budget{fds: fds}
	b.handshakes = max(fds/10, 16)
	b.perSource = max(b.handshakes/32, 8)
	b.agents = max(fds/8, 16)
	b.pipes = max(fds/80, 4)
	b.reserve = 64 + 2*b.pipes
	b.handshakeFloor = min(max(fds/40, 2*b.perSource), b.handshakes)
	b.agentFloor = min(max(fds/40, 16), b.agents)
	b.clients = max((fds-b.reserve-b.handshakeFloor-b.agentFloor)/2, 0)
	return b
}

// fits reports whether the classes, holding h handshakes, a agents'
// descriptors and c clients' descriptors, fit in the budget: each of
// handshakes and agents counted as at least its floor.
func (b *budget) fits(h, a, c int) bool {
	return max(h, b.handshakeFloor)+max(a, b.agentFloor)+c <= b.fds-b.reserve
}

// roomLocked reports whether the budget has room for dh more handshakes,
// da more agents' descriptors and dc more clients' descriptors on top of
// what each class holds now. s.mu must be held.
func (s *Server) roomLocked(dh, da, dc int) bool {
	h, c := s.handshakes.all.Len()+dh, s.clientFDsLocked()+dc
	// First with a bound on the agents' descriptors that costs nothing to
	// count (every conn not in handshake counted as a parked one), then,
	// when the budget is tight, with what they hold.
	bound := len(s.sessions) + len(s.endpoints) + len(s.conns) - s.handshakes.all.Len()
	return s.budget.fits(h, bound+da, c) || s.budget.fits(h, s.agentsHeldLocked()+da, c)
}

// sourceOf is the address a connection comes from, for per-source limits:
// an IPv4 address, or an IPv6 /64, since one host holds a whole /64.
func sourceOf(c net.Conn) netip.Addr {
	a, ok := c.RemoteAddr().(*net.TCPAddr)
	if !ok {
		return netip.Addr{}
	}
	ip, _ := netip.AddrFromSlice(a.IP)
	return sourceIP(ip)
}

// sourceIP is the source that per-source limits count ip as.
func sourceIP(ip netip.Addr) netip.Addr {
	if ip = ip.Unmap(); ip.Is6() {
		p, _ := ip.Prefix(64)
		return p.Addr()
	}
	return ip
}

// handshakes are the connections to the control port that have not
// finished their handshake, oldest first, in all and by source address.
// When a new one would pass a cap (of its source, or in all; a new one
// that the descriptors' budget has no room for is at the cap in all), room
// is made rather than the new one refused, by closing, in this order:
//
//  1. the oldest that has sent nothing at all and lasted evictAfter;
//  2. none: a burst of young or talking connections may go past the cap,
//     up to twice it, while the descriptors' budget has room;
//  3. past that, in all, for a new one from an address that holds fewer
//     than the average: a silent one of an address that holds more,
//     however young, so that a flood fast enough that none of its
//     connections is old yet cannot lock out an agent's few;
//  4. the oldest that sent bytes, but none for quietFor, and lasted
//     evictAfter (a slow sender);
//
// and otherwise the new one is refused. A handshake that sent bytes in
// the last quietFor is never closed to make room: an agent on a long round
// trip is slow, not silent. What a socket has received is the kernel's
// word (TCP_INFO); where it cannot say, every handshake counts as silent.
type handshakes struct {
	all      list.List // of *handshake
	bySource map[netip.Addr]*list.List
}

const (
	// evictAfter is how long a handshake must have lasted to be closed to
	// make room for a new one (but see step 3).
	evictAfter = time.Second
	// quietFor is how long a handshake that sent bytes must have been
	// quiet since to be closed to make room.
	quietFor = time.Second
	// evictScan bounds the handshakes looked at, oldest first, to find one
	// to close, so that a crowd of talking ones cannot make each accept
	// slow.
	evictScan = 64
)

type handshake struct {
	c        net.Conn
	src      netip.Addr
	at       time.Time
	inAll    *list.Element
	inSource *list.Element
}

// admitHandshake counts a new connection to the control port among the
// handshakes, making room if needed. release must be called once its
// handshake is over, whatever the outcome.
func (s *Server) admitHandshake(c net.Conn) (release func(), ok bool) {
	h := &handshake{c: c, src: sourceOf(c), at: time.Now()}
	var evict []net.Conn
	s.mu.Lock()
	hs := &s.handshakes
	if hs.bySource == nil {
		hs.bySource = make(map[netip.Addr]*list.List)
	}
	src := hs.bySource[h.src]
	if src == nil {
		src = list.New()
		hs.bySource[h.src] = src
	}
	every := func(*handshake) bool { return true }
	// Past the descriptors' budget (see budget.fits), the handshakes are at
	// their cap in all, whatever their number: room is made as at the cap,
	// and no burst goes past it.
	room := s.roomLocked(1, 0, 0)
	for _, q := range []struct {
		l   *list.List
		cap int
	}{{src, s.budget.perSource}, {&hs.all, s.budget.handshakes}} {
		full := q.l == &hs.all && !room && len(evict) == 0
		if q.l.Len() < q.cap && !full {
			continue
		}
		old := scanLocked(q.l, every, silent(h.at, false))
		if old == nil && q.l.Len() < 2*q.cap && room {
			continue
		}
		if old == nil && q.l == &hs.all {
			old = hs.silentOfBiggerLocked(src.Len(), h.at)
		}
		if old == nil {
			old = scanLocked(q.l, every, quiet(h.at))
		}
		if old == nil {
			if src.Len() == 0 {
				delete(hs.bySource, h.src)
			}
			s.mu.Unlock()
			return nil, false
		}
		evict = append(evict, hs.removeLocked(old))
	}
	h.inAll, h.inSource = hs.all.PushBack(h), src.PushBack(h)
	s.mu.Unlock()
	for _, old := range evict {
		s.count.dropped.Add(1)
		s.quiet.Warn("dropped connection on control port: a silent handshake, to make room", "remote", old.RemoteAddr().String())
		old.Close() // its handler's read fails, and it cleans up
	}
	return func() {
		s.mu.Lock()
		if h.inAll != nil {
			s.handshakes.removeLocked(h)
		}
		s.mu.Unlock()
	}, true
}

// scanLocked returns the oldest handshake of l that match and want accept,
// among the first evictScan that match accepts; nil if there is none.
func scanLocked(l *list.List, match, want func(*handshake) bool) *handshake {
	n := 0
	for e := l.Front(); e != nil && n < evictScan; e = e.Next() {
		h := e.Value.(*handshake)
		if !match(h) {
			continue
		}
		if n++; want(h) {
			return h
		}
	}
	return nil
}

// silent accepts a handshake that has sent nothing, if it lasted
// evictAfter at now or anyAge is set.
func silent(now time.Time, anyAge bool) func(*handshake) bool {
	return func(h *handshake) bool {
		if !anyAge && now.Sub(h.at) < evictAfter {
			return false
		}
		bytes, _, ok := received(h.c)
		return !ok || bytes == 0
	}
}

// quiet accepts a handshake that lasted evictAfter at now and has sent
// nothing for quietFor.
func quiet(now time.Time) func(*handshake) bool {
	return func(h *handshake) bool {
		if now.Sub(h.at) < evictAfter {
			return false
		}
		_, idle, ok := received(h.c)
		return !ok || idle >= quietFor
	}
}

// silentOfBiggerLocked returns a silent handshake, however young, of an
// address that holds more than the average, if an address holding n is
// below it; else nil.
func (hs *handshakes) silentOfBiggerLocked(n int, now time.Time) *handshake {
	sources, total := len(hs.bySource), hs.all.Len()
	if n*sources >= total {
		return nil
	}
	bigger := func(h *handshake) bool { return hs.bySource[h.src].Len()*sources > total }
	return scanLocked(&hs.all, bigger, silent(now, true))
}

// removeLocked takes h out of the handshakes and returns its conn.
func (hs *handshakes) removeLocked(h *handshake) net.Conn {
	hs.all.Remove(h.inAll)
	src := hs.bySource[h.src]
	src.Remove(h.inSource)
	if src.Len() == 0 {
		delete(hs.bySource, h.src)
	}
	h.inAll, h.inSource = nil, nil
	return h.c
}

// group is whom a session's descriptors count against in the agents'
// budget: an agent of the agents file, or, for the agents the secret
// admits, their source address.
func (ss *session) group() string {
	if !ss.secretClass() {
		return "id:" + ss.id.Name
	}
	return "src:" + ss.src.String()
}

// secretClass reports whether the session was admitted by the secret (or
// by an open relay): without a key, or with a key that no agents file
// lists.
func (ss *session) secretClass() bool { return ss.id == nil || !ss.id.named }

// agentRoomLocked reports whether ss may hold one more descriptor of the
// agents' budget: a control connection, a parked data connection, or a
// public listener. s.mu must be held.
func (s *Server) agentRoomLocked(ss *session) bool {
	group, secret := ss.group(), ss.secretClass()
	total, class, mine := 0, 0, 0
	groups := make(map[string]struct{})
	s.eachAgentsLocked(func(g string, sec bool, n int) {
		total += n
		if sec && n > 0 {
			class += n
			groups[g] = struct{}{}
		}
		if g == group {
			mine += n
		}
	})
	if total+1 > s.budget.agents || !s.budget.fits(s.handshakes.all.Len(), total+1, s.clientFDsLocked()) {
		return false
	}
	if !secret {
		return true
	}
	c := s.budget.agents
	if s.cfg.Agents != nil {
		c /= 2
	}
	return fairRoom(c, class, len(groups), mine)
}

// clientFDsLocked counts the descriptors of the outside clients: two each,
// but none for the relayed connections closed to make room whose end is
// not counted yet (their places are taken already). s.mu must be held.
func (s *Server) clientFDsLocked() int {
	live := s.reclaiming[:0]
	for _, l := range s.reclaiming {
		if _, ok := s.links[l]; ok {
			live = append(live, l)
		}
	}
	clear(s.reclaiming[len(live):])
	s.reclaiming = live
	return 2 * (s.clientsTotal - len(live))
}

// eachAgentsLocked calls add with the descriptors of the agents' budget
// that each session and each public listener holds, and whose they are (a
// group, and whether it is of the secret's class). s.mu must be held.
func (s *Server) eachAgentsLocked(add func(group string, secret bool, n int)) {
	for other := range s.sessions {
		add(other.group(), other.secretClass(), 1+len(other.pool))
	}
	for _, ep := range s.endpoints {
		if ep.ln != nil {
			add(ep.group, ep.secret, 1)
		}
	}
}

// agentsHeldLocked counts the descriptors of the agents' budget held now.
// s.mu must be held.
func (s *Server) agentsHeldLocked() int {
	n := 0
	s.eachAgentsLocked(func(_ string, _ bool, k int) { n += k })
	return n
}

// clientRoomLocked reports whether ep may take one more outside client:
// while the budget has room for its two descriptors; past that, if room
// is made by reclaimLocked. s.mu must be held.
func (s *Server) clientRoomLocked(ep *endpoint) bool {
	return s.roomLocked(0, 0, 2) || s.reclaimLocked(ep)
}

// reclaimSample is how many of the biggest tunnel's relayed connections
// reclaimLocked compares to find the one idle longest, and reclaimScan
// bounds the links it looks at to find them.
const (
	reclaimSample = 16
	reclaimScan   = 4096
)

// reclaimLocked makes room for one more client of ep, when the budget is
// spent, by closing a relayed connection of the tunnel that holds the most
// clients, if that is at least two more than ep holds: max-min fairness,
// with room made instead of waited for. So a tunnel alone may take every
// client the budget has, and a tunnel that comes later still gets as many
// as the biggest keeps, and no more. The one closed is, of reclaimSample of
// the biggest tunnel's relayed connections (the map's order: at random),
// the one idle longest (both directions parked longest); if none is idle,
// the newest; waiting clients are never closed. It reports whether it closed one. s.mu must be held.
func (s *Server) reclaimLocked(ep *endpoint) bool {
	var big *endpoint
	for e := range s.allEndpointsLocked() {
		if e != ep && (big == nil || e.conns > big.conns) {
			big = e
		}
	}
	if big == nil || big.conns < ep.conns+2 {
		return false
	}
	var victim *copier.Link
	var vinfo *linkInfo
	var vidle time.Duration
	seen, scanned := 0, 0
	for l, info := range s.links {
		if scanned++; scanned > reclaimScan || seen == reclaimSample {
			break
		}
		if info.member.ep != big || info.reason != "" {
			continue // another tunnel's, or being closed already
		}
		seen++
		// Parked longest; of links that are not parked (moving bytes, in
		// their quiet window, or unable to park), the newest.
		idle := l.Idle()
		if victim == nil || idle > vidle || idle == vidle && info.since.After(vinfo.since) {
			victim, vinfo, vidle = l, info, idle
		}
	}
	if victim == nil {
		return false
	}
	vinfo.endedBy("reclaimed")
	s.count.reclaimed.Add(1)
	s.reclaiming = append(s.reclaiming, victim)
	port := big.port
	// Closed outside s.mu, which the link's end takes. Its place is the new
	// client's already: until its end is counted, it is in s.reclaiming.
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.quiet.Warn("closed a relayed connection of the tunnel with the most clients, to make room for a client of another", "port", port)
		victim.Close()
	}()
	return true
}

// fairRoom reports whether a group that holds mine of a budget c, of which
// n groups (it included if mine > 0) hold total, may take one more. Each
// group's fair share is c/(n+1): the one share more is kept for a group
// that may come. A group below its share is admitted while the share of a
// next newcomer, c/(n+2), stays free; one above it, while a whole share
// stays free. So groups that flood the budget cannot take it all, and a
// quiet one, or one that comes later, still gets its part; as the
// flooders' places free up, they go to the groups below their share.
// Nothing is taken back from a group to make room. (The agents' budget is
// shared so; clients, see reclaimLocked.)
func fairRoom(c, total, n, mine int) bool {
	if mine == 0 {
		n++
	}
	share, next := c/(n+1), c/(n+2)
	if mine < share {
		return total+1+next <= c
	}
	return total+1+share <= c
}

// authThrottle bounds the secret and key checks an address gets: each
// check spends a token of its bucket before it runs, and a check that
// succeeds gives it back. An address has authBurst tokens, refilled at
// authRefill a second; with none left, its Auth is refused unchecked, and
// its new connections to the control port at once, until one is back.
// However an address spreads its guesses over parallel handshakes, it
// gets at most authBurst plus authRefill a second. Buckets of addresses
// that stopped failing are forgotten.
type authThrottle struct {
	buckets map[netip.Addr]*bucket
}

type bucket struct {
	tokens float64
	at     time.Time
}

const (
	authBurst  = 5               // failures an address may have in a row
	authRefill = 2               // failures per second it may go on with
	maxBuckets = 1 << 16         // addresses tracked at once
	authForget = 5 * time.Second // a full bucket is dropped after this
)

// allowedLocked reports whether src has a token for a check now.
func (t *authThrottle) allowedLocked(src netip.Addr, now time.Time) bool {
	b := t.buckets[src]
	return b == nil || b.level(now) >= 1
}

func (b *bucket) level(now time.Time) float64 {
	return min(authBurst, b.tokens+now.Sub(b.at).Seconds()*authRefill)
}

// takeLocked spends one of src's tokens for a check, and reports whether
// it had one.
func (t *authThrottle) takeLocked(src netip.Addr, now time.Time) bool {
	if t.buckets == nil {
		t.buckets = make(map[netip.Addr]*bucket)
	}
	b := t.buckets[src]
	if b == nil {
		if len(t.buckets) >= maxBuckets {
			t.forgetLocked(now)
		}
		b = &bucket{tokens: authBurst, at: now}
		t.buckets[src] = b
	}
	level := b.level(now)
	if level < 1 {
		return false
	}
	b.tokens, b.at = level-1, now
	return true
}

// refundLocked gives back the token of a check that succeeded.
func (t *authThrottle) refundLocked(src netip.Addr, now time.Time) {
	if b := t.buckets[src]; b != nil {
		b.tokens, b.at = min(b.level(now)+1, authBurst), now
	}
}

// forgetLocked drops the buckets that are full again; if none is, the
// table is at its bound under a spread-out attack, and it starts over.
func (t *authThrottle) forgetLocked(now time.Time) {
	for a, b := range t.buckets {
		if now.Sub(b.at) > authForget && b.level(now) >= authBurst {
			delete(t.buckets, a)
		}
	}
	if len(t.buckets) >= maxBuckets {
		clear(t.buckets)
	}
}
