package tunnel

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode"

	"tcprelay/internal/copier"
	"tcprelay/internal/proto"
)

// control is one control connection to a relay, from the handshake until
// it ends. A registration replaces it when it reconnects.
type control struct {
	l        *Listener
	r        *registration
	conn     *proto.Conn
	dataAddr string             // where data connections go: the address the control connection reached
	hb       time.Duration      // heartbeat the relay asked for; 0: none
	features proto.Features     // spoken by both sides
	key      [proto.MACLen]byte // the session key (feature proof)
	poolKey  *proto.PoolKey     // the relay's offer of pre-opened data connections; nil: none
	pool     *pool
	joins    atomic.Uint64 // PoolJoin sequence numbers used
	dialing  chan struct{} // a token per data connection being opened for an Incoming

	deadline time.Time // the end of the handshake

	tunnel uint32 // the relay's name for the tunnel
	addr   *Addr  // the public address
	ready  bool   // the readiness the relay was told at registration
	resume [proto.TokenLen]byte
}

// features is what this library speaks.
const features = proto.FeaturePool | proto.FeatureIdentity | proto.FeatureProof | proto.FeaturePools | proto.FeatureReady | proto.FeatureACL | proto.FeatureHostname | proto.FeatureReuse

// dialControl connects to r's relay, authenticates, and sends req to open
// the tunnel. The handshake is bounded by the dial timeout and by ctx.
func dialControl(ctx context.Context, r *registration, req *proto.Listen) (*control, error) {
	l := r.l
	ctx, cancel := context.WithTimeout(ctx, l.cfg.dialTimeout())
	defer cancel()
	conn, err := r.dialRelay(ctx, r.dialAddr, false)
	if err != nil {
		return nil, err
	}
	c := &control{l: l, r: r, conn: proto.NewConn(conn, l.cfg.writeTimeout(), proto.DefaultMaxPayload),
		dataAddr: conn.RemoteAddr().String(), dialing: make(chan struct{}, maxDialing)}
	// The handshake's reads and writes end at ctx's deadline, and a
	// cancelled ctx unblocks them.
	c.deadline, _ = ctx.Deadline()
	conn.SetDeadline(c.deadline)
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	err = c.handshake(req)
	if !stop() || err != nil {
		conn.Close()
		if err == nil || ctx.Err() != nil && !errors.Is(err, ErrProtocol) {
			err = fmt.Errorf("relay handshake: %w", context.Cause(ctx))
		}
		return nil, err
	}
	conn.SetDeadline(time.Time{})
	return c, nil
}

// dialRelay opens a stream to addr (r's relay's control port), with r's
// Dialer (direct or through a proxy: this file does not know which) and,
// if configured, runs the TLS handshake on it, verifying the relay's host
// unless the TLS configuration names a server. Data connections dial the
// address the control connection reached (see transport.Dialer), verify
// the same name, and resume a session where they can (see relayTLS).
func (r *registration) dialRelay(ctx context.Context, addr string, data bool) (net.Conn, error) {
	conn, err := r.dialer(ctx, addr)
	if err != nil {
		if final(err) {
			return nil, err
		}
		return nil, fmt.Errorf("%w: %w", errDial, err)
	}
	if r.tls == nil {
		return conn, nil
	}
	cfg := r.tls
	if data && r.tlsResume != nil && hasSession(r.tlsResume) {
		cfg = r.tlsResume
	}
	// Over Records, the copier that relays a data connection (./expose)
	// can park the direction that reads the relay, as over plain TCP.
	tc := tls.Client(copier.NewRecords(conn), cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		conn.Close()
		if errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) {
			return nil, fmt.Errorf("TLS handshake with relay %s: it closed the connection: the relay does not speak TLS (started without -tls-cert?), or this is not its control port: %w", addr, err)
		}
		var rh tls.RecordHeaderError
		if errors.As(err, &rh) {
			return nil, fmt.Errorf("TLS handshake with relay %s: it answered %q, not TLS: the relay does not speak TLS (started without -tls-cert?), or this is not its control port", addr, rh.RecordHeader[:])
		}
		return nil, fmt.Errorf("TLS handshake with relay %s: %w", addr, err)
	}
	if cfg == r.tlsResume && !tc.ConnectionState().DidResume {
		// A full handshake with X25519 alone: not post-quantum. Forget
		// the session the relay refused, and make a full one.
		tc.Close()
		cfg.ClientSessionCache.Put(cfg.ServerName, nil)
		return r.dialRelay(ctx, addr, false)
	}
	return tc, nil
}

