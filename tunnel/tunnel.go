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
package tunnel

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"tcprelay/internal/proto"
)

// Errors returned by Listen and Accept; those from the relay wrap its own
// message.
var (
	// ErrAuthFailed: the relay refused the secret (or its absence).
	ErrAuthFailed = errors.New("authentication failed")
	// ErrPortUnavailable: the requested public port is taken or not allowed.
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
	// Secret is the relay's shared secret. If empty, only an open relay
	// accepts this agent.
	Secret string

	// Port asks the relay for this public port. If zero, the relay picks
	// one. If the port is not available the relay picks another one, unless
	// PortRequired is set, in which case Listen fails.
	Port         int
	PortRequired bool

	// TLS, if set, secures the control and data connections to the relay.
	// If its ServerName is empty, the host of the relay address is used.
	// See PinnedTLS for a relay with a self-signed certificate.
	TLS *tls.Config

	// DialTimeout bounds dialing the relay and the handshake. If zero, 10s.
	DialTimeout time.Duration

	// WriteTimeout bounds each write on the control connection. If zero, 10s.
	WriteTimeout time.Duration

	// OnAddr, if set, is called with the public address each time the
	// Listener registers again after losing the relay (the first address is
	// Addr's). It runs on the Listener's own goroutine and must not block.
	OnAddr func(net.Addr)

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
}

// needs is the set of features a relay must have to serve c; Listen fails
// with ErrUnsupported, naming them, at a relay that lacks one.
func (c *Config) needs() proto.Features { return c.require }

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

// Listen registers with the relay at relayAddr (host:port of its control
// port) with the zero Config.
func Listen(ctx context.Context, relayAddr string) (*Listener, error) {
	var c Config
	return c.Listen(ctx, relayAddr)
}

// Addr is a relayed public address. Host is the relay's advertised host, or
// the host the agent dialed when the relay advertises none; it may be a name.
type Addr struct {
	Host string
	Port int
}

func (a *Addr) Network() string { return "tcp" }
func (a *Addr) String() string  { return net.JoinHostPort(a.Host, strconv.Itoa(a.Port)) }

// Listener is a net.Listener for a relay's public port. It is safe for
// concurrent use. When the control connection to the relay is lost, the
// Listener reconnects by itself and asks for the same public port; Accept
// keeps waiting meanwhile, and connections already relayed keep flowing.
type Listener struct {
	cfg        Config
	log        *slog.Logger
	relayAddr  string
	dialedHost string
	need       proto.Features // features the relay must have for this Config

	mu   sync.Mutex
	addr *Addr    // current public address
	ctl  *control // current control connection; nil while reconnecting

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

// Listen registers with the relay at relayAddr and opens a public port. It
// returns once the relay has bound the port, so Addr is final until a
// reconnection (see Config.OnAddr). It fails at once if the relay cannot be
// reached or refuses: retrying the first registration is the caller's call.
func (c *Config) Listen(ctx context.Context, relayAddr string) (*Listener, error) {
	host, _, err := net.SplitHostPort(relayAddr)
	if err != nil {
		return nil, fmt.Errorf("relay address %q: %w", relayAddr, err)
	}
	if c.Port < 0 || c.Port > 65535 {
		return nil, fmt.Errorf("Config.Port %d: want 0 (any) or 1-65535", c.Port)
	}
	l := &Listener{
		cfg:        *c,
		log:        c.Logger,
		relayAddr:  relayAddr,
		dialedHost: host,
		need:       c.needs(),
		conns:      make(chan net.Conn),
		failed:     make(chan struct{}),
	}
	l.ctx, l.cancel = context.WithCancel(context.Background())
	l.done = l.ctx.Done()
	if l.log == nil {
		l.log = slog.Default()
	}
	ctl, addr, err := l.dial(ctx, c.Port, c.PortRequired)
	if err != nil {
		l.cancel()
		return nil, err
	}
	l.addr, l.ctl = addr, ctl
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		l.run(ctl)
	}()
	return l, nil
}

// run serves the control connection and, each time it is lost, reconnects
// with capped exponential backoff and jitter, asking for the same port.
func (l *Listener) run(ctl *control) {
	for {
		err := ctl.serve()
		l.mu.Lock()
		l.ctl = nil
		port := l.addr.Port
		l.mu.Unlock()
		if l.isClosed() {
			return
		}
		if l.cfg.DisableReconnect {
			l.fail(fmt.Errorf("%w: %w", ErrRelayLost, err))
			return
		}
		l.log.Warn("lost the relay; reconnecting", "relay", l.relayAddr, "err", err)
		var addr *Addr
		if ctl, addr = l.reconnect(port); ctl == nil {
			return
		}
		l.mu.Lock()
		if l.isClosed() {
			// Close ran after the dial: it could not see this conn.
			l.mu.Unlock()
			ctl.conn.Close()
			return
		}
		old := l.addr
		l.addr, l.ctl = addr, ctl
		l.mu.Unlock()
		l.log.Info("registered with the relay again", "addr", addr.String(), "same_port", addr.Port == old.Port)
		if l.cfg.OnAddr != nil {
			l.cfg.OnAddr(addr)
		}
	}
}

