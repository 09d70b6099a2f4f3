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
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"time"

	"tcprelay/internal/proto"
)

// Errors returned by Listen; they wrap the relay's own message.
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
	// ErrRelayLost: the control connection to the relay ended.
	ErrRelayLost = errors.New("connection to relay lost")
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

	// DialTimeout bounds dialing the relay and the handshake. If zero, 10s.
	DialTimeout time.Duration

	// WriteTimeout bounds each write on the control connection. If zero, 10s.
	WriteTimeout time.Duration

	// Agent names this software in the relay's logs. If empty, "tcprelay-go".
	Agent string

	// Logger receives the library's logs. If nil, slog.Default().
	Logger *slog.Logger
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
// concurrent use.
type Listener struct {
	cfg      Config
	log      *slog.Logger
	addr     *Addr
	dataAddr string // where data connections are dialed: the relay's resolved control address
	conn     net.Conn
	br       *bufio.Reader

	wmu  sync.Mutex
	wbuf []byte

	conns     chan net.Conn // data connections ready for Accept
	done      chan struct{} // closed by Close
	lost      chan struct{} // closed when the control connection ends
	lostErr   error         // why; set before lost is closed
	closeOnce sync.Once
	wg        sync.WaitGroup
}

var _ net.Listener = (*Listener)(nil)

// Listen registers with the relay at relayAddr and opens a public port. It
// returns once the relay has bound the port, so Addr is final.
func (c *Config) Listen(ctx context.Context, relayAddr string) (*Listener, error) {
	host, _, err := net.SplitHostPort(relayAddr)
	if err != nil {
		return nil, fmt.Errorf("relay address %q: %w", relayAddr, err)
	}
	ctx, cancel := context.WithTimeout(ctx, c.dialTimeout())
	defer cancel()
	d := net.Dialer{KeepAlive: 15 * time.Second}
	conn, err := d.DialContext(ctx, "tcp", relayAddr)
	if err != nil {
		return nil, fmt.Errorf("dial relay: %w", err)
	}
	l := &Listener{
		cfg:      *c,
		log:      c.Logger,
		dataAddr: conn.RemoteAddr().String(),
		conn:     conn,
		br:       bufio.NewReader(conn),
		conns:    make(chan net.Conn),
		done:     make(chan struct{}),
		lost:     make(chan struct{}),
	}
	if l.log == nil {
		l.log = slog.Default()
	}
	// A cancelled ctx unblocks the handshake's reads and writes.
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	hb, err := l.handshake(host)
	if !stop() || err != nil {
		conn.Close()
		if err == nil || ctx.Err() != nil {
			err = fmt.Errorf("relay handshake: %w", context.Cause(ctx))
		}
		return nil, err
	}
	conn.SetDeadline(time.Time{})

	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		l.readLoop(hb)
	}()
	if hb > 0 {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			l.pingLoop(hb)
		}()
	}
	return l, nil
}

// handshake authenticates and opens the tunnel; it returns the heartbeat
// interval the relay asked for.
func (l *Listener) handshake(dialedHost string) (time.Duration, error) {
	agent := l.cfg.Agent
	if agent == "" {
		agent = "tcprelay-go"
	}
	agent = agent[:min(len(agent), maxAgentLen)]
	// Preamble and Hello leave in one segment.
	l.wbuf = append(l.wbuf[:0], proto.Preamble()...)
	if err := l.send(&proto.Hello{Agent: agent}); err != nil {
		return 0, fmt.Errorf("send hello: %w", err)
	}
	m, err := l.expect(proto.TypeChallenge)
	if err != nil {
		return 0, fmt.Errorf("read challenge: %w", err)
	}
	mac := proto.AuthMAC(l.cfg.Secret, m.(*proto.Challenge).Nonce)
	if err := l.send(&proto.Auth{MAC: mac}); err != nil {
		return 0, fmt.Errorf("send auth: %w", err)
	}
	m, err = l.expect(proto.TypeWelcome)
	if err != nil {
		return 0, err
	}
	hb := time.Duration(m.(*proto.Welcome).HeartbeatMillis) * time.Millisecond

	req := &proto.Listen{ID: 1, Port: uint16(l.cfg.Port)}
	if l.cfg.PortRequired {
		req.Flags |= proto.ListenPortRequired
	}
	if err := l.send(req); err != nil {
		return 0, fmt.Errorf("send listen: %w", err)
	}
	m, err = l.expect(proto.TypeListenOK)
	if err != nil {
		return 0, err
	}
	ok := m.(*proto.ListenOK)
	l.addr = &Addr{Host: ok.Host, Port: int(ok.Port)}
	if l.addr.Host == "" {
		l.addr.Host = dialedHost
	}
	return hb, nil
}

// expect reads frames until one of type want, skipping pings and unknown
// types; an Error frame becomes the matching sentinel error.
func (l *Listener) expect(want proto.Type) (proto.Message, error) {
	for {
		t, payload, err := proto.ReadFrame(l.br, nil, proto.DefaultMaxPayload)
		if err != nil {
			return nil, err
		}
		m, err := proto.Parse(t, payload)
		if errors.Is(err, proto.ErrUnknownType) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrProtocol, err)
		}
		switch m := m.(type) {
		case *proto.Error:
			return nil, relayError(m)
		case *proto.GoAway:
			return nil, fmt.Errorf("%w: %s", ErrShuttingDown, m.Message)
		case *proto.Ping:
			if err := l.send(&proto.Pong{Data: m.Data}); err != nil {
				return nil, err
			}
			continue
		}
		if t != want {
			return nil, fmt.Errorf("%w: got %s, want %s", ErrProtocol, t, want)
		}
		return m, nil
	}
}