// handshake authenticates and opens the tunnel.
func (c *control) handshake(req *proto.Listen) error {
	l := c.l
	agent := l.cfg.Agent
	if agent == "" {
		agent = "tcprelay-go"
	}
	agent = agent[:min(len(agent), maxAgentLen)]
	eph := proto.NewEphemeral()
	hello := &proto.Hello{Agent: agent, Features: features, Eph: eph.Public}
	if err := c.conn.Open(hello); err != nil {
		return fmt.Errorf("send hello: %w", err)
	}
	if err := c.checkRelay(proto.Append(proto.Preamble(), hello)); err != nil {
		return err
	}
	m, err := c.expect(proto.TypeChallenge)
	if err != nil {
		return fmt.Errorf("read challenge: %w", err)
	}
	ch := m.(*proto.Challenge)
	if err := proto.Require("relay", ch.Features, l.need); err != nil {
		return err
	}
	c.features = ch.Features & features
	if c.features&proto.FeatureProof != 0 && ch.Eph != ([proto.KeyLen]byte{}) {
		if c.key, err = eph.SessionKey(ch.Eph, ch.Nonce); err != nil {
			return fmt.Errorf("%w: session key: %v", ErrProtocol, err)
		}
	} else {
		c.features &^= proto.FeatureProof
	}
	auth := &proto.Auth{MAC: proto.AuthMAC(l.cfg.Secret, ch.Nonce)}
	if l.cfg.Key != nil && c.features&proto.FeatureIdentity != 0 {
		copy(auth.Key[:], l.cfg.Key.Public().(ed25519.PublicKey))
		signed := proto.IdentityMessage(ch.Nonce, hello.Eph, ch.Eph, proto.TLSBinding(c.conn.NetConn()))
		copy(auth.Sig[:], ed25519.Sign(l.cfg.Key, signed))
	}
	if err := c.conn.Send(auth); err != nil {
		return fmt.Errorf("send auth: %w", err)
	}
	m, err = c.expect(proto.TypeWelcome)
	if err != nil {
		return err
	}
	c.hb = time.Duration(m.(*proto.Welcome).HeartbeatMillis) * time.Millisecond

	if c.features&proto.FeatureReady == 0 {
		req.Flags &^= proto.ListenUnready // an older relay would refuse the flag
	}
	c.ready = req.Flags&proto.ListenUnready == 0
	if err := c.conn.Send(req); err != nil {
		return fmt.Errorf("send listen: %w", err)
	}
	m, err = c.expect(proto.TypeListenOK)
	if err != nil {
		return err
	}
	ok := m.(*proto.ListenOK)
	c.tunnel, c.resume = ok.Tunnel, ok.Resume
	c.addr = &Addr{Host: ok.Host, Port: int(ok.Port)}
	if c.addr.Host == "" {
		c.addr.Host = c.r.dialedHost
	}
	return nil
}

// sendReady tells the relay whether this member can take clients, if the
// relay has the feature.
func (c *control) sendReady(ready bool) {
	if c.features&proto.FeatureReady == 0 {
		c.l.log.Debug("relay cannot be told of readiness (no feature ready)", "relay", c.r.relayAddr)
		return
	}
	if err := c.conn.Send(&proto.Ready{Tunnel: c.tunnel, Ready: ready}); err != nil {
		c.conn.Close() // the registration reconnects, and tells it then
	}
}

