// Package transport is how an agent reaches a relay: a Dialer opens a byte
// stream to the relay's host:port, directly or through a proxy. The tunnel
// package builds one from its Config and uses it for every connection it
// makes (control, pooled data, announced data), and runs its own TLS, if
// any, on top of the stream it returns: it never learns which transport it
// got. A new transport (WebSocket, say) is a new Dialer here, and touches
// no file of the client's journey.
package transport

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	"golang.org/x/net/http/httpproxy"
)

// Dialer opens a byte stream to addr (host:port), within ctx's deadline: a
// cancelled or expired ctx ends the dial, however far it got.
//
// The conn it returns carries the stream's bytes as they are: if it
// implements syscall.Conn (as a *net.TCPConn, or a struct embedding one,
// does), its descriptor carries exactly those bytes, so callers may
// splice(2) them. Its RemoteAddr is an address that the same Dialer
// reaches the same peer by: the resolved address when dialing directly,
// addr itself through a proxy (which resolves it).
type Dialer func(ctx context.Context, addr string) (net.Conn, error)

// KeepAlive is the TCP keep-alive period of the direct dialer.
const KeepAlive = 15 * time.Second

// Direct dials TCP, with keep-alives every KeepAlive.
func Direct(ctx context.Context, addr string) (net.Conn, error) {
	d := net.Dialer{KeepAlive: KeepAlive}
	return d.DialContext(ctx, "tcp", addr)
}

// NoProxy is the proxy setting that means "dial directly", whatever the
// environment says.
const NoProxy = "direct"

// ErrProxyAuth marks a proxy's refusal of the credentials (HTTP 407, or
// 401 as tinyproxy answers a wrong password, or a SOCKS5 authentication
// failure): asking again with the same ones cannot
// change its answer.
var ErrProxyAuth = errors.New("proxy refused the credentials")

// ForRelay returns the Dialer that reaches the relay at addr (host:port)
// under the proxy setting proxy: a proxy URL (http://, https://, socks5://
// or socks5h://, each with optional user:password@); NoProxy ("direct")
// for none; or "" for the environment's choice (see FromEnvironment). via
// names the proxy for logs (without its password), "" if none. A malformed
// setting is an error that says what is wanted.
func ForRelay(proxy, addr string) (d Dialer, via string, err error) {
	var u *url.URL
	switch proxy {
	case NoProxy:
		return Direct, "", nil
	case "":
		if u, err = FromEnvironment(addr); err != nil || u == nil {
			return Direct, "", err
		}
	default:
		if u, err = ParseProxy(proxy); err != nil {
			return nil, "", err
		}
	}
	d, err = ViaProxy(u, Direct)
	return d, Redact(u), err
}

// ParseProxy parses a proxy URL and checks that ViaProxy can use it.
func ParseProxy(s string) (*url.URL, error) {
	u, err := url.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("bad proxy URL: %w", err)
	}
	if err := checkProxy(u); err != nil {
		return nil, err
	}
	return u, nil
}

func checkProxy(u *url.URL) error {
	switch u.Scheme {
	case "http", "https", "socks5", "socks5h":
	default:
		return fmt.Errorf("bad proxy URL %q: want http://, https://, socks5:// or socks5h://HOST[:PORT], with optional USER:PASSWORD@, or %q for none", Redact(u), NoProxy)
	}
	if u.Hostname() == "" {
		return fmt.Errorf("bad proxy URL %q: no host", Redact(u))
	}
	if (u.Path != "" && u.Path != "/") || u.RawQuery != "" {
		return fmt.Errorf("bad proxy URL %q: a proxy URL has no path or query", Redact(u))
	}
	return nil
}

// Environment variables read by FromEnvironment, in order of preference
// (the lower-case spellings are read too).
const (
	EnvHTTPSProxy = "HTTPS_PROXY"
	EnvAllProxy   = "ALL_PROXY"
	EnvNoProxy    = "NO_PROXY"
)

// FromEnvironment returns the proxy that the environment names for a
// relay at addr (host:port), as Go programs pick one for an https URL:
// HTTPS_PROXY (or https_proxy), else ALL_PROXY (or all_proxy); nil if
// neither is set, if NO_PROXY (or no_proxy) lists the relay's host, or if
// that host is "localhost" or a loopback address (Go never proxies those).
// A value without a scheme is taken as http://. An unusable value is an
// error that names the variable.
func FromEnvironment(addr string) (*url.URL, error) {
	name, val := EnvHTTPSProxy, getenv(EnvHTTPSProxy)
	if val == "" {
		name, val = EnvAllProxy, getenv(EnvAllProxy)
	}
	if val == "" {
		return nil, nil
	}
	cfg := httpproxy.Config{HTTPSProxy: val, NoProxy: getenv(EnvNoProxy)}
	u, err := cfg.ProxyFunc()(&url.URL{Scheme: "https", Host: addr})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if u == nil {
		return nil, nil
	}
	if err := checkProxy(u); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return u, nil
}

// getenv reads an environment variable in upper case, else in lower case.
func getenv(name string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return os.Getenv(strings.ToLower(name))
}

// Redact is u as a log line or an error may show it: scheme, host and
// port, never the password.
func Redact(u *url.URL) string {
	return (&url.URL{Scheme: u.Scheme, Host: u.Host}).String()
}

// proxyAddr is the proxy's host:port, with the scheme's default port.
func proxyAddr(u *url.URL) string {
	port := u.Port()
	if port == "" {
		port = map[string]string{"http": "80", "https": "443", "socks5": "1080", "socks5h": "1080"}[u.Scheme]
	}
	return net.JoinHostPort(u.Hostname(), port)
}

// ViaProxy returns a Dialer that reaches each address through the proxy at
// u, which it dials with next: an HTTP CONNECT proxy (http://, or https://
// for TLS to the proxy, verified against the system's roots for the
// proxy's host name) or a SOCKS5 proxy (socks5:// or socks5h://: either way
// the proxy resolves the name), with Basic or SOCKS5 username/password
// authentication if u has a user. A proxy that refuses gives an error that
// names it (without its password) and its answer.
func ViaProxy(u *url.URL, next Dialer) (Dialer, error) {
	if err := checkProxy(u); err != nil {
		return nil, err
	}
	if next == nil {
		next = Direct
	}
	p := &proxy{url: u, name: Redact(u), addr: proxyAddr(u), next: next}
	if u.Scheme == "http" || u.Scheme == "https" {
		return p.connect, nil
	}
	return p.socks5, nil
}

// proxy is one proxy and the way to reach it.
type proxy struct {
	url  *url.URL
	name string // the URL without credentials
	addr string // host:port
	next Dialer
	tls  *tls.Config // TLS to an https:// proxy; nil: system roots (tests set it)
}

// dial opens the connection to the proxy itself.
func (p *proxy) dial(ctx context.Context) (net.Conn, error) {
	conn, err := p.next(ctx, p.addr)
	if err != nil {
		return nil, fmt.Errorf("proxy %s: %w", p.name, err)
	}
	return conn, nil
}

// tunneled is a stream through a proxy over a plain TCP connection to it:
// the *net.TCPConn's methods (splice included), with the proxied address
// as RemoteAddr.
type tunneled struct {
	*net.TCPConn
	remote net.Addr
}

func (c *tunneled) RemoteAddr() net.Addr { return c.remote }

// target is the address asked of a proxy, as the proxy was given it.
type target string

func (a target) Network() string { return "tcp" }
func (a target) String() string  { return string(a) }
