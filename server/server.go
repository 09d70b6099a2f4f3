// Package server is the relay: it accepts agents on a control listener,
// opens a public endpoint for each tunnel they request, and joins every
// outside client of an endpoint to a data connection of the agent serving
// it.
//
// The model, one file each:
//
//   - server.go: the Server, its control listeners, and the first frame of
//     every connection to the control port, which says what it is;
//   - session.go: a session is one agent's authenticated control
//     connection and the requests it makes;
//   - identity.go: who an agent is (its key and scope from the agents
//     file, or the shared secret's one tenant) and what it may hold;
//   - endpoint.go: an endpoint is what outside clients connect to (a public
//     port: its listener, admission limits and client count); a member is
//     one session's registration serving an endpoint, and a pool is an
//     endpoint with several;
//   - client.go: one outside client's journey, from accept to link;
//   - budget.go: the file descriptors shared out between handshakes,
//     agents and outside clients, and the throttle on failed
//     authentications;
//   - watch.go: the kernel memory of stalled links, and their timeouts;
//   - ports.go and state.go: which public ports may be handed out, and
//     the reservations kept for their owners across restarts;
//   - metrics.go, status.go, logs.go: what the operator sees.
//
// One outside client's journey, every step in client.go:
//
//	public port ─accept─▶ serveClient
//	                        │ admit: endpoint limits, the budget's fair
//	                        │ share, pick a ready member
//	                        ├─▶ bindPooled: a pre-opened data connection of
//	                        │   the member's session gets a Bind frame ─────┐
//	                        └─▶ announce: Incoming on the control           │
//	                            connection; the client waits (pickup timer; │
//	                            redispatch to another member if its own     │
//	                            leaves)                                     │
//	control port ─Attach─▶ attach: the token finds the waiting client ──────┤
//	                                                                        ▼
//	                        link: copier.Link copies both ways until both end
//	                        linkDone: counts bytes, frees the client's place
//
// The binaries are thin shells; a program can embed the relay with
//
//	srv, err := server.New(server.Config{Secret: s})
//	go srv.Serve(ln)
//	...
//	srv.Shutdown(ctx)
package server

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"maps"
	"math"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"tcprelay/internal/copier"
	"tcprelay/internal/proto"
)

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("relay: server closed")

// Server is a relay. Its methods are safe for concurrent use.
type Server struct {
	cfg Config
	set settings
	log *slog.Logger
	// setReadBuffer gives a relayed socket its receive buffer
	// (Config.LinkBuffer), or is nil (see readBufferSetter).
	setReadBuffer func(*net.TCPConn)
	// inherited: sockets accepted on public ports have their listener's
	// keepalive and receive buffer (see publicListenConfig).
	inherited bool

	// mu guards the bookkeeping below and the guarded fields of every
	// session, endpoint and member: one lock keeps teardown and token
	// lookups consistent.
	mu        sync.Mutex
	draining  bool                      // Shutdown called: no new agents, clients or parked connections
	closed    bool                      // control listeners closed
	listeners map[net.Listener]struct{} // control listeners being served
	sessions  map[*session]struct{}     // authenticated agents
	ids       map[string]*identity      // by key: the agents file's, and anonymous ones
	keyless   *identity                 // the tenant of the agents without a key
	endpoints map[int]*endpoint         // by port: open, or reserved for their owner
	names     map[string]*endpoint      // by name, those of the shared port (ServeNames)
	namesPort int                       // the shared port, once ServeNames has it
	namesCtl  *handoff                  // the agents that came to the shared port (NamesControl)
	conns     map[net.Conn]struct{}     // every other open conn: handshaking, parked, waiting (relayed ones belong to links)
	pending   map[[proto.TokenLen]byte]*pending
	poolKeys  map[[proto.TokenLen]byte]*session // sessions that accept pre-opened data connections
	links     map[*copier.Link]*linkInfo        // relayed connections being copied
	joining   int                               // clients admitted, or claimed by a data connection, not yet linked or waiting
	bytesDone byteCount                         // bytes of the links that ended (with links: see linkDone)
	wake      chan struct{}                     // closed when links or pending shrink, for waitUntil

	ports         *portAllocator
	count         counters
	stalledMemory atomic.Int64 // bytes, as the watch last found
	stopWatch     chan struct{}
	stopWatchOnce sync.Once
	quiet         *quietLog    // for events that come in floods
	nrefusing     atomic.Int32 // connections being refused off the accept loop (see refusing)
	access        *accessLog   // nil: no access log

	budget          budget
	handshakes      handshakes   // connections in handshake (under mu)
	clientsTotal    int          // outside clients of every endpoint (under mu)
	activeEndpoints int          // endpoints with clients (under mu)
	auth            authThrottle // failed authentications by source (under mu)

	reclaiming []*copier.Link // closed to make room, still counted (under mu; see reclaimLocked)

	stateMu     sync.Mutex  // serialises writes of the state file
	saveTimer   *time.Timer // a write of the state file is due (under mu)
	stateFrozen bool        // the relay is stopping: the state file keeps what it had (under mu)

	started time.Time // when New returned it, for the status views

	wg sync.WaitGroup // every goroutine the server starts
}