// release gives the public port back (the relay keeps no reservation for
// it) and closes the control connection.
func (c *control) release() {
	c.conn.SendWithin(&proto.Close{Tunnel: c.tunnel}, time.Second)
	c.conn.Close()
}

// answerTimeout bounds the wait for the relay's first answer: a relay
// answers at once, and something that does not is no relay.
const answerTimeout = 5 * time.Second

// checkRelay looks at the first bytes the peer sent back, before anything
// is parsed: a relay's first frame is a Challenge (or an Error). Anything
// else, or silence, is reported for what it most likely is: a public port
// (which echoes what it got), a server of another protocol (HTTP, SSH,
// redis...), TLS on one side only.
func (c *control) checkRelay(sent []byte) error {
	nc := c.conn.NetConn()
	addr := c.r.relayAddr
	wait := min(answerTimeout, c.l.cfg.dialTimeout())
	nc.SetReadDeadline(time.Now().Add(wait))
	// Back to the handshake's deadline, never to none: a read past it
	// must still end.
	defer nc.SetReadDeadline(c.deadline)
	head, err := c.conn.Peek(proto.HeaderLen)
	var ne net.Error
	switch {
	case err == nil:
	case errors.As(err, &ne) && ne.Timeout() && len(c.conn.Buffered()) == 0:
		// Silence, or a close without a word: what a relay that evicts
		// handshakes under a flood does too, so these may be retried.
		return cutError{fmt.Errorf("%w: no answer from %s within %v: it does not look like a relay's control port", ErrProtocol, addr, wait)}
	case len(c.conn.Buffered()) == 0 && (errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)):
		if c.l.cfg.TLS != nil {
			return cutError{fmt.Errorf("%w: %s closed the connection without a word: is it a relay's control port?", ErrProtocol, addr)}
		}
		return cutError{fmt.Errorf("%w: %s closed the connection without a word: is it a relay's control port, and does the relay expect TLS?", ErrProtocol, addr)}
	}
	got := c.conn.Buffered()
	if len(head) == proto.HeaderLen {
		t, _, perr := proto.ParseHeader(head, proto.MaxPreAuthPayload)
		if perr == nil && (t == proto.TypeChallenge || t == proto.TypeError) {
			return nil
		}
	}
	sample := got[:min(len(got), 40)]
	switch {
	case len(got) >= 2 && (got[0] == 0x15 || got[0] == 0x16) && got[1] == 0x03:
		return fmt.Errorf("%w: %s answered in TLS: the relay expects TLS (give the agent -tls, -tls-ca or -tls-fingerprint)", ErrProtocol, addr)
	case bytes.HasPrefix(sent, sample):
		return fmt.Errorf("%w: %s sent back what the agent sent: it is not a relay's control port (a tunnel's public port?)", ErrProtocol, addr)
	}
	return fmt.Errorf("%w: %s answered %q: it does not look like a relay's control port", ErrProtocol, addr, sample)
}

