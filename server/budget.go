package server

import (
	"net"
	"net/netip"
	"time"
)

// The relay's budget: the file descriptors it may hold, shared out so that
// no stranger, tenant or flood can take what another needs. Every
// connection the relay holds is one descriptor; a relayed client is two
// (its socket and its data connection).
//
//	handshakes: connections to the control port that have not finished
//	            their handshake (anyone on the internet): a tenth of the
//	            limit, and a share of that per source address;
//	agents:     control connections and pre-opened data connections: a
//	            tenth;
//	clients:    outside clients, waiting or relayed, shared by max-min
//	            fairness between the endpoints;
//	reserve:    the rest, for listeners, pipes, the state file, metrics.
type budget struct {
	fds        int // the process's limit
	handshakes int
	perSource  int // handshakes per source address
	agents     int
	clients    int
}

func newBudget(fds int) budget {
	b := budget{fds: fds}
	b.handshakes = max(fds/10, 16)
	b.perSource = max(b.handshakes/32, 8)
	b.agents = max(fds/10, 16)
	reserve := 64 + fds/20
	b.clients = max((fds-b.handshakes-b.agents-reserve)/2, 16)
	return b
}

// sourceOf is the address a connection comes from, for per-source limits.
func sourceOf(c net.Conn) netip.Addr {
	if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		ip, _ := netip.AddrFromSlice(a.IP)
		return ip.Unmap()
	}
	return netip.Addr{}
}

// admitHandshake counts a new connection to the control port against the
// handshake budget, or refuses it (false). release must be called once its
// handshake is over, whatever the outcome.
func (s *Server) admitHandshake(c net.Conn) (release func(), ok bool) {
	src := sourceOf(c)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.handshaking >= s.budget.handshakes || s.handshakesBySource[src] >= s.budget.perSource {
		return nil, false
	}
	s.handshaking++
	s.handshakesBySource[src]++
	done := false
	return func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if done {
			return
		}
		done = true
		s.handshaking--
		if s.handshakesBySource[src]--; s.handshakesBySource[src] == 0 {
			delete(s.handshakesBySource, src)
		}
	}, true
}

// agentFDsLocked counts the descriptors of the agents' budget in use:
// control connections and parked data connections. s.mu must be held.
func (s *Server) agentFDsLocked() int {
	n := len(s.sessions)
	for ss := range s.sessions {
		n += len(ss.pool)
	}
	return n
}

// clientRoomLocked reports whether ep may take one more outside client
// under the clients' budget C. Among the N endpoints that have clients (ep
// included), each one's fair share is C/(N+1): the one share more is kept
// for an endpoint that may come. An endpoint below its share is admitted
// while the share of a next newcomer, C/(N+2), stays free; one above it,
// while a whole share stays free. So endpoints that flood the budget
// cannot take it all, and a quiet one, or one that comes later, still gets
// clients; as flooding clients leave, their places go to the endpoints
// below their share. Live clients are never closed to make room. s.mu must
// be held.
func (s *Server) clientRoomLocked(ep *endpoint) bool {
	c, n := s.budget.clients, s.activeEndpoints
	if ep.conns == 0 {
		n++
	}
	share, next := c/(n+1), c/(n+2)
	if ep.conns < share {
		return s.clientsTotal+1+next <= c
	}
	return s.clientsTotal+1+share <= c
}

// authThrottle slows down guessing: each failed authentication from an
// address spends a token of its bucket, refilled at authRefill; with none
// left, the address's connections to the control port are refused at once
// until one is back. Buckets of addresses that stopped failing are
// forgotten.
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

// allowedLocked reports whether src may try to authenticate now.
func (t *authThrottle) allowedLocked(src netip.Addr, now time.Time) bool {
	b := t.buckets[src]
	return b == nil || b.level(now) >= 1
}

func (b *bucket) level(now time.Time) float64 {
	return min(authBurst, b.tokens+now.Sub(b.at).Seconds()*authRefill)
}

// failedLocked spends one of src's tokens.
func (t *authThrottle) failedLocked(src netip.Addr, now time.Time) {
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
	b.tokens, b.at = max(b.level(now)-1, 0), now
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