// New returns a relay with the given configuration. It fails only if
// Config.StateFile exists and cannot be read.
func New(cfg Config) (*Server, error) {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	if cfg.Secret == "" && cfg.Agents == nil {
		log.Warn("no secret configured: this is an OPEN relay, any agent can register and open public ports")
	} else if n := len(cfg.Secret); n > 0 && n < 16 {
		log.Warn("the secret is short: use at least 16 random characters (failed guesses are throttled, but only per address)", "length", n)
	}
	fds := cfg.MaxFDs
	if fds <= 0 {
		fds = fdLimit()
	}
	s := &Server{
		cfg:       cfg,
		set:       cfg.settings(),
		log:       log,
		listeners: make(map[net.Listener]struct{}),
		sessions:  make(map[*session]struct{}),
		ids:       make(map[string]*identity),
		endpoints: make(map[int]*endpoint),
		names:     make(map[string]*endpoint),
		namesPort: cfg.NamesPort,
		conns:     make(map[net.Conn]struct{}),
		links:     make(map[*copier.Link]*linkInfo),
		pending:   make(map[[proto.TokenLen]byte]*pending),
		poolKeys:  make(map[[proto.TokenLen]byte]*session),
		ports:     newPortAllocator(cfg.PortMin, cfg.PortMax),
		budget:    newBudget(fds),
		keyless:   newIdentity(keylessScope(cfg.Agents), false),
		started:   time.Now(),
	}
	s.quiet = &quietLog{log: log, wg: &s.wg}
	copier.SetMaxPipes(s.budget.pipes) // the process's: the last relay made sets it
	if cfg.AccessLog != nil {
		s.access = newAccessLog(cfg.AccessLog)
	}
	if n := s.set.linkBuffer; n > 0 {
		if s.setReadBuffer = readBufferSetter(n); s.setReadBuffer == nil {
			log.Warn("net.core.rmem_max is below -link-buffer and the relay lacks CAP_NET_ADMIN: relayed sockets keep the kernel's autotuning, so a stalled link is bounded only by -max-stalled-memory; raise it with sysctl -w net.core.rmem_max=N",
				"rmem_max", rmemMax(), "link_buffer", n)
		}
	}
	s.ports.lc, s.inherited = publicListenConfig(s.set.linkBuffer)
	if cfg.Agents != nil {
		s.SetAgents(cfg.Agents)
		if cfg.Secret == "" && slices.ContainsFunc(cfg.Agents, func(a Agent) bool { return a.Secret }) {
			log.Warn("the agents file has a secret line, but the relay has no secret: the line has no effect", "name", s.keyless.Name)
		}
	}
	if err := s.loadState(); err != nil {
		return nil, err
	}
	s.stopWatch = make(chan struct{})
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.watch(s.stopWatch)
	}()
	log.Info("budget of file descriptors", "fds", fds, "handshakes", s.budget.handshakes,
		"per_source", s.budget.perSource, "agents", s.budget.agents, "clients", s.budget.clients, "splice_pipes", s.budget.pipes)
	return s, nil
}

// features is what this relay speaks.
func (s *Server) features() proto.Features {
	f := proto.FeatureIdentity | proto.FeatureProof | proto.FeaturePools | proto.FeatureReady | proto.FeatureACL | proto.FeatureHostname
	if s.set.maxPool > 0 {
		f |= proto.FeaturePool | proto.FeatureReuse
	}
	return f
}

