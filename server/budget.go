package server

import (
	"container/list"
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

// handshakes are the connections to the control port that have not
// finished their handshake, oldest first, in all and by source address.
// When a new one would pass a cap, the oldest one (of its source, or in
// all) is closed to make room, if it has sat there for evictAfter, rather
// than the new one refused: an agent's connections finish their handshake
// within a round trip, so the old ones are those that sit silent (a
// flood). A burst of an agent's data connections, all young, may go past
// the cap, up to twice it; past that, new ones are refused.
type handshakes struct {
	all      list.List // of *handshake
	bySource map[netip.Addr]*list.List
}

// evictAfter is how long a handshake must have lasted to be closed to make
// room for a new one.
const evictAfter = time.Second

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
	// Make room in the source's share, then in all, if an old one is there.
	for _, q := range []struct {
		l   *list.List
		cap int
	}{{src, s.budget.perSource}, {&hs.all, s.budget.handshakes}} {
		if q.l.Len() < q.cap {
			continue
		}
		if old := q.l.Front().Value.(*handshake); h.at.Sub(old.at) >= evictAfter {
			evict = append(evict, hs.removeLocked(old))
		} else if q.l.Len() >= 2*q.cap {
			if src.Len() == 0 {
				delete(hs.bySource, h.src)
			}
			s.mu.Unlock()
			return nil, false
		}
	}
	h.inAll, h.inSource = hs.all.PushBack(h), src.PushBack(h)
	s.mu.Unlock()
	for _, old := range evict {
		s.count.dropped.Add(1)
		s.quiet.Warn("dropped connection on control port: the oldest handshake, to make room", "remote", old.RemoteAddr().String())
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
