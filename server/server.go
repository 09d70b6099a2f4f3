// Package server is the relay: it accepts agents on a control listener, opens
// a public port for each tunnel they request, and joins every outside client
// on that port to a data connection the agent opens for it.
//
// The binaries are thin shells; a program can embed the relay with
//
//	srv := server.New(server.Config{Secret: s})
//	go srv.Serve(ln)
//	...
//	srv.Shutdown(ctx)
package server

import (
	"context"
	"errors"
	"log/slog"
	"math"
	"net"
	"sync"
	"time"

	"tcprelay/internal/copier"
	"tcprelay/internal/proto"
)

// Config configures a Server. The zero value is a working open relay that
// lets the operating system choose public ports.
type Config struct {
	// Secret is the shared secret agents must prove they know. If empty, any
	// agent is accepted (an open relay), and New logs a warning.
	Secret string

	// PublicHost is the host announced to agents as their public address.
	// If empty, each agent announces the host it dialed.
	PublicHost string

	// PortMin and PortMax bound the public ports handed out (inclusive).
	// If both are zero, the operating system picks a free ephemeral port for
	// each tunnel and any requested port is tried as is.
	PortMin, PortMax int

	// HandshakeTimeout bounds the time from accepting a connection on the
	// control port to the end of its handshake. If zero or negative, 10s.
	HandshakeTimeout time.Duration

	// PickupTimeout is how long an outside client waits for its agent to
	// open the data connection before it is closed. If zero or negative, 10s.
	PickupTimeout time.Duration

	// Heartbeat is how often the relay pings each agent. An agent silent for
	// three heartbeats is dropped and its ports freed. If zero, 10s; if
	// negative, no pings are sent and silent agents are kept.
	Heartbeat time.Duration

	// WriteTimeout bounds each write on a control connection, so one stuck
	// agent cannot hold up the relay. If zero or negative, 10s.
	WriteTimeout time.Duration

	// MaxTunnelsPerAgent bounds the public ports one agent (control
	// connection) may hold. If zero, 16; if negative, unlimited.
	MaxTunnelsPerAgent int

	// MaxConnsPerTunnel bounds the outside clients of one tunnel, waiting or
	// relayed; a client past it is closed at once. If zero, 4096; if
	// negative, unlimited.
	MaxConnsPerTunnel int

	// MaxPendingPerTunnel bounds the outside clients of one tunnel waiting
	// for their agent's data connection. If zero, 128; if negative,
	// unlimited.
	MaxPendingPerTunnel int

	// MaxPoolPerAgent bounds the idle data connections an agent may open in
	// advance, so a new client is joined without a round trip to the agent.
	// If zero, 32; if negative, agents are not offered a pool.
	MaxPoolPerAgent int

	// MaxFrameSize bounds the payload of control frames after the handshake.
	// If zero, proto.DefaultMaxPayload.
	MaxFrameSize int

	// Logger receives the relay's logs. If nil, slog.Default().
	Logger *slog.Logger
}

func (c *Config) handshakeTimeout() time.Duration {
	return orDefault(c.HandshakeTimeout, 10*time.Second)
}
func (c *Config) pickupTimeout() time.Duration { return orDefault(c.PickupTimeout, 10*time.Second) }
func (c *Config) writeTimeout() time.Duration  { return orDefault(c.WriteTimeout, 10*time.Second) }

// heartbeat is 0 when disabled; it is sent in whole milliseconds.
func (c *Config) heartbeat() time.Duration {
	switch {
	case c.Heartbeat == 0:
		return 10 * time.Second
	case c.Heartbeat < 0:
		return 0
	}
	return max(c.Heartbeat.Truncate(time.Millisecond), time.Millisecond)
}

func (c *Config) maxFrameSize() int {
	if c.MaxFrameSize <= 0 {
		return proto.DefaultMaxPayload
	}
	return c.MaxFrameSize
}

// limit applies the zero-means-default, negative-means-unlimited rule.
func limit(v, def int) int {
	switch {
	case v == 0:
		return def
	case v < 0:
		return math.MaxInt
	}
	return v
}

func (c *Config) maxTunnels() int { return limit(c.MaxTunnelsPerAgent, 16) }
func (c *Config) maxConns() int   { return limit(c.MaxConnsPerTunnel, 4096) }
func (c *Config) maxPending() int { return limit(c.MaxPendingPerTunnel, 128) }

// maxPool is 0 when pooling is off; it travels as a u16.
func (c *Config) maxPool() int {
	if c.MaxPoolPerAgent < 0 {
		return 0
	}
	return min(limit(c.MaxPoolPerAgent, 32), math.MaxUint16)
}