// Serve accepts agents' control and data connections on ln until the server
// is closed, and then returns ErrServerClosed. Public listeners bind to the
// same IP address as ln.
func (s *Server) Serve(ln net.Listener) error {
	bindIP := net.IP(nil)
	if a, ok := ln.Addr().(*net.TCPAddr); ok && !a.IP.IsUnspecified() {
		bindIP = a.IP
	}
	return s.serveListener(ln, nil, func(c net.Conn) func() {
		release, ok := s.admitHandshake(c)
		if !ok {
			s.refuseHandshake(c)
			return nil
		}
		return func() {
			defer release()
			s.handleConn(c, bindIP, release)
		}
	})
}

// serveListener runs acceptLoop on ln, one of the listeners Shutdown and
// Close end, until it is closed; registered, it first runs registered
// under s.mu. It returns ErrServerClosed at once if the server is closed.
func (s *Server) serveListener(ln net.Listener, registered func(), admit func(net.Conn) func()) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return ErrServerClosed
	}
	s.listeners[ln] = struct{}{}
	if registered != nil {
		registered()
	}
	s.wg.Add(1)
	s.mu.Unlock()
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, ln)
		s.mu.Unlock()
		ln.Close()
	}()
	return s.acceptLoop(ln, admit)
}

// acceptLoop accepts on ln and calls admit for each conn, in accept order:
// admit counts the conn against its limits (or refuses it, returning nil)
// and returns what serves it, which runs in a tracked goroutine. It backs
// off on temporary errors (such as running out of file descriptors)
// instead of spinning or giving up.
func (s *Server) acceptLoop(ln net.Listener, admit func(net.Conn) func()) error {
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if s.isClosed() {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && !errors.Is(err, net.ErrClosed) {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				s.quiet.Warn("accept failed; retrying", "addr", ln.Addr().String(), "err", err, "retry_in", delay)
				time.Sleep(delay)
				continue
			}
			return err
		}
		delay = 0
		if !s.trackConn(c) {
			c.Close()
			return ErrServerClosed
		}
		serve := admit(c)
		if serve == nil {
			continue
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			serve()
		}()
	}
}

// refuseConn turns away a connection to the control port at a limit: with
// an Error frame, so an agent knows to retry, and a line in the log. It
// never blocks its caller, the accept loop: on a plain conn the frame goes
// into an empty send buffer; over TLS, sending it takes a handshake, which
// runs in a goroutine of its own under a second's deadline, for at most
// maxRefusing conns at once (past that, a TLS conn is closed without a
// word, and its agent retries as after any failed handshake).
func (s *Server) refuseConn(c net.Conn, why string) {
	s.count.dropped.Add(1)
	s.quiet.Warn("refused connection on control port", "why", why, "remote", c.RemoteAddr().String())
	frame := proto.Append(nil, &proto.Error{Code: proto.CodeLimit, Message: why})
	if _, isTLS := c.(tlsConn); !isTLS {
		c.SetWriteDeadline(time.Now().Add(time.Second))
		c.Write(frame)
		s.closeConn(c)
		return
	}
	s.refusing(c, func() {
		c.Write(frame)
		s.closeConn(c)
	})
}

// refusing runs f, which owns c from then on, in a goroutine of its own,
// with c's deadline a second away, if fewer than maxRefusing are running;
// past that, it closes c at once and reports false.
func (s *Server) refusing(c net.Conn, f func()) bool {
	if s.nrefusing.Add(1) > maxRefusing {
		s.nrefusing.Add(-1)
		s.closeConn(c)
		return false
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer s.nrefusing.Add(-1)
		c.SetDeadline(time.Now().Add(time.Second))
		f()
	}()
	return true
}