// expect reads frames until one of type want, answering pings and skipping
// unknown types; an Error frame becomes the matching sentinel error.
func (c *control) expect(want proto.Type) (proto.Message, error) {
	for {
		m, err := c.conn.Read()
		if errors.Is(err, proto.ErrUnknownType) {
			continue
		}
		if err != nil && lost(err) {
			return nil, cutError{fmt.Errorf("connection to the relay lost during the handshake, waiting for its %s: %w", want, err)}
		}
		if err != nil {
			return nil, protocolError(err)
		}
		switch m := m.(type) {
		case *proto.Error:
			return nil, relayError(m)
		case *proto.GoAway:
			return nil, &goAwayError{m.Message, time.Duration(m.RetryMillis) * time.Millisecond}
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

// refusal is what the relay said in an Error frame: its code, as one of the
// sentinel errors, and its own words.
type refusal struct {
	kind  error
	words string
}

func (e *refusal) Error() string { return e.kind.Error() + ": relay says: " + relayWords(e.words) }

// relayWords is what a relay said, fit for a log line: quoted if it holds
// anything that does not print (a newline could forge lines of the
// agent's log), and cut at 256 bytes.
func relayWords(s string) string {
	if len(s) > 256 {
		s = s[:256] + "..."
	}
	if strings.ContainsFunc(s, func(r rune) bool { return !unicode.IsPrint(r) }) {
		return strconv.Quote(s)
	}
	return s
}
func (e *refusal) Unwrap() error { return e.kind }

// refused reports whether err is the relay's refusal, in its own words.
func refused(err error) bool {
	var rf *refusal
	return errors.As(err, &rf)
}

func relayError(e *proto.Error) error {
	var sentinel error
	switch e.Code {
	case proto.CodeAuthFailed:
		sentinel = ErrAuthFailed
	case proto.CodePortUnavailable, proto.CodePortReserved:
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
	return &refusal{sentinel, e.Message}
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
	case *proto.End:
		if c.pool != nil {
			c.pool.end(m)
		}
	case *proto.GoAway:
		return &goAwayError{m.Message, time.Duration(m.RetryMillis) * time.Millisecond}
	case *proto.Error:
		if m.ID == 0 {
			return relayError(m)
		}
		c.l.log.Warn("relay reported an error", "err", relayError(m))
	}
	return nil
}

// dataConn opens a data connection to the relay: preamble and first, and
// nothing after them.
func (c *control) dataConn(first proto.Message) (net.Conn, error) {
	l := c.l
	ctx, cancel := context.WithTimeout(l.ctx, l.cfg.dialTimeout())
	conn, err := c.r.dialRelay(ctx, c.dataAddr, true)
	cancel()
	if err != nil {
		return nil, err
	}
	conn.SetWriteDeadline(time.Now().Add(l.cfg.writeTimeout()))
	if _, err := conn.Write(proto.Append(proto.Preamble(), first)); err != nil {
		conn.Close()
		return nil, err
	}
	conn.SetWriteDeadline(time.Time{})
	return conn, nil
}

// maxDialing bounds the data connections that one control connection
// opens at once for announced clients. A burst of clients would otherwise
// open as many connections at once, all in handshake (TLS, over a slow
// link) together: past what the relay takes from one address (it still
// serves an Attach that comes past that limit, but only so many at a
// time) and past what the CPU can run in parallel. The others wait their
// turn.
const maxDialing = 64

// openData picks up one outside client: a data connection that shows the
// client's token (and, with feature proof, that it belongs to this
// session), handed to Accept. The relay sends no acknowledgement: raw bytes
// follow the Attach frame at once, so the new connection costs one TCP
// handshake and no further round trip. A connection that fails (a relay
// at its limits closes it unread) is dialed again, for up to the dial
// timeout: the client waits at the relay meanwhile.
func (c *control) openData(m *proto.Incoming) {
	a := &proto.Attach{Token: m.Token}
	if c.features&proto.FeatureProof != 0 {
		a.MAC = proto.ProofMAC(c.key, "attach", m.Token[:])
	}
	select {
	case c.dialing <- struct{}{}:
		defer func() { <-c.dialing }()
	case <-c.l.done:
		return
	}
	give := time.Now().Add(c.l.cfg.dialTimeout())
	for wait := 10 * time.Millisecond; ; wait = min(2*wait, time.Second) {
		conn, err := c.dataConn(a)
		if err == nil {
			c.l.deliver(&Conn{Conn: conn, local: parseAddr(m.Local), remote: parseAddr(m.Client)})
			return
		}
		if time.Until(give) < wait {
			c.l.log.Warn("data connection to relay failed", "client", m.Client, "err", err)
			return
		}
		select {
		case <-time.After(wait):
		case <-c.l.done:
			return
		}
	}
}
