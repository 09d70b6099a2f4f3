package transport

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"

	xproxy "golang.org/x/net/proxy"
)

// socks5 opens a stream to addr through a SOCKS5 proxy (RFC 1928, with
// RFC 1929 username/password authentication), by golang.org/x/net/proxy.
// The proxy resolves addr's host.
func (p *proxy) socks5(ctx context.Context, addr string) (net.Conn, error) {
	var auth *xproxy.Auth
	if u := p.url.User; u != nil {
		auth = &xproxy.Auth{User: u.Username()}
		auth.Password, _ = u.Password()
	}
	// A dialer per stream, so that the connection to the proxy is known
	// here: x/net returns it wrapped in a type of its own, which would
	// hide the *net.TCPConn (and splice) from the caller.
	f := &forward{next: p.next}
	d, err := xproxy.SOCKS5("tcp", p.addr, auth, f)
	if err != nil {
		return nil, fmt.Errorf("proxy %s: %w", p.name, err)
	}
	if _, err := d.(xproxy.ContextDialer).DialContext(ctx, "tcp", addr); err != nil {
		var ue unreachable
		if errors.As(err, &ue) {
			return nil, fmt.Errorf("proxy %s: %w", p.name, ue.error)
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("proxy %s: CONNECT %s: %w", p.name, addr, context.Cause(ctx))
		}
		var oe *net.OpError
		if errors.As(err, &oe) {
			err = oe.Err
		}
		err = fmt.Errorf("proxy %s refused CONNECT %s: %w", p.name, addr, err)
		// x/net says so in words only.
		if s := err.Error(); strings.Contains(s, "authentication failed") || strings.Contains(s, "no acceptable authentication methods") {
			err = fmt.Errorf("%w (%w)", err, ErrProxyAuth)
		}
		return nil, err
	}
	if tc, ok := f.conn.(*net.TCPConn); ok {
		return &tunneled{tc, target(addr)}, nil
	}
	return &buffered{Conn: f.conn, r: f.conn, remote: target(addr)}, nil
}

// forward dials the SOCKS5 proxy for x/net, once, and keeps the conn.
type forward struct {
	next Dialer
	conn net.Conn
}

// unreachable marks a failure to reach the proxy itself.
type unreachable struct{ error }

func (e unreachable) Unwrap() error { return e.error }

func (f *forward) Dial(network, addr string) (net.Conn, error) {
	return f.DialContext(context.Background(), network, addr)
}

func (f *forward) DialContext(ctx context.Context, _, addr string) (net.Conn, error) {
	c, err := f.next(ctx, addr)
	if err != nil {
		return nil, unreachable{err}
	}
	f.conn = c
	return c, nil
}