// refuseHandshake turns away a connection to the control port that came
// past the handshake limits, unless it is a data connection for an outside
// client already waiting: that one is served, since its client is admitted
// already, and the agent sends its client's bytes right after the Attach
// frame without waiting for an answer. An Error frame there would reach
// the agent's application as the client's first bytes, and the client
// would wait for the pickup timeout. A burst of clients makes an agent
// open a burst of data connections from its one address, past the limit
// for one source: so the relay reads the first frame of each connection it
// refuses (for at most a second, and for at most maxRefusing at once, as
// it runs their TLS handshakes to send the Error frame), and tells the
// others, as refuseConn does, to retry. One whose first frame does not
// come in time is closed without a word, which an agent takes as any
// failed connection, and retries.
func (s *Server) refuseHandshake(c net.Conn) {
	const why = "relay busy: too many connections in handshake, from your address or in all; retry later"
	refused := func() {
		s.count.dropped.Add(1)
		s.quiet.Warn("refused connection on control port", "why", why, "remote", c.RemoteAddr().String())
	}
	if !s.refusing(c, func() {
		var m proto.Message
		var pre [proto.PreambleLen]byte
		_, err := readFull(c, pre[:])
		if err == nil {
			if err = proto.CheckPreamble(pre[:]); err == nil {
				m, err = proto.ReadMessage(c, proto.MaxPreAuthPayload)
			}
		}
		if a, ok := m.(*proto.Attach); ok && err == nil {
			s.countHandshake(c)
			if !s.attach(c, a) {
				s.closeConn(c)
			}
			return
		}
		refused()
		if m != nil && err == nil {
			c.Write(proto.Append(nil, &proto.Error{Code: proto.CodeLimit, Message: why}))
		} // else without a word: it may be an Attach that did not come in time
		s.closeConn(c)
	}) {
		refused() // closed at once: too many being refused
	}
}

// tlsConn is a connection to the control port that runs TLS: a *tls.Conn
// (from tls.NewListener), or a transport's conn over TLS (see
// transport.Listen). That is all the relay knows of its transports: what
// it reads and writes is the native protocol, whichever carries it.
type tlsConn interface {
	net.Conn
	ConnectionState() tls.ConnectionState
}

// postQuantum reports whether a TLS key exchange resists a future quantum
// computer: the hybrids with ML-KEM.
func postQuantum(id tls.CurveID) bool {
	switch id {
	case tls.X25519MLKEM768, tls.SecP256r1MLKEM768, tls.SecP384r1MLKEM1024:
		return true
	}
	return false
}

// countHandshake counts c's TLS handshake, if it made one.
func (s *Server) countHandshake(c net.Conn) {
	tc, ok := c.(tlsConn)
	if !ok {
		return
	}
	if cs := tc.ConnectionState(); cs.HandshakeComplete {
		s.count.tlsHandshakes.Add(1)
		if cs.DidResume {
			s.count.tlsResumed.Add(1)
		} else if !postQuantum(cs.CurveID) {
			s.count.tlsClassical.Add(1)
		}
	}
}

// maxRefusing bounds the connections served at once only to tell an agent
// it was refused (a TLS handshake each), or to find a data connection
// among them (see refuseHandshake).
const maxRefusing = 64

// handleConn reads the preamble and first frame of a connection to the
// control port, which say what it is: a control connection (Hello), a data
// connection for a waiting client (Attach), or a pre-opened one (PoolJoin).
// release gives back its place among the handshakes.
func (s *Server) handleConn(c net.Conn, bindIP net.IP, release func()) {
	keep := false
	defer func() {
		if !keep {
			s.closeConn(c)
		}
	}()
	c.SetDeadline(time.Now().Add(s.set.handshakeTimeout))

	// Exact-length reads: nothing past the first frame may be buffered, so
	// a data connection stays a raw socket that splice can use.
	var pre [proto.PreambleLen]byte
	_, err := readFull(c, pre[:])
	s.countHandshake(c)
	if err != nil {
		var rh tls.RecordHeaderError
		if errors.As(err, &rh) && rh.Conn != nil && bytes.HasPrefix(rh.RecordHeader[:], proto.Magic[:]) {
			// A plain agent at a TLS relay: tell it, in the clear.
			rh.Conn.Write(proto.Append(nil, &proto.Error{Code: proto.CodeUnsupported,
				Message: "this relay speaks TLS: give the agent -tls, -tls-ca or -tls-fingerprint"}))
			s.dropConn(c, "a plain agent at the TLS control port", nil)
			return
		}
		tc, isTLS := c.(tlsConn)
		switch {
		case errors.Is(err, net.ErrClosed): // closed by the relay: counted then
		case isTLS && !tc.ConnectionState().HandshakeComplete:
			s.dropConn(c, "TLS handshake failed", err) // e.g. the agent does not trust the certificate
		default:
			s.dropConn(c, "no preamble", err)
		}
		return
	}
	if err := proto.CheckPreamble(pre[:]); err != nil {
		if pre[0] == 0x16 && pre[1] == 0x03 {
			s.dropConn(c, "a TLS handshake on the plain control port (an agent with -tls, at a relay without -tls-cert?)", nil)
			return
		}
		if errors.Is(err, proto.ErrVersion) {
			// Every version reads an Error frame the same way: tell the
			// agent why, instead of a silent close.
			c.Write(proto.Append(nil, &proto.Error{Code: proto.CodeUnsupported, Message: err.Error()}))
		}
		s.dropConn(c, "bad preamble", err)
		return
	}
	m, err := proto.ReadMessage(c, proto.MaxPreAuthPayload)
	if err != nil {
		if !errors.Is(err, net.ErrClosed) {
			s.dropConn(c, "bad first frame", err)
		}
		return
	}
	switch m := m.(type) {
	case *proto.Attach:
		keep = s.attach(c, m)
	case *proto.PoolJoin:
		keep = s.park(c, m)
	case *proto.Hello:
		s.mu.Lock()
		allowed := s.auth.allowedLocked(sourceOf(c), time.Now())
		s.mu.Unlock()
		if !allowed {
			s.count.authThrottled.Add(1)
			s.refuseConn(c, errThrottled)
			keep = true // refuseConn closed it
			return
		}
		keep = true // runSession closes c
		s.runSession(c, m, bindIP, release)
	default:
		s.dropConn(c, "unexpected first frame", errors.New(m.Type().String()))
	}
}