// reconnect dials until it registers again, the Listener is closed (nil),
// or the relay refuses for good (nil, after fail).
func (l *Listener) reconnect(port int) (*control, *Addr) {
	delay := l.cfg.minBackoff()
	for attempt := 1; ; attempt++ {
		// Full jitter over the upper half: agents cut off together do not
		// come back together.
		wait := delay/2 + time.Duration(rand.Int64N(int64(delay/2)+1))
		select {
		case <-l.done:
			return nil, nil
		case <-time.After(wait):
		}
		ctl, addr, err := l.dial(l.ctx, port, l.cfg.PortRequired)
		if err == nil {
			return ctl, addr
		}
		if l.isClosed() {
			return nil, nil
		}
		if errors.Is(err, ErrAuthFailed) {
			l.fail(err)
			return nil, nil
		}
		l.log.Warn("reconnect failed", "attempt", attempt, "err", err, "next_in", min(2*delay, l.cfg.maxBackoff()))
		delay = min(2*delay, l.cfg.maxBackoff())
	}
}

func (l *Listener) fail(err error) {
	l.failErr = err
	close(l.failed)
}

func (l *Listener) isClosed() bool { return l.ctx.Err() != nil }

func parseAddr(s string) net.Addr {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return net.TCPAddrFromAddrPort(ap)
	}
	return stringAddr(s)
}

type stringAddr string

func (a stringAddr) Network() string { return "tcp" }
func (a stringAddr) String() string  { return string(a) }

// Accept waits for the next outside client. After Close it returns an error
// that errors.Is(err, net.ErrClosed). It returns another error only when the
// Listener gives up on the relay: the relay refused the secret on
// reconnection (ErrAuthFailed), or the connection was lost with
// DisableReconnect set (ErrRelayLost).
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

// Close releases the public port and unblocks Accept. Connections already
// accepted stay open, as with any net.Listener.
func (l *Listener) Close() error {
	l.closeOnce.Do(func() {
		l.cancel()
		l.mu.Lock()
		if l.ctl != nil {
			l.ctl.conn.Close()
		}
		l.mu.Unlock()
		l.wg.Wait()
	})
	return nil
}

// Addr returns the public address outside clients connect to. It changes
// only if a reconnection could not get the same port back.
func (l *Listener) Addr() net.Addr {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.addr
}

// Conn is a relayed connection to one outside client: the agent's data
// connection to the relay, a *net.TCPConn or, with TLS, a *tls.Conn.
// ReadFrom and WriteTo hand over to the *net.TCPConn when there is one, so
// io.Copy between a Conn and another TCP connection still uses splice(2).
type Conn struct {
	net.Conn
	local, remote net.Addr
}

var (
	_ io.ReaderFrom = (*Conn)(nil)
	_ io.WriterTo   = (*Conn)(nil)
	_ syscall.Conn  = (*Conn)(nil)
)

// RemoteAddr is the outside client's address, as the relay saw it.
func (c *Conn) RemoteAddr() net.Addr { return c.remote }

// LocalAddr is the relay's address that the client connected to, as an IP
// address and port (Listener.Addr gives the advertised name, if any).
func (c *Conn) LocalAddr() net.Addr { return c.local }

// NetConn returns the data connection to the relay.
func (c *Conn) NetConn() net.Conn { return c.Conn }

// CloseWrite half-closes the connection: the outside client reads EOF after
// the bytes already written, and can keep sending.
func (c *Conn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

// errNotRaw is SyscallConn's answer when the data connection is TLS: its
// descriptor carries ciphertext, not the client's bytes.
var errNotRaw = errors.New("tunnel: data connection is not raw TCP")

// SyscallConn gives access to the data connection's socket when it is plain
// TCP, so copiers can splice(2) the client's bytes without a user-space
// copy. With TLS it returns an error.
func (c *Conn) SyscallConn() (syscall.RawConn, error) {
	if tc, ok := c.Conn.(*net.TCPConn); ok {
		return tc.SyscallConn()
	}
	return nil, errNotRaw
}

// ReadFrom copies r to the outside client.
func (c *Conn) ReadFrom(r io.Reader) (int64, error) {
	if tc, ok := c.Conn.(*net.TCPConn); ok {
		return tc.ReadFrom(r)
	}
	return io.Copy(struct{ io.Writer }{c.Conn}, r)
}

// WriteTo copies what the outside client sends to w.
func (c *Conn) WriteTo(w io.Writer) (int64, error) {
	if tc, ok := c.Conn.(*net.TCPConn); ok {
		return tc.WriteTo(w)
	}
	return io.Copy(w, struct{ io.Reader }{c.Conn})
}

// PinnedTLS returns a TLS configuration that trusts exactly the relay
// certificate whose SHA-256 fingerprint (of its DER encoding) is given, in
// hex with or without colons, as the relay logs it at start-up. Use it for
// a relay with a self-signed certificate.
func PinnedTLS(fingerprint string) (*tls.Config, error) {
	want, err := hex.DecodeString(strings.ReplaceAll(strings.TrimPrefix(fingerprint, "sha256:"), ":", ""))
	if err != nil || len(want) != sha256.Size {
		return nil, fmt.Errorf("bad certificate fingerprint %q: want 64 hex digits (SHA-256)", fingerprint)
	}
	return &tls.Config{
		// Chain verification is replaced by the pin below, which Go runs
		// on every handshake, resumed ones included.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("relay sent no certificate")
			}
			got := sha256.Sum256(cs.PeerCertificates[0].Raw)
			if !bytes.Equal(got[:], want) {
				return fmt.Errorf("relay certificate fingerprint %x does not match the pinned %x", got, want)
			}
			return nil
		},
	}, nil
}

// Fingerprint is the SHA-256 fingerprint of a certificate, as PinnedTLS
// takes it.
func Fingerprint(cert []byte) string {
	sum := sha256.Sum256(cert)
	return hex.EncodeToString(sum[:])
}
