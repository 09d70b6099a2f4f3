package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"syscall"
	"time"

	"tcprelay/internal/proto"
)

// control is one control connection to the relay, from the handshake until
// it ends. A Listener replaces it when it reconnects.
type control struct {
	l        *Listener
	conn     *proto.Conn
	dataAddr string         // where data connections go: the relay's resolved address
	hb       time.Duration  // heartbeat the relay asked for; 0: none
	features proto.Features // spoken by both sides
	poolKey  *proto.PoolKey // the relay's offer of pre-opened data connections; nil: none
	pool     *pool
}

// features is what this library speaks.
const features = proto.FeaturePool

// dial connects to the relay, authenticates, and opens the tunnel on port
// (0: any). The handshake is bounded by the dial timeout and by ctx.
func (l *Listener) dial(ctx context.Context, port int, required bool) (*control, *Addr, error) {
	ctx, cancel := context.WithTimeout(ctx, l.cfg.dialTimeout())
	defer cancel()
	conn, err := l.dialRelay(ctx, l.relayAddr)
	if err != nil {
		return nil, nil, err
	}
	c := &control{l: l, conn: proto.NewConn(conn, l.cfg.writeTimeout(), proto.DefaultMaxPayload),
		dataAddr: conn.RemoteAddr().String()}
	// A cancelled ctx unblocks the handshake's reads and writes.
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	addr, err := c.handshake(port, required)
	if !stop() || err != nil {
		conn.Close()
		if err == nil || ctx.Err() != nil {
			err = fmt.Errorf("relay handshake: %w", context.Cause(ctx))
		}
		return nil, nil, err
	}
	conn.SetDeadline(time.Time{})
	return c, addr, nil
}

// dialRelay opens a TCP connection to addr (the relay's control port) and,
// if configured, runs the TLS handshake on it. Data connections dial the
// address the control connection resolved, and verify the same name.
func (l *Listener) dialRelay(ctx context.Context, addr string) (net.Conn, error) {
	d := net.Dialer{KeepAlive: 15 * time.Second}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial relay: %w", err)
	}
	if l.cfg.TLS == nil {
		return conn, nil
	}
	cfg := l.cfg.TLS
	if cfg.ServerName == "" {
		cfg = cfg.Clone()
		cfg.ServerName = l.dialedHost
	}
	tc := tls.Client(conn, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		conn.Close()
		return nil, fmt.Errorf("TLS handshake with relay: %w", err)
	}
	return tc, nil
}

// handshake authenticates and opens the tunnel.
func (c *control) handshake(port int, required bool) (*Addr, error) {
	agent := c.l.cfg.Agent
	if agent == "" {
		agent = "tcprelay-go"
	}
	agent = agent[:min(len(agent), maxAgentLen)]
	if err := c.conn.Open(&proto.Hello{Agent: agent, Features: features}); err != nil {
		return nil, fmt.Errorf("send hello: %w", err)
	}
	m, err := c.expect(proto.TypeChallenge)
	if err != nil {
		if c.l.cfg.TLS == nil && (errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)) {
			return nil, fmt.Errorf("read challenge: the relay closed the connection at once "+
				"(is this its control port, and does it expect TLS?): %w", err)
		}
		return nil, fmt.Errorf("read challenge: %w", err)
	}
	ch := m.(*proto.Challenge)
	if err := proto.Require("relay", ch.Features, c.l.need); err != nil {
		return nil, err
	}
	c.features = ch.Features & features
	mac := proto.AuthMAC(c.l.cfg.Secret, ch.Nonce)
	if err := c.conn.Send(&proto.Auth{MAC: mac}); err != nil {
		return nil, fmt.Errorf("send auth: %w", err)
	}
	m, err = c.expect(proto.TypeWelcome)
	if err != nil {
		return nil, err
	}
	c.hb = time.Duration(m.(*proto.Welcome).HeartbeatMillis) * time.Millisecond

	req := &proto.Listen{ID: 1, Port: uint16(port)}
	if required {
		req.Flags |= proto.ListenPortRequired
	}
	if err := c.conn.Send(req); err != nil {
		return nil, fmt.Errorf("send listen: %w", err)
	}
	m, err = c.expect(proto.TypeListenOK)
	if err != nil {
		return nil, err
	}
	ok := m.(*proto.ListenOK)
	addr := &Addr{Host: ok.Host, Port: int(ok.Port)}
	if addr.Host == "" {
		addr.Host = c.l.dialedHost
	}
	return addr, nil
}