// readFull is io.ReadFull without its wrapping of a clean EOF.
func readFull(c net.Conn, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		m, err := c.Read(b[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

func (s *Server) dropConn(c net.Conn, why string, err error) {
	s.count.dropped.Add(1)
	s.quiet.Warn("dropped connection on control port: "+why, "remote", c.RemoteAddr().String(), "err", err)
}

// trackConn registers c so Close can reach it; false means the server is
// closed and c must not be used.
func (s *Server) trackConn(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *Server) closeConn(c net.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	c.Close()
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// comeBackSoon is how often the relay asks agents to retry after a graceful
// shutdown (a restart, usually): often enough that they are back within a
// second of the relay.
const comeBackSoon = 500 * time.Millisecond

// settleFor bounds how long a graceful shutdown waits for the clients
// already accepted to be picked up by their agents, before it tells the
// agents to go.
const settleFor = 2 * time.Second

// stopAccepting marks the server closed and closes every listener, and every
// agent session with its public ports and waiting clients, after a GoAway
// (with retry, if not zero, as its hint). Relayed connections are left to
// run.
func (s *Server) stopAccepting(reason string, retry time.Duration) {
	s.freezeState()
	s.mu.Lock()
	s.draining, s.closed = true, true
	lns := make([]net.Listener, 0, len(s.listeners))
	for ln := range s.listeners {
		lns = append(lns, ln)
	}
	if s.namesCtl != nil { // served or not: its waiting handoffs give up
		lns = append(lns, s.namesCtl)
	}
	sessions := make([]*session, 0, len(s.sessions))
	for sess := range s.sessions {
		sessions = append(sessions, sess)
	}
	s.mu.Unlock()

	for _, ln := range lns {
		ln.Close()
	}
	endSessions(sessions, func(*session) proto.Message {
		return &proto.GoAway{Message: reason, RetryMillis: uint32(retry.Milliseconds())}
	})
}

// endSessions tells each session why it ends, and ends it: all at once,
// each within a second, so that an agent that stopped reading cannot hold
// up the others, nor the caller.
func endSessions(sessions []*session, why func(*session) proto.Message) {
	var wg sync.WaitGroup
	for _, ss := range sessions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ss.ctl.SendWithin(why(ss), time.Second)
			ss.close()
		}()
	}
	wg.Wait()
}

// waitUntil waits until cond, called under s.mu, holds, or ctx is done.
func (s *Server) waitUntil(ctx context.Context, cond func() bool) error {
	for {
		s.mu.Lock()
		if cond() {
			s.mu.Unlock()
			return nil
		}
		if s.wake == nil {
			s.wake = make(chan struct{})
		}
		wake := s.wake
		s.mu.Unlock()
		select {
		case <-wake:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// wakeLocked has waitUntil check its condition again. s.mu must be held.
func (s *Server) wakeLocked() {
	if s.wake != nil {
		close(s.wake)
		s.wake = nil
	}
}

// Shutdown stops accepting outside clients (their public ports close, so a
// load balancer routes around this relay) and new agents, lets the agents
// pick up the clients already accepted, tells every agent the relay is
// going away (and to come back soon), and lets relayed connections drain
// until they end or ctx is done; then it closes what is left and waits for
// every goroutine. It returns ctx.Err() if the drain was cut short.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.draining = true
	var lns []net.Listener
	for ep := range s.allEndpointsLocked() {
		if ep.ln != nil {
			lns = append(lns, ep.ln)
		}
	}
	s.mu.Unlock()
	for _, ln := range lns {
		ln.Close()
	}
	settle, cancel := context.WithTimeout(ctx, min(settleFor, s.set.pickupTimeout))
	s.waitUntil(settle, func() bool { return len(s.pending) == 0 && s.joining == 0 })
	cancel()

	s.stopAccepting("graceful: come back soon", comeBackSoon)
	err := s.waitUntil(ctx, func() bool { return len(s.links) == 0 })
	s.Close()
	return err
}

// Close closes every listener and connection at once and waits for the
// server's goroutines to return.
func (s *Server) Close() error {
	s.stopAccepting("closing", 0)
	s.mu.Lock()
	conns := make([]net.Conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	links := make([]*copier.Link, 0, len(s.links))
	for l, info := range s.links {
		links = append(links, l)
		info.endedBy("relay shut down")
	}
	for tok, p := range s.pending {
		delete(s.pending, tok)
		p.timer.Stop()
	}
	for ep := range s.allEndpointsLocked() {
		if ep.expiry != nil {
			ep.expiry.Stop()
		}
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
	for _, l := range links {
		l.Close()
	}
	s.quiet.flush()
	s.stopWatchOnce.Do(func() { close(s.stopWatch) })
	s.wg.Wait()
	s.access.close()
	return nil
}

// Stats is a snapshot of what the relay holds.
type Stats struct {
	Agents   int // authenticated control connections
	Tunnels  int // open public endpoints
	Reserved int // ports reserved for an owner, with no listener
	Members  int // agent registrations serving the endpoints
	Ready    int // members that can take clients
	Waiting  int // outside clients waiting for their agent
	Relayed  int // connections being relayed
	Parked   int // pre-opened data connections waiting for a client

	Handshaking int // connections to the control port in handshake
	Clients     int // outside clients, waiting or relayed
	Identities  int // agent identities held: the agents file's, and keys seen without one
}

// Stats returns a snapshot of the relay's state.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.statsLocked()
}

// statsLocked is Stats with s.mu held.
func (s *Server) statsLocked() Stats {
	st := Stats{Agents: len(s.sessions), Waiting: len(s.pending), Relayed: len(s.links),
		Handshaking: s.handshakes.all.Len(), Clients: s.clientsTotal, Identities: len(s.ids)}
	for ep := range s.allEndpointsLocked() {
		if ep.ln == nil {
			st.Reserved++
		} else {
			st.Tunnels++
		}
		st.Members += len(ep.members)
		for _, m := range ep.members {
			if m.ready {
				st.Ready++
			}
		}
	}
	for ss := range s.sessions {
		st.Parked += len(ss.pool)
	}
	return st
}

// SetAgents replaces the agents admitted by key (see ParseAgents), as a
// reload of the agents file does, and applies the new scopes to what every
// tenant holds, at once:
//
//   - an agent that is no longer listed, or whose key changed, is revoked:
//     its sessions and parked connections end, its waiting clients and its
//     relayed connections are closed, and its ports are released;
//   - a tenant whose scope narrowed (ports=, pools=, tunnels=, or the
//     secret line for the agents without a key) loses what falls outside
//     it: its reservations there are released, and a session that served
//     such a port or pool ends with a GoAway, its relayed connections
//     through it closed, so that its agent registers again within the new
//     scope. Past tunnels=, reservations go first, then the highest ports.
//
// Everything else keeps running.
func (s *Server) SetAgents(agents []Agent) {
	s.mu.Lock()
	s.cfg.Agents = agents
	s.keyless.setAgent(keylessScope(agents))
	old := s.ids
	s.ids = make(map[string]*identity, len(agents))
	for _, a := range agents {
		if a.Secret {
			continue
		}
		id := old[string(a.Key)]
		if id != nil && id.named {
			id.setAgent(a)
		} else {
			id = newIdentity(a, true)
		}
		s.ids[string(a.Key)] = id
	}
	tenants := []*identity{s.keyless}
	for k, id := range old {
		if s.ids[k] == nil {
			id.revoked = true
		}
		tenants = append(tenants, id)
	}
	// The sessions to end: a revoked tenant's, and those that lose a
	// member to a narrowed scope.
	drop := make(map[*member]bool)
	var end []*session
	for _, t := range tenants {
		s.narrowLocked(t, drop)
		if t.revoked {
			end = slices.AppendSeq(end, maps.Keys(t.sessions))
		}
	}
	for m := range drop {
		m.cut = true // no new client, and its waiting ones cannot be claimed
		if !m.sess.tenant.revoked && !slices.Contains(end, m.sess) {
			end = append(end, m.sess)
		}
	}
	for _, ss := range end {
		ss.ended = "scope narrowed"
		if ss.tenant.revoked {
			ss.ended = "revoked"
		}
	}
	var links []*copier.Link
	for l, info := range s.links {
		if drop[info.member] {
			links = append(links, l)
			info.endedBy("revoked")
		}
	}
	s.mu.Unlock()
	for _, l := range links {
		l.Close()
	}
	endSessions(end, func(ss *session) proto.Message {
		if ss.tenant.revoked {
			ss.log.Warn("agent removed from the agents file: ending its session and its connections")
			return &proto.Error{Code: proto.CodeAuthFailed, Message: "this agent was removed from the relay's agents file"}
		}
		ss.log.Warn("agent's scope narrowed in the agents file: ending its session, and its connections outside the scope")
		return &proto.GoAway{Message: "the relay's agents file narrowed this agent's scope: register again",
			RetryMillis: uint32(comeBackSoon.Milliseconds())}
	})
}

// narrowLocked applies t's scope to what it holds: it releases its
// reservations outside the scope (all of them if it is revoked) and marks
// in drop the members of its sessions that serve a port or pool outside
// it, or past its tunnels=; their endpoints are released, not reserved,
// when those members leave. s.mu must be held.
func (s *Server) narrowLocked(t *identity, drop map[*member]bool) {
	holds := func(ep *endpoint) bool {
		if t == s.keyless {
			return strings.HasPrefix(ep.owner, "resume:")
		}
		return ep.owner == t.owner
	}
	var reserved, open []*endpoint
	cut := func(ep *endpoint) {
		ep.cut = true
		if ep.ln == nil {
			ep.releaseLocked()
		}
		for _, m := range ep.members {
			drop[m] = true
		}
	}
	for ep := range s.allEndpointsLocked() {
		switch {
		case ep.pool != "" || !holds(ep):
		case t.revoked || !t.allowsEndpoint(ep):
			cut(ep)
		case ep.ln == nil:
			reserved = append(reserved, ep)
		default:
			open = append(open, ep)
		}
	}
	var pooled []*member
	for ss := range t.sessions {
		for _, m := range ss.members {
			switch {
			case m.ep.pool == "":
			case t.revoked || !t.allowsPool(m.ep.pool) || m.ep.host != "" && !t.allowsEndpoint(m.ep):
				drop[m] = true
			default:
				pooled = append(pooled, m)
			}
		}
	}
	limit := math.MaxInt
	switch {
	case t.Tunnels > 0:
		limit = t.Tunnels
	case t != s.keyless:
		limit = s.set.maxTunnels
	}
	n := len(reserved) + len(open) + len(pooled)
	slices.SortFunc(reserved, func(a, b *endpoint) int { return a.until.Compare(b.until) })
	slices.SortFunc(open, func(a, b *endpoint) int { return b.port - a.port })
	for ; n > limit && len(reserved) > 0; n-- {
		cut(reserved[0])
		reserved = reserved[1:]
	}
	for ; n > limit && len(open) > 0; n-- {
		cut(open[0])
		open = open[1:]
	}
	for ; n > limit && len(pooled) > 0; n-- {
		drop[pooled[0]] = true
		pooled = pooled[1:]
	}
}

// scopeAllowsLocked reports whether the owner of a reservation in the
// state file may still hold ep: a key of the agents file within its
// ports= (or hosts=), an agent without a key within the secret's scope.
// s.mu must be held.
func (s *Server) scopeAllowsLocked(owner string, ep *endpoint) bool {
	switch {
	case strings.HasPrefix(owner, "resume:"):
		return s.keyless.allowsEndpoint(ep)
	case strings.HasPrefix(owner, "key:") && s.cfg.Agents != nil:
		for _, id := range s.ids {
			if id.owner == owner {
				return id.allowsEndpoint(ep)
			}
		}
		return false
	}
	return true
}
