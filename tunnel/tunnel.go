// Package tunnel makes a program reachable through a relay: Listen returns a
// net.Listener whose Accept yields one net.Conn per outside client that
// connects to the relay's public port. A server changes one line:
//
//	ln, err := net.Listen("tcp", ":8080")
//
// becomes
//
//	ln, err := tunnel.Listen(ctx, "relay.example.com:8080")
//
// and serves as before. ln.Addr() is the public address to give to clients;
// each conn's RemoteAddr() is the outside client's own address.
//
// Given several relays, the Listener registers with each of them, on the
// same public port, and Accept yields the clients of all: a relay that
// fails takes only its own share of the clients with it.
package tunnel

import (
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"tcprelay/internal/proto"
	"tcprelay/internal/transport"
)

// Errors returned by Listen and Accept; those from the relay wrap its own
// message.
var (
	// ErrAuthFailed: the relay refused the secret or key (or their absence).
	ErrAuthFailed = errors.New("authentication failed")
	// ErrPortUnavailable: the requested public port is taken, reserved for
	// another owner, or not allowed.
	ErrPortUnavailable = errors.New("public port unavailable")
	// ErrLimit: a relay limit was reached (no free port, too many tunnels).
	ErrLimit = errors.New("relay limit reached")
	// ErrShuttingDown: the relay is going away.
	ErrShuttingDown = errors.New("relay shutting down")
	// ErrProtocol: the relay said something this library does not understand.
	ErrProtocol = errors.New("relay protocol error")
	// ErrRelayLost: the control connection to the relay ended and
	// Config.DisableReconnect is set.
	ErrRelayLost = errors.New("connection to relay lost")
	// ErrUnsupported: the relay lacks a feature this Listener needs; the
	// message names it. Upgrade the relay.
	ErrUnsupported = proto.ErrUnsupported
)

// Config configures a relayed listener. The zero value is usable.
type Config struct {
	// Secret is the relay's shared secret. If empty, only an open relay, or
	// one that admits this agent's Key, accepts it.
	Secret string

	// Key, if set, is this agent's identity: relays that list its public
	// key (see PublicKey) in their agents file admit it with its scope, and
	// keep its public port for it across reconnections. See LoadKey.
	Key ed25519.PrivateKey

	// Port asks the relay for this public port. If zero, the relay picks
	// one. If the port is not available the relay picks another one, unless
	// PortRequired is set, in which case Listen fails. With several relays,
	// the port is the same on every relay: Port, or the one the first relay
	// picked, asked of the others as required.
	Port         int
	PortRequired bool

	// Pool, if set, joins the endpoint of that name: every agent that
	// gives the same pool name (and that the relay allows in it) serves
	// the same public port, and each outside client goes to one of them.
	// The pool's first member fixes its port. If empty, the port is this
	// agent's alone.
	Pool string

	// Hostname, if set, asks for a name on the relay's shared TLS port
	// instead of a port of its own: "db" is db.DOMAIN on a relay started
	// with -sni-domain DOMAIN (a name that already ends with DOMAIN is
	// taken whole). Each outside client then reaches this agent by
	// connecting to the shared port with TLS and that server name (SNI);
	// the relay passes its TLS through untouched, so the server behind the
	// Listener does the TLS, with a certificate for the name. Addr is
	// NAME:SHAREDPORT. It excludes Port. A relay without the feature
	// (hostname) is an ErrUnsupported.
	Hostname string

	// Allow and Deny narrow who may reach this agent's tunnels: an outside
	// client from a Deny prefix, or from none of a non-empty Allow, is
	// closed by the relay when it connects, before this agent hears of it.
	// They narrow what the relay's agents file allows for this agent,
	// never widen it. A relay without the feature (acl) is an
	// ErrUnsupported. If empty, anyone the relay lets in.
	Allow, Deny []netip.Prefix

	// StartUnready registers the Listener as not ready for clients: the
	// relay sends them to the pool's other members until SetReady(true).
	StartUnready bool

	// Proxy is how the agent reaches the relays: a proxy URL, through
	// which every connection to a relay goes (control, pooled and
	// announced data): http://HOST:PORT or https://HOST:PORT for an HTTP
	// CONNECT proxy (https: TLS to the proxy, verified against the system's
	// roots), socks5://HOST:PORT or socks5h://HOST:PORT for a SOCKS5 proxy
	// (either way the proxy resolves the relay's name), each with optional
	// USER:PASSWORD@. If empty, the environment's proxy for each relay, as Go
	// programs read it for an https URL: HTTPS_PROXY, else ALL_PROXY, unless
	// NO_PROXY lists the relay (and never for localhost or a loopback
	// address). "direct" means no proxy, whatever the environment says. TLS
	// runs on top of the proxied stream, end to end with the relay.
	//
	// A proxy that refuses the credentials (407, or SOCKS5's refusal) fails
	// like a relay that refuses the secret: retrying cannot change it. Its
	// other refusals (a 403, a 502 while the relay is down) are retried like
	// an unreachable relay.
	Proxy string

	// TLS, if set, secures the control and data connections to the relay.
	// If its ServerName is empty, the host of the relay address is used.
	// See PinnedTLS for a relay with a self-signed certificate.
	TLS *tls.Config

	// DialTimeout bounds dialing the relay and the handshake. If zero, 10s.
	DialTimeout time.Duration

	// WriteTimeout bounds each write on the control connection. If zero, 10s.
	WriteTimeout time.Duration

	// OnAddr, if set, is called with the public address each time a relay
	// registers the Listener: at Listen, for each relay, and again after
	// each reconnection. Calls for different relays may run concurrently;
	// it must not block.
	OnAddr func(net.Addr)

	// WaitForRelay makes Listen keep trying, with the reconnection backoff,
	// while no relay can be reached or the connection dies during the
	// handshake (closed, reset or silent, as a relay under a flood evicts
	// handshakes), until one registers it or ctx ends. A refusal in the
	// relay's own words that retrying cannot change (authentication, a
	// required port, a missing feature) still fails at once. If false,
	// Listen fails at once.
	WaitForRelay bool

	// DisableReconnect makes Accept fail with ErrRelayLost when the control
	// connection ends, instead of reconnecting.
	DisableReconnect bool

	// DisablePool turns off pre-opened data connections: each new client
	// then costs a round trip to the relay before its first byte.
	DisablePool bool

	// MaxBackoff caps the wait between reconnection attempts, which starts
	// at 250ms and doubles, with jitter. If zero, 30s.
	MaxBackoff time.Duration

	// Agent names this software in the relay's logs. If empty, "tcprelay-go".
	Agent string

	// Logger receives the library's logs. If nil, slog.Default().
	Logger *slog.Logger

	// require adds features the relay must have (tests only).
	require proto.Features

	// dial, if set, replaces the dial of the relay, Proxy included (tests
	// only).
	dial transport.Dialer
}