func orDefault(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("relay: server closed")

// Server is a relay. Its methods are safe for concurrent use.
type Server struct {
	cfg Config
	log *slog.Logger

	// mu guards the bookkeeping below and every session's closed flag and
	// tunnels: one lock keeps session teardown and token lookups consistent.
	mu        sync.Mutex
	closed    bool                      // Shutdown or Close called
	listeners map[net.Listener]struct{} // control listeners being served
	sessions  map[*session]struct{}     // authenticated agents
	conns     map[net.Conn]struct{}     // every other open conn: handshaking, parked, waiting (relayed ones belong to links)
	pending   map[[proto.TokenLen]byte]*pending
	poolKeys  map[[proto.TokenLen]byte]*session // sessions that accept pre-opened data connections
	links     map[*copier.Link]struct{}         // relayed connections being copied
	linksDone chan struct{}                     // closed and replaced when links drops to 0 during Shutdown

	ports portAllocator
	count counters

	wg sync.WaitGroup // every goroutine the server starts
}

// New returns a relay with the given configuration.
func New(cfg Config) *Server {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	if cfg.Secret == "" {
		log.Warn("no secret configured: this is an OPEN relay, any agent can register and open public ports")
	}
	return &Server{
		cfg:       cfg,
		log:       log,
		listeners: make(map[net.Listener]struct{}),
		sessions:  make(map[*session]struct{}),
		conns:     make(map[net.Conn]struct{}),
		links:     make(map[*copier.Link]struct{}),
		pending:   make(map[[proto.TokenLen]byte]*pending),
		poolKeys:  make(map[[proto.TokenLen]byte]*session),
		ports:     portAllocator{min: cfg.PortMin, max: cfg.PortMax, next: cfg.PortMin, used: make(map[int]bool)},
	}
}

// Serve accepts agents' control and data connections on ln until the server
// is closed, and then returns ErrServerClosed. Public listeners bind to the
// same IP address as ln.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return ErrServerClosed
	}
	s.listeners[ln] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	defer s.wg.Done()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, ln)
		s.mu.Unlock()
		ln.Close()
	}()

	bindIP := net.IP(nil)
	if a, ok := ln.Addr().(*net.TCPAddr); ok && !a.IP.IsUnspecified() {
		bindIP = a.IP
	}
	return s.acceptLoop(ln, func(c net.Conn) {
		s.handleConn(c, bindIP)
	})
}

// acceptLoop accepts on ln and runs handle in a tracked goroutine for each
// conn. It backs off on temporary errors (such as running out of file
// descriptors) instead of spinning or giving up.
func (s *Server) acceptLoop(ln net.Listener, handle func(net.Conn)) error {
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
				s.log.Warn("accept failed; retrying", "addr", ln.Addr().String(), "err", err, "retry_in", delay)
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
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			handle(c)
		}()
	}
}