func relayError(e *proto.Error) error {
	var sentinel error
	switch e.Code {
	case proto.CodeAuthFailed:
		sentinel = ErrAuthFailed
	case proto.CodePortUnavailable:
		sentinel = ErrPortUnavailable
	case proto.CodeLimit:
		sentinel = ErrLimit
	case proto.CodeShuttingDown:
		sentinel = ErrShuttingDown
	default:
		sentinel = ErrProtocol
	}
	return fmt.Errorf("%w: relay says: %s", sentinel, e.Message)
}

// send writes one frame (after anything already in wbuf) under the write
// timeout.
func (l *Listener) send(m proto.Message) error {
	l.wmu.Lock()
	defer l.wmu.Unlock()
	l.wbuf = proto.Append(l.wbuf, m)
	l.conn.SetWriteDeadline(time.Now().Add(l.cfg.writeTimeout()))
	_, err := l.conn.Write(l.wbuf)
	l.wbuf = l.wbuf[:0]
	return err
}

// readLoop serves the relay's frames until the control connection ends.
func (l *Listener) readLoop(hb time.Duration) {
	var err error
	defer func() {
		l.lostErr = fmt.Errorf("%w: %v", ErrRelayLost, err)
		close(l.lost)
		l.conn.Close()
	}()
	buf := make([]byte, 0, 256)
	for {
		if hb > 0 {
			l.conn.SetReadDeadline(time.Now().Add(3 * hb))
		}
		var t proto.Type
		var payload []byte
		t, payload, err = proto.ReadFrame(l.br, buf, proto.DefaultMaxPayload)
		if err != nil {
			return
		}
		m, perr := proto.Parse(t, payload)
		if perr != nil {
			if errors.Is(perr, proto.ErrUnknownType) {
				continue
			}
			err = fmt.Errorf("%w: %v", ErrProtocol, perr)
			return
		}
		switch m := m.(type) {
		case *proto.Incoming:
			l.wg.Add(1)
			go func() {
				defer l.wg.Done()
				l.openData(m)
			}()
		case *proto.Ping:
			if err = l.send(&proto.Pong{Data: m.Data}); err != nil {
				return
			}
		case *proto.GoAway:
			l.log.Info("relay is going away", "reason", m.Message)
		case *proto.Error:
			if m.ID == 0 {
				err = relayError(m)
				return
			}
			l.log.Warn("relay reported an error", "err", relayError(m))
		}
	}
}

func (l *Listener) pingLoop(every time.Duration) {
	tick := time.NewTicker(every)
	defer tick.Stop()
	for seq := uint64(1); ; seq++ {
		select {
		case <-l.lost:
			return
		case <-tick.C:
			if l.send(&proto.Ping{Data: seq}) != nil {
				l.conn.Close()
				return
			}
		}
	}
}

// openData dials the relay for one outside client, binds the connection to
// it with the token, and hands the connection to Accept. The relay sends no
// acknowledgement: raw bytes follow the Attach frame at once, so the new
// connection costs one TCP handshake and no further round trip.
func (l *Listener) openData(m *proto.Incoming) {
	d := net.Dialer{Timeout: l.cfg.dialTimeout(), KeepAlive: 15 * time.Second}
	c, err := d.Dial("tcp", l.dataAddr)
	if err != nil {
		l.log.Warn("data connection to relay failed", "client", m.Client, "err", err)
		return
	}
	frame := proto.Append(proto.Preamble(), &proto.Attach{Token: m.Token})
	c.SetWriteDeadline(time.Now().Add(l.cfg.writeTimeout()))
	if _, err := c.Write(frame); err != nil {
		l.log.Warn("data connection to relay failed", "client", m.Client, "err", err)
		c.Close()
		return
	}
	c.SetWriteDeadline(time.Time{})
	conn := &Conn{TCPConn: c.(*net.TCPConn), local: parseAddr(m.Local), remote: parseAddr(m.Client)}
	select {
	case l.conns <- conn:
	case <-l.done:
		c.Close()
	}
}

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
// that errors.Is(err, net.ErrClosed); after the relay connection is lost, one
// that errors.Is(err, ErrRelayLost).
func (l *Listener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: l.addr, Err: net.ErrClosed}
	case <-l.lost:
		select {
		case <-l.done:
			return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: l.addr, Err: net.ErrClosed}
		default:
			return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: l.addr, Err: l.lostErr}
		}
	}
}

// Close releases the public port and unblocks Accept. Connections already
// accepted stay open, as with any net.Listener.
func (l *Listener) Close() error {
	l.closeOnce.Do(func() {
		close(l.done)
		l.conn.Close()
		l.wg.Wait()
	})
	return nil
}

// Addr returns the public address outside clients connect to.
func (l *Listener) Addr() net.Addr { return l.addr }

// Conn is a relayed connection to one outside client. It embeds the data
// connection's *net.TCPConn, so CloseWrite works and io.Copy still uses
// splice(2).
type Conn struct {
	*net.TCPConn
	local, remote net.Addr
}

// RemoteAddr is the outside client's address, as the relay saw it.
func (c *Conn) RemoteAddr() net.Addr { return c.remote }

// LocalAddr is the relay's address that the client connected to, as an IP
// address and port (Listener.Addr gives the advertised name, if any).
func (c *Conn) LocalAddr() net.Addr { return c.local }