// needs is the set of features a relay must have to serve c; Listen fails
// with ErrUnsupported, naming them, at a relay that lacks one.
func (c *Config) needs() proto.Features {
	need := c.require
	if c.Key != nil {
		need |= proto.FeatureIdentity
	}
	if c.Pool != "" {
		need |= proto.FeaturePools
	}
	if len(c.Allow)+len(c.Deny) > 0 {
		need |= proto.FeatureACL
	}
	if c.Hostname != "" {
		need |= proto.FeatureHostname
	}
	return need
}

// maxAgentLen keeps Hello well inside the relay's pre-authentication frame
// limit.
const maxAgentLen = 256

func (c *Config) dialTimeout() time.Duration {
	if c.DialTimeout <= 0 {
		return 10 * time.Second
	}
	return c.DialTimeout
}

func (c *Config) minBackoff() time.Duration { return min(250*time.Millisecond, c.maxBackoff()) }

func (c *Config) maxBackoff() time.Duration {
	if c.MaxBackoff <= 0 {
		return 30 * time.Second
	}
	return c.MaxBackoff
}

func (c *Config) writeTimeout() time.Duration {
	if c.WriteTimeout <= 0 {
		return 10 * time.Second
	}
	return c.WriteTimeout
}

// Listen registers with the relays at relayAddrs with the zero Config.
// Each address is the host:port of a relay's control port, for the native
// protocol, or a ws:// or wss:// URL, for WebSocket (through a reverse
// proxy in front of the relay, say): wss://relay.example.com/ dials port
// 443, runs TLS (verified as Config.TLS says, or against the system's
// roots), then the HTTP upgrade with the URL's host and path.
func Listen(ctx context.Context, relayAddrs ...string) (*Listener, error) {
	var c Config
	return c.Listen(ctx, relayAddrs...)
}