// handleConn reads the first frame of a connection to the control port and
// hands it to the control or the data path.
func (s *Server) handleConn(c net.Conn, bindIP net.IP) {
	keep := false
	defer func() {
		if !keep {
			s.closeConn(c)
		}
	}()
	c.SetDeadline(time.Now().Add(s.cfg.handshakeTimeout()))

	// Exact-length reads: nothing past the first frame may be buffered, so
	// a data connection stays a raw socket that splice can use.
	var hdr [proto.PreambleLen + proto.HeaderLen]byte
	if _, err := readFull(c, hdr[:]); err != nil {
		s.dropConn(c, "no preamble", err)
		return
	}
	if err := proto.CheckPreamble(hdr[:]); err != nil {
		s.dropConn(c, "bad preamble", err)
		return
	}
	t, n, err := proto.ParseHeader(hdr[proto.PreambleLen:], proto.MaxPreAuthPayload)
	if err != nil {
		s.dropConn(c, "bad first frame", err)
		return
	}
	payload := make([]byte, n)
	if _, err := readFull(c, payload); err != nil {
		s.dropConn(c, "short first frame", err)
		return
	}
	m, err := proto.Parse(t, payload)
	if err != nil {
		s.dropConn(c, "bad first frame", err)
		return
	}
	switch m := m.(type) {
	case *proto.Attach:
		keep = s.attach(c, m.Token)
	case *proto.PoolJoin:
		keep = s.park(c, m.Key)
	case *proto.Hello:
		keep = true // runSession closes c
		s.runSession(c, m, bindIP)
	default:
		s.dropConn(c, "unexpected first frame", errors.New(t.String()))
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
	s.log.Warn("dropped connection on control port: "+why, "remote", c.RemoteAddr().String(), "err", err)
}

// attach binds a data connection to the outside client waiting for token and
// copies between them. It reports whether it took ownership of c.
func (s *Server) attach(c net.Conn, token [proto.TokenLen]byte) bool {
	p := s.takePending(token)
	if p == nil {
		s.dropConn(c, "data connection with unknown, used or expired token", nil)
		return false
	}
	p.timer.Stop()
	c.SetDeadline(time.Time{})
	s.relayLink(p.tunnel, p.client, c)
	return true
}

// relayLink copies between an outside client and the data connection bound
// to it, in the background, until both directions end; then it frees the
// client's place in its tunnel. An idle link holds no goroutine.
func (s *Server) relayLink(t *tunnel, client, data net.Conn) {
	s.mu.Lock()
	// From now on the link owns both conns, and Close reaches them through
	// it.
	delete(s.conns, client)
	delete(s.conns, data)
	s.wg.Add(1)
	var link *copier.Link
	link = copier.Start(client, data, func(res copier.Result) {
		s.count.relayed.Add(1)
		s.count.bytesToAgents.Add(res.AToB)
		s.count.bytesFromAgents.Add(res.BToA)
		if res.Err != nil {
			s.count.relayErrors.Add(1)
		}
		s.mu.Lock()
		delete(s.links, link)
		t.conns--
		if len(s.links) == 0 && s.linksDone != nil {
			close(s.linksDone)
			s.linksDone = nil
		}
		s.mu.Unlock()
		s.log.Debug("connection closed", "tunnel", t.id, "client", client.RemoteAddr().String(),
			"bytes_in", res.AToB, "bytes_out", res.BToA, "err", res.Err)
		s.wg.Done()
	})
	s.links[link] = struct{}{}
	s.mu.Unlock()
}

// pending is an outside client waiting for its agent's data connection.
type pending struct {
	token  [proto.TokenLen]byte
	client net.Conn
	tunnel *tunnel
	timer  *time.Timer
}

// takePending removes and returns the client waiting for token, or nil. A
// token is usable once: whoever takes it first owns the client.
func (s *Server) takePending(token [proto.TokenLen]byte) *pending {
	s.mu.Lock()
	p := s.pending[token]
	if p != nil {
		delete(s.pending, token)
		p.tunnel.pending--
	}
	s.mu.Unlock()
	return p
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

func (s *Server) untrackConn(c net.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

func (s *Server) closeConn(c net.Conn) {
	s.untrackConn(c)
	c.Close()
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// stopAccepting marks the server closed and closes every listener, and every
// agent session with its public ports and waiting clients. Relayed
// connections are left to run.
func (s *Server) stopAccepting(reason string) {
	s.mu.Lock()
	s.closed = true
	lns := make([]net.Listener, 0, len(s.listeners))
	for ln := range s.listeners {
		lns = append(lns, ln)
	}
	sessions := make([]*session, 0, len(s.sessions))
	for sess := range s.sessions {
		sessions = append(sessions, sess)
	}
	s.mu.Unlock()

	for _, ln := range lns {
		ln.Close()
	}
	for _, sess := range sessions {
		sess.goAway(reason)
	}
}

// Shutdown stops accepting agents and outside clients, tells every agent the
// relay is going away, closes waiting clients, and lets relayed connections
// drain until they end or ctx is done; then it closes what is left and waits
// for every goroutine. It returns ctx.Err() if the drain was cut short.
func (s *Server) Shutdown(ctx context.Context) error {
	s.stopAccepting("relay shutting down")
	var err error
	for {
		s.mu.Lock()
		if len(s.links) == 0 {
			s.mu.Unlock()
			break
		}
		if s.linksDone == nil {
			s.linksDone = make(chan struct{})
		}
		done := s.linksDone
		s.mu.Unlock()
		select {
		case <-done:
			continue
		case <-ctx.Done():
			err = ctx.Err()
		}
		break
	}
	s.Close()
	return err
}

// Close closes every listener and connection at once and waits for the
// server's goroutines to return.
func (s *Server) Close() error {
	s.stopAccepting("relay closing")
	s.mu.Lock()
	conns := make([]net.Conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	links := make([]*copier.Link, 0, len(s.links))
	for l := range s.links {
		links = append(links, l)
	}
	for tok, p := range s.pending {
		delete(s.pending, tok)
		p.timer.Stop()
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
	for _, l := range links {
		l.Close()
	}
	s.wg.Wait()
	return nil
}

// Stats is a snapshot of what the relay holds.
type Stats struct {
	Agents  int // authenticated control connections
	Tunnels int // open public ports
	Waiting int // outside clients waiting for their agent
	Relayed int // connections being relayed
	Parked  int // pre-opened data connections waiting for a client
}

// Stats returns a snapshot of the relay's state.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := Stats{Agents: len(s.sessions), Waiting: len(s.pending), Relayed: len(s.links)}
	for ss := range s.sessions {
		st.Tunnels += len(ss.tunnels)
		st.Parked += len(ss.pool)
	}
	return st
}