// expect reads frames until one of type want, answering pings and skipping
// unknown types; an Error frame becomes the matching sentinel error.
func (c *control) expect(want proto.Type) (proto.Message, error) {
	for {
		m, err := c.conn.Read()
		if errors.Is(err, proto.ErrUnknownType) {
			continue
		}
		if err != nil {
			return nil, protocolError(err)
		}
		switch m := m.(type) {
		case *proto.Error:
			return nil, relayError(m)
		case *proto.GoAway:
			return nil, fmt.Errorf("%w: %s", ErrShuttingDown, m.Message)
		case *proto.Ping:
			if err := c.conn.Send(&proto.Pong{Data: m.Data}); err != nil {
				return nil, err
			}
			continue
		case *proto.PoolKey:
			c.poolKey = m
			continue
		}
		if m.Type() != want {
			return nil, fmt.Errorf("%w: got %s, want %s", ErrProtocol, m.Type(), want)
		}
		return m, nil
	}
}

// protocolError marks a malformed frame from the relay as ErrProtocol.
func protocolError(err error) error {
	if errors.Is(err, proto.ErrShortPayload) || errors.Is(err, proto.ErrFrameTooBig) {
		return fmt.Errorf("%w: %v", ErrProtocol, err)
	}
	return err
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
	case proto.CodeUnsupported:
		sentinel = ErrUnsupported
	default:
		sentinel = ErrProtocol
	}
	return fmt.Errorf("%w: relay says: %s", sentinel, e.Message)
}

// serve handles the relay's frames, and pings it, until the control
// connection ends; it returns why.
func (c *control) serve() error {
	lost := make(chan struct{})
	var wg sync.WaitGroup
	defer func() {
		close(lost)
		c.conn.Close()
		wg.Wait()
	}()
	if c.poolKey != nil && c.poolKey.Max > 0 && !c.l.cfg.DisablePool {
		c.pool = newPool(c, c.poolKey)
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.pool.run(lost)
		}()
	}
	return protocolError(c.conn.Serve(c.hb, c.handle))
}

// handle serves one message from the relay.
func (c *control) handle(m proto.Message) error {
	switch m := m.(type) {
	case *proto.Incoming:
		if c.pool != nil {
			c.pool.miss()
		}
		c.l.wg.Add(1)
		go func() {
			defer c.l.wg.Done()
			c.openData(m)
		}()
	case *proto.GoAway:
		return fmt.Errorf("%w: %s", ErrShuttingDown, m.Message)
	case *proto.Error:
		if m.ID == 0 {
			return relayError(m)
		}
		c.l.log.Warn("relay reported an error", "err", relayError(m))
	}
	return nil
}

// openData dials the relay for one outside client, binds the connection to
// it with the token, and hands the connection to Accept. The relay sends no
// acknowledgement: raw bytes follow the Attach frame at once, so the new
// connection costs one TCP handshake and no further round trip.
func (c *control) openData(m *proto.Incoming) {
	l := c.l
	ctx, cancel := context.WithTimeout(l.ctx, l.cfg.dialTimeout())
	conn, err := l.dialRelay(ctx, c.dataAddr)
	cancel()
	if err != nil {
		l.log.Warn("data connection to relay failed", "client", m.Client, "err", err)
		return
	}
	frame := proto.Append(proto.Preamble(), &proto.Attach{Token: m.Token})
	conn.SetWriteDeadline(time.Now().Add(l.cfg.writeTimeout()))
	if _, err := conn.Write(frame); err != nil {
		l.log.Warn("data connection to relay failed", "client", m.Client, "err", err)
		conn.Close()
		return
	}
	conn.SetWriteDeadline(time.Time{})
	l.deliver(&Conn{Conn: conn, local: parseAddr(m.Local), remote: parseAddr(m.Client)})
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