// Listener is a net.Listener for a relay's public port, on one relay or on
// several. It is safe for concurrent use. When the control connection to a
// relay is lost, the Listener reconnects to it by itself and asks for the
// same public port; Accept keeps waiting meanwhile, and connections already
// relayed keep flowing.
type Listener struct {
	cfg  Config
	log  *slog.Logger
	need proto.Features
	regs []*registration

	mu    sync.Mutex
	port  int  // the public port on every relay: Config.Port or the first one granted
	fixed bool // port is fixed: ask every relay for it as required
	ready bool // can take clients (SetReady)

	conns     chan net.Conn   // data connections ready for Accept
	ctx       context.Context // cancelled by Close
	cancel    context.CancelFunc
	done      <-chan struct{} // ctx.Done()
	failed    chan struct{}   // closed when the Listener gives up
	failErr   error           // why; set before failed is closed
	closeOnce sync.Once
	wg        sync.WaitGroup
}

var _ net.Listener = (*Listener)(nil)

// Listen registers with each relay at relayAddrs and opens a public port on
// it. It returns once every relay has answered: registered, with the port
// bound, or failed. It fails if no relay registered it (unless
// Config.WaitForRelay). A relay that failed or refused while another
// registered it is retried in the background, with the reconnection
// backoff; a refusal is logged at ERROR in the relay's own words, and
// Status shows it. A relay that refused the secret or key, or lacks a
// feature, is given up on. Addr is the first relay's address, final until
// a reconnection; Addrs lists them all.
func (c *Config) Listen(ctx context.Context, relayAddrs ...string) (*Listener, error) {
	if len(relayAddrs) == 0 {
		return nil, errors.New("no relay address")
	}
	if c.Port < 0 || c.Port > 65535 {
		return nil, fmt.Errorf("Config.Port %d: want 0 (any) or 1-65535", c.Port)
	}
	if c.Hostname != "" {
		if c.Port != 0 {
			return nil, errors.New("Config.Hostname and Config.Port exclude each other: a name's port is the relay's shared one")
		}
		if err := proto.CheckHostname(strings.TrimSuffix(strings.ToLower(c.Hostname), ".")); err != nil {
			return nil, fmt.Errorf("Config.Hostname: %w", err)
		}
	}
	l := &Listener{
		cfg:    *c,
		log:    c.Logger,
		need:   c.needs(),
		port:   c.Port,
		fixed:  c.Port != 0 && c.PortRequired,
		ready:  !c.StartUnready,
		conns:  make(chan net.Conn),
		failed: make(chan struct{}),
	}
	if c.TLS != nil && c.TLS.ClientSessionCache == nil {
		// Every connection to a relay after the first resumes a TLS
		// session instead of a full handshake: the pool's refills above
		// all. The session came from a verified handshake (pinning
		// included), and only that relay's keys can resume it.
		l.cfg.TLS = c.TLS.Clone()
		l.cfg.TLS.ClientSessionCache = tls.NewLRUClientSessionCache(64)
	}
	native := l.cfg.TLS
	if native != nil && len(native.NextProtos) == 0 {
		// The relay's own protocol, so that a relay that serves its agents
		// on its shared TLS port tells them from the clients of its names,
		// whatever server name they sent. Not under a WebSocket, whose TLS
		// may end at a web server that would refuse an unknown protocol.
		native = native.Clone()
		native.NextProtos = []string{proto.ALPN}
	}
	if l.log == nil {
		l.log = slog.Default()
	}
	for _, a := range relayAddrs {
		addr, ws, err := transport.ParseRelay(a)
		if err != nil {
			return nil, err
		}
		host, _, _ := net.SplitHostPort(addr)
		dial, via, err := transport.ForRelay(c.Proxy, addr)
		if err != nil {
			return nil, fmt.Errorf("relay %s: %w", a, err)
		}
		if c.dial != nil {
			dial = c.dial
		}
		tlsCfg := native
		if ws != nil {
			// TLS, for wss://, is the WebSocket's, under it.
			if dial, err = transport.WebSocket(ws, l.cfg.TLS, dial); err != nil {
				return nil, err
			}
			tlsCfg = nil
		}
		if via != "" {
			l.log.Info("reaching the relay through a proxy", "relay", a, "proxy", via)
		}
		r := &registration{l: l, relayAddr: a, dialAddr: addr, dialedHost: host, dialer: dial}
		if tlsCfg != nil {
			r.tls, r.tlsResume = relayTLS(tlsCfg, host, addr)
		}
		l.regs = append(l.regs, r)
	}
	l.ctx, l.cancel = context.WithCancel(context.Background())
	l.done = l.ctx.Done()

	// One relay at a time: the first that registers fixes the port the
	// others are asked for. Each one serves as soon as it is registered. A
	// relay that refuses is not asked again here: if no other registers
	// the Listener, Listen fails with its refusal.
	delay := c.minBackoff()
	running := make(map[*registration]bool)   // registered, and started
	refusedBy := make(map[*registration]bool) // refused, not to be asked again here
	for {
		var errs []error
		for _, r := range l.regs {
			if running[r] || refusedBy[r] {
				continue
			}
			ctl, err := r.dial(ctx)
			if err == nil {
				running[r] = true
				r.start(ctl)
				continue
			}
			r.failed(err)
			errs = append(errs, err)
			if !transient(err) {
				refusedBy[r] = true
			}
			if len(l.regs) > 1 && refused(err) && !errors.Is(err, ErrShuttingDown) && !final(err) {
				// The others may serve: say it here, or nobody will
				// (giveUp says it of a final refusal).
				l.log.Error("relay refused the agent", "relay", r.relayAddr, "err", err)
			}
		}
		if len(running) > 0 {
			break
		}
		err := errors.Join(errs...)
		if len(errs) == 1 {
			err = errs[0]
		}
		if !c.WaitForRelay || len(refusedBy) == len(l.regs) || ctx.Err() != nil {
			l.cancel()
			return nil, err
		}
		l.log.Warn("no relay reachable yet; retrying", "err", err, "next_in", delay)
		select {
		case <-ctx.Done():
			l.cancel()
			return nil, fmt.Errorf("%w (last: %w)", ctx.Err(), err)
		case <-time.After(jitter(delay)):
		}
		delay = min(2*delay, c.maxBackoff())
	}
	// The relays that could not register it yet keep trying, with the
	// backoff, while the others serve: even one that refused (a port in use
	// may free up), unless retrying cannot change its answer.
	for _, r := range l.regs {
		st := r.state()
		switch {
		case running[r]:
		case final(st.err):
			l.giveUp(r, st.err)
		default:
			if !refused(st.err) {
				l.log.Warn("relay not registered yet; retrying in the background", "relay", r.relayAddr, "err", st.err)
			}
			r.start(nil)
		}
	}
	return l, nil
}

