package transport

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/coder/websocket"
)

// The WebSocket transport carries the native protocol, byte for byte, in
// the binary messages of one RFC 6455 connection: the agent side is here,
// the relay side in listen.go. It exists to pass where only HTTP does (a
// reverse proxy in front of the relay, a firewall that lets out only
// HTTPS). The framing and the HTTP upgrade are github.com/coder/websocket's.
//
// A WebSocket conn does not keep half-close: RFC 6455 has no way to end
// one direction only, so CloseWrite is not there, and the copier ends the
// whole connection where a TCP one would be half-closed.

// ParseRelay reads a relay address as an agent is given it: host:port,
// for the native protocol, or a ws:// or wss:// URL, for WebSocket. It
// returns the host:port to dial (for a URL: its host, and its port or the
// scheme's, 80 or 443) and the URL, nil for host:port.
func ParseRelay(s string) (addr string, ws *url.URL, err error) {
	if !strings.Contains(s, "://") {
		if _, _, err := net.SplitHostPort(s); err != nil {
			return "", nil, fmt.Errorf("relay address %q: %w", s, err)
		}
		return s, nil, nil
	}
	u, err := url.Parse(s)
	if err != nil {
		return "", nil, fmt.Errorf("relay URL: %w", err)
	}
	if u.Scheme != "ws" && u.Scheme != "wss" {
		return "", nil, fmt.Errorf("relay URL %q: want ws:// or wss://HOST[:PORT][/PATH], or HOST:PORT", s)
	}
	if u.Hostname() == "" {
		return "", nil, fmt.Errorf("relay URL %q: no host", s)
	}
	if u.User != nil {
		return "", nil, fmt.Errorf("relay URL %q: a relay URL has no user (give the secret with -secret or RELAY_SECRET)", u.Redacted())
	}
	port := u.Port()
	if port == "" {
		port = map[string]string{"ws": "80", "wss": "443"}[u.Scheme]
	}
	if u.Path == "" {
		u.Path = "/"
	}
	u.Fragment, u.RawFragment = "", ""
	return net.JoinHostPort(u.Hostname(), port), u, nil
}

// WebSocket returns a Dialer that reaches a relay over WebSocket at the
// ws:// or wss:// URL u. For each address it is given (host:port: u's, or
// the one the control connection reached), it opens the stream with next
// (direct or through a proxy), runs TLS for wss:// with tlsCfg (nil: the
// system's roots; an empty ServerName: u's host, as for the native -tls),
// then the HTTP/1.1 upgrade with u's host and path, and returns a conn
// that carries the stream in binary messages. That conn exposes no socket
// (it is no syscall.Conn): its bytes are framed and, from an agent,
// masked, so a copier cannot splice them. Its RemoteAddr is the address
// the stream reached, as Dialer says. A TLS configuration with a ws://
// URL is an error: there would be no TLS to apply it to.
func WebSocket(u *url.URL, tlsCfg *tls.Config, next Dialer) (Dialer, error) {
	switch {
	case u.Scheme != "ws" && u.Scheme != "wss":
		return nil, fmt.Errorf("relay URL %q: want ws:// or wss://", u.Redacted())
	case u.Scheme == "ws" && tlsCfg != nil:
		return nil, fmt.Errorf("relay URL %q: TLS is asked for, but ws:// is plain: write wss://", u.Redacted())
	}
	if next == nil {
		next = Direct
	}
	if u.Scheme == "wss" {
		cfg := &tls.Config{}
		if tlsCfg != nil {
			cfg = tlsCfg.Clone()
		}
		if cfg.ServerName == "" {
			cfg.ServerName = u.Hostname()
		}
		tlsCfg = cfg
	}
	return (&wsDialer{url: u, tls: tlsCfg, next: next}).dial, nil
}

type wsDialer struct {
	url  *url.URL
	tls  *tls.Config // for wss://; nil for ws://
	next Dialer
}

func (d *wsDialer) dial(ctx context.Context, addr string) (_ net.Conn, err error) {
	raw, err := d.next(ctx, addr)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			raw.Close()
		}
	}()
	// The TLS handshake and the upgrade end at ctx's deadline, or when ctx
	// is cancelled: a silent server cannot hold the agent.
	if dl, ok := ctx.Deadline(); ok {
		raw.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { raw.SetDeadline(time.Unix(1, 0)) })
	defer func() {
		if !stop() && err == nil {
			err = context.Cause(ctx)
		}
	}()
	stream := raw
	if d.tls != nil {
		tc := tls.Client(raw, d.tls)
		if err := tc.HandshakeContext(ctx); err != nil {
			return nil, fmt.Errorf("TLS handshake with relay %s (%s): %w", d.url.Redacted(), addr, err)
		}
		stream = tc
	}
	// The HTTP client gets the stream made above, once, whatever it asks.
	given := false
	once := func(context.Context, string, string) (net.Conn, error) {
		if given {
			return nil, errors.New("transport: a second connection for one WebSocket upgrade")
		}
		given = true
		return stream, nil
	}
	client := &http.Client{Transport: &http.Transport{DialContext: once, DialTLSContext: once, DisableKeepAlives: true}}
	ws, resp, err := websocket.Dial(ctx, d.url.String(), &websocket.DialOptions{HTTPClient: client})
	if err != nil {
		if resp != nil {
			return nil, fmt.Errorf("WebSocket upgrade at relay %s (%s): it answered %s", d.url.Redacted(), addr, resp.Status)
		}
		return nil, fmt.Errorf("WebSocket upgrade at relay %s (%s): %w", d.url.Redacted(), addr, err)
	}
	raw.SetDeadline(time.Time{})
	return newWSConn(ws, raw), nil
}

// wsConn is one WebSocket connection as a net.Conn: binary messages in
// both directions, the addresses of the stream under it, and a Close that
// does not wait on the peer.
type wsConn struct {
	net.Conn // websocket.NetConn
	raw      net.Conn
}

func newWSConn(ws *websocket.Conn, raw net.Conn) *wsConn {
	return &wsConn{Conn: websocket.NetConn(context.Background(), ws, websocket.MessageBinary), raw: raw}
}

// Read reads the bytes of the next binary messages. An empty p returns at
// once (the library's reader would wait for, and drop, a message).
func (c *wsConn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	n, err := c.Conn.Read(p)
	if err != nil && errors.Is(err, io.EOF) {
		// The peer's stream ended without a close frame (its Close raced
		// a read of its own): every byte it sent came before that, so the
		// stream ends as after a close frame.
		err = io.EOF
	}
	return n, err
}

func (c *wsConn) LocalAddr() net.Addr  { return c.raw.LocalAddr() }
func (c *wsConn) RemoteAddr() net.Addr { return c.raw.RemoteAddr() }

// closeWait bounds writing the close frame.
const closeWait = time.Second

// Close sends the close frame (the peer reads EOF after every byte sent
// before it) and closes the stream without waiting for the peer's own
// close frame, as the WebSocket library would for up to 5 seconds: a peer
// that is not reading (a parked pooled connection) must not hold its
// caller.
func (c *wsConn) Close() error {
	c.raw.SetReadDeadline(time.Unix(1, 0))
	c.raw.SetWriteDeadline(time.Now().Add(closeWait))
	err := c.Conn.Close()
	c.raw.Close()
	if errors.Is(err, net.ErrClosed) {
		return net.ErrClosed
	}
	return nil
}