// final reports whether a relay's refusal is one that retrying cannot
// change: it refused the secret or key, or lacks a feature this Listener
// needs; or the proxy on the way refused its credentials.
func final(err error) bool {
	return errors.Is(err, ErrAuthFailed) || errors.Is(err, ErrUnsupported) || errors.Is(err, transport.ErrProxyAuth)
}

// errDial marks a relay that could not be reached at all.
var errDial = errors.New("dial relay")

// transient reports whether a first registration that failed may succeed
// if tried again: the relay could not be reached (not started yet,
// restarting, a network outage), the connection died in the middle of the
// handshake (closed, reset, or silent: a relay under a flood evicts
// handshakes so), or the relay was at a limit or shutting down. A relay
// that refuses the agent in its own words (authentication, a required
// port, a missing feature), or that answers what no relay says, is not
// worth waiting for.
func transient(err error) bool {
	return errors.Is(err, errDial) || errors.Is(err, ErrShuttingDown) || errors.Is(err, ErrLimit) ||
		lost(err) || errors.Is(err, context.DeadlineExceeded)
}

// cutError marks a handshake that the end of the connection cut short,
// before the relay said anything this agent could act on.
type cutError struct{ error }

func (e cutError) Unwrap() error { return e.error }

// lost reports whether err is the connection's end rather than something
// the relay said: EOF, a reset, a broken pipe, a timeout.
func lost(err error) bool {
	var ce cutError
	var ne net.Error
	return errors.As(err, &ce) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNABORTED) ||
		errors.Is(err, os.ErrDeadlineExceeded) || errors.As(err, &ne) && ne.Timeout()
}

// wantPort is the port to ask a relay for, and whether it is required.
func (l *Listener) wantPort() (int, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.cfg.Hostname != "" {
		return 0, false // a name's port is the relay's shared one
	}
	return l.port, l.fixed || l.cfg.PortRequired
}

// granted records the port a relay gave: with several relays, the first
// one fixes the port for all.
func (l *Listener) granted(port int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.cfg.Hostname != "" {
		return
	}
	if len(l.regs) > 1 && !l.fixed {
		l.port, l.fixed = port, true
	} else if len(l.regs) == 1 {
		l.port = port
	}
}

// giveUp records that registration r failed for good, and fails Accept once
// no relay is left.
func (l *Listener) giveUp(r *registration, err error) {
	r.setFinal(err)
	l.mu.Lock()
	left := 0
	for _, r := range l.regs {
		if r.final == nil {
			left++
		}
	}
	l.mu.Unlock()
	l.log.Error("gave up on the relay", "relay", r.relayAddr, "err", err)
	if left == 0 {
		l.failErr = err
		close(l.failed)
	}
}

func (l *Listener) isClosed() bool { return l.ctx.Err() != nil }

// Accept waits for the next outside client, from any relay. After Close it
// returns an error that errors.Is(err, net.ErrClosed). It returns another
// error only when the Listener has given up on every relay: the relay
// refused the secret or key on reconnection (ErrAuthFailed), or the
// connection was lost with DisableReconnect set (ErrRelayLost).
func (l *Listener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
	case <-l.failed:
		if !l.isClosed() {
			return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: l.Addr(), Err: l.failErr}
		}
	}
	return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: l.Addr(), Err: net.ErrClosed}
}

// Close releases the public port on every relay (at once: it is not kept
// reserved for this agent) and unblocks Accept. Connections already
// accepted stay open, as with any net.Listener.
func (l *Listener) Close() error {
	l.closeOnce.Do(func() {
		l.cancel()
		l.mu.Lock()
		for _, r := range l.regs {
			if r.ctl != nil {
				r.ctl.release()
			}
		}
		l.mu.Unlock()
		l.wg.Wait()
	})
	return nil
}

// SetReady tells every relay whether this agent can take new clients (for
// example, whether the server behind it is up). An agent that is not ready
// keeps its registrations, and the relays send new clients to the other
// members of its pool; with no member ready, they refuse new clients at
// once. Relays that lack the feature are not told.
func (l *Listener) SetReady(ready bool) {
	l.mu.Lock()
	if l.ready == ready {
		l.mu.Unlock()
		return
	}
	l.ready = ready
	var ctls []*control
	for _, r := range l.regs {
		if r.ctl != nil {
			ctls = append(ctls, r.ctl)
		}
	}
	l.mu.Unlock()
	for _, c := range ctls {
		c.sendReady(ready)
	}
}

// Addr returns the public address outside clients connect to: the first
// relay's that registered the Listener. It changes only if a reconnection
// could not get the same port back.
func (l *Listener) Addr() net.Addr {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, r := range l.regs {
		if r.addr != nil {
			return r.addr
		}
	}
	return &Addr{}
}

// Addrs returns the public address on each relay, in the order the relays
// were given; nil for a relay that has not registered the Listener yet.
func (l *Listener) Addrs() []net.Addr {
	l.mu.Lock()
	defer l.mu.Unlock()
	addrs := make([]net.Addr, len(l.regs))
	for i, r := range l.regs {
		if r.addr != nil {
			addrs[i] = r.addr
		}
	}
	return addrs
}

// RelayStatus is the Listener's standing with one relay.
type RelayStatus struct {
	// Relay is the relay's control address, as given to Listen.
	Relay string

	// Addr is the public address on that relay; nil while the Listener is
	// not registered there.
	Addr net.Addr

	// Err is why the Listener is not registered there: the last failure,
	// in the relay's own words when it refused (errors.Is it
	// ErrPortUnavailable, ErrAuthFailed, ErrLimit...), or the loss of the
	// connection. Nil while registered.
	Err error

	// GaveUp is set when the Listener no longer tries that relay: it
	// refused the secret or key, or lacks a feature the Listener needs
	// (or the connection was lost with DisableReconnect). Otherwise the
	// Listener keeps asking, with the reconnection backoff.
	GaveUp bool
}

// Status reports the Listener's standing with each relay, in the order
// the relays were given: a relay that refuses it (a port it cannot give,
// a limit) is listed with its own words while the others serve.
func (l *Listener) Status() []RelayStatus {
	l.mu.Lock()
	defer l.mu.Unlock()
	st := make([]RelayStatus, len(l.regs))
	for i, r := range l.regs {
		st[i] = RelayStatus{Relay: r.relayAddr, GaveUp: r.final != nil}
		if r.ctl != nil {
			st[i].Addr = r.ctl.addr
		} else {
			st[i].Err = r.err
		}
	}
	return st
}

// deliver hands a relayed conn to Accept, or closes it if the Listener
// closes first.
func (l *Listener) deliver(c *Conn) {
	select {
	case l.conns <- c:
	case <-l.done:
		c.Conn.Close()
	}
}
