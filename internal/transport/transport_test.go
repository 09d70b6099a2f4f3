package transport

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/testutil"
)

// fakeProxy is an HTTP CONNECT proxy that answers each request with
// answer (after recording it) and then, if the answer is a 200, echoes.
// An empty answer means silence until the client goes away.
func fakeProxy(t *testing.T, answer string) (addr string, requests chan *http.Request) {
	return fakeProxyOn(t, answer, nil)
}

// fakeProxyOn is fakeProxy, over TLS with cert if it is set.
func fakeProxyOn(t *testing.T, answer string, cert *tls.Certificate) (addr string, requests chan *http.Request) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if cert != nil {
		ln = tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{*cert}})
	}
	requests = make(chan *http.Request, 10)
	testutil.Serve(t, ln, func(c net.Conn) {
		req, err := http.ReadRequest(bufio.NewReader(c))
		if err != nil {
			return
		}
		requests <- req
		if answer == "" {
			io.Copy(io.Discard, c) // silent until the client closes
			return
		}
		io.WriteString(c, answer)
		if strings.HasPrefix(answer, "HTTP/1.1 200 ") && strings.Contains(answer, "\r\n\r\n") {
			io.Copy(c, c)
		}
	})
	return ln.Addr().String(), requests
}

func mustDialer(t *testing.T, proxy string) Dialer {
	t.Helper()
	u, err := ParseProxy(proxy)
	if err != nil {
		t.Fatal(err)
	}
	d, err := ViaProxy(u, nil)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestConnectCarriesTheStreamAndSendsCredentials(t *testing.T) {
	check.Leaks(t)
	addr, reqs := fakeProxy(t, "HTTP/1.1 200 Connection established\r\nVia: fake\r\n\r\n")
	d := mustDialer(t, "http://alice:s3cret@"+addr)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := d(ctx, "relay.example:8080")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	req := <-reqs
	if req.Method != "CONNECT" || req.Host != "relay.example:8080" {
		t.Errorf("proxy got %s %s, want CONNECT relay.example:8080", req.Method, req.Host)
	}
	if user, pass, ok := req.BasicAuth(); !ok {
		if got := req.Header.Get("Proxy-Authorization"); got != "Basic YWxpY2U6czNjcmV0" {
			t.Errorf("Proxy-Authorization = %q, want Basic of alice:s3cret", got)
		}
	} else {
		t.Errorf("credentials went in Authorization (%s:%s), want Proxy-Authorization", user, pass)
	}
	if got := c.RemoteAddr().String(); got != "relay.example:8080" {
		t.Errorf("RemoteAddr = %s, want the proxied address relay.example:8080 (redialing it must go through the proxy)", got)
	}
	if _, ok := c.(*tunneled); !ok {
		t.Errorf("conn is %T, want the *net.TCPConn wrapper that keeps splice", c)
	}
	if _, err := io.WriteString(c, "hello"); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "hello" {
		t.Fatalf("echo through the proxy: %q, %v", buf, err)
	}
}

func TestConnectKeepsBytesSentWithTheAnswer(t *testing.T) {
	check.Leaks(t)
	addr, _ := fakeProxy(t, "HTTP/1.0 200 OK\r\n\r\nearly bytes")
	d := mustDialer(t, "http://"+addr)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := d(ctx, "relay.example:8080")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, len("early bytes"))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "early bytes" {
		t.Fatalf("read %q, %v; want the bytes the proxy sent after its answer", buf, err)
	}
}

func TestConnectRefusalNamesTheProxyAndItsAnswer(t *testing.T) {
	for _, tc := range []struct {
		answer string
		want   string
		auth   bool
	}{
		{"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"x\"\r\n\r\n", "407 Proxy Authentication Required", true},
		{"HTTP/1.0 401 Unauthorized\r\n\r\n", "401 Unauthorized", true},
		{"HTTP/1.1 403 Forbidden\r\nContent-Length: 3\r\n\r\nno\n", "403 Forbidden", false},
		{"HTTP/1.1 502 Bad Gateway\r\n\r\n", "502 Bad Gateway", false},
		{"SSH-2.0-OpenSSH_9.2\r\n", `answered "SSH-2.0-OpenSSH_9.2\r\n": not an HTTP proxy`, false},
		{"HTTP/1.1 200", "answer cut short", false},
	} {
		t.Run(tc.want, func(t *testing.T) {
			check.Leaks(t)
			addr, _ := fakeProxy(t, tc.answer)
			d := mustDialer(t, "http://bob:hunter2@"+addr)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			c, err := d(ctx, "relay.example:8080")
			if err == nil {
				c.Close()
				t.Fatal("dial succeeded")
			}
			msg := err.Error()
			if !strings.Contains(msg, "proxy http://"+addr) || !strings.Contains(msg, tc.want) || !strings.Contains(msg, "relay.example:8080") {
				t.Errorf("error %q: want it to name the proxy http://%s, the relay, and %q", msg, addr, tc.want)
			}
			if strings.Contains(msg, "hunter2") {
				t.Errorf("error %q shows the proxy's password", msg)
			}
			if got := errors.Is(err, ErrProxyAuth); got != tc.auth {
				t.Errorf("errors.Is(err, ErrProxyAuth) = %v, want %v", got, tc.auth)
			}
		})
	}
}

func TestConnectToSilentProxyEndsAtTheDeadline(t *testing.T) {
	check.Leaks(t)
	addr, _ := fakeProxy(t, "")
	d := mustDialer(t, "http://"+addr)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	c, err := d(ctx, "relay.example:8080")
	if err == nil {
		c.Close()
		t.Fatal("dial through a silent proxy succeeded")
	}
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("dial took %v: the deadline did not end it", took)
	}
	if !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("error %v: want a deadline", err)
	}
}

func TestConnectEndsWhenCancelled(t *testing.T) {
	check.Leaks(t)
	addr, reqs := fakeProxy(t, "")
	d := mustDialer(t, "http://"+addr)
	ctx, cancel := context.WithCancel(context.Background())
	go func() { <-reqs; cancel() }()
	c, err := d(ctx, "relay.example:8080")
	if err == nil {
		c.Close()
		t.Fatal("dial succeeded")
	}
	if !errors.Is(err, context.Canceled) {
		t.Errorf("error %v: want context.Canceled", err)
	}
}

func TestUnreachableProxyIsNamed(t *testing.T) {
	check.Leaks(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	for _, scheme := range []string{"http", "socks5"} {
		d := mustDialer(t, scheme+"://u:pw@"+addr)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := d(ctx, "relay.example:8080")
		cancel()
		if err == nil || !strings.Contains(err.Error(), "proxy "+scheme+"://"+addr) || !strings.Contains(err.Error(), "refused") {
			t.Errorf("%s: error %v: want it to name the proxy and the refused connection", scheme, err)
		}
		if errors.Is(err, ErrProxyAuth) {
			t.Errorf("%s: an unreachable proxy is not a refusal of the credentials", scheme)
		}
	}
}

func TestParseProxy(t *testing.T) {
	for _, s := range []string{"http://p:3128", "https://user:pw@p", "socks5://p:1080", "socks5h://u:p@p"} {
		if _, err := ParseProxy(s); err != nil {
			t.Errorf("ParseProxy(%q): %v", s, err)
		}
	}
	for s, want := range map[string]string{
		"p:3128":               "want http://",
		"ftp://p":              "want http://",
		"http://":              "no host",
		"http://p:3128/x":      "no path",
		"socks4://u:secret@p1": "want http://",
	} {
		_, err := ParseProxy(s)
		if err == nil || !strings.Contains(err.Error(), want) || strings.Contains(err.Error(), "secret") {
			t.Errorf("ParseProxy(%q) = %v, want an error saying %q, without the password", s, err, want)
		}
	}
}

func TestFromEnvironment(t *testing.T) {
	for _, tc := range []struct {
		name                 string
		https, all, no, addr string
		want                 string
	}{
		{"nothing set", "", "", "", "relay.example:8080", ""},
		{"HTTPS_PROXY", "http://p:3128", "", "", "relay.example:8080", "http://p:3128"},
		{"no scheme is http", "p:3128", "", "", "relay.example:8080", "http://p:3128"},
		{"ALL_PROXY when no HTTPS_PROXY", "", "socks5://s:1080", "", "relay.example:8080", "socks5://s:1080"},
		{"HTTPS_PROXY before ALL_PROXY", "http://p:3128", "socks5://s:1080", "", "relay.example:8080", "http://p:3128"},
		{"NO_PROXY lists the host", "http://p:3128", "", "other.example,relay.example", "relay.example:8080", ""},
		{"NO_PROXY lists the domain", "", "socks5://s:1080", ".example", "relay.example:8080", ""},
		{"NO_PROXY lists another", "http://p:3128", "", "other.example", "relay.example:8080", "http://p:3128"},
		{"loopback never", "http://p:3128", "", "", "127.0.0.1:8080", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, v := range []string{"HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy"} {
				t.Setenv(v, "")
			}
			t.Setenv("HTTP_PROXY", "http://not-for-https:1") // https only: never read
			t.Setenv("https_proxy", tc.https)                // lower case is read too
			t.Setenv("ALL_PROXY", tc.all)
			t.Setenv("no_proxy", tc.no)
			u, err := FromEnvironment(tc.addr)
			if err != nil {
				t.Fatal(err)
			}
			got := ""
			if u != nil {
				got = u.String()
			}
			if got != tc.want {
				t.Errorf("FromEnvironment(%s) = %q, want %q", tc.addr, got, tc.want)
			}
		})
	}
}

func TestForRelay(t *testing.T) {
	t.Setenv("HTTPS_PROXY", "ftp://bad")
	if _, _, err := ForRelay("", "relay.example:8080"); err == nil || !strings.Contains(err.Error(), "HTTPS_PROXY") {
		t.Errorf("ForRelay with a bad HTTPS_PROXY: %v, want an error naming the variable", err)
	}
	if _, via, err := ForRelay(NoProxy, "relay.example:8080"); err != nil || via != "" {
		t.Errorf("ForRelay(%q) with a bad HTTPS_PROXY: %v, want direct, the environment ignored", NoProxy, err)
	}
	if _, _, err := ForRelay("relay.example:3128", "relay.example:8080"); err == nil {
		t.Error("ForRelay with a proxy URL without a scheme succeeded")
	}
	if _, via, err := ForRelay("socks5://u:pw@p:1080", "relay.example:8080"); err != nil || via != "socks5://p:1080" {
		t.Errorf("ForRelay(socks5://u:pw@p:1080) names the proxy %q (%v), want socks5://p:1080", via, err)
	}
	u, _ := url.Parse("http://p:3128")
	if _, err := ViaProxy(u, nil); err != nil {
		t.Error(err)
	}
}

// TestConnectOverTLSToTheProxy: https:// speaks TLS to the proxy, verified
// for the proxy's host name: a certificate the roots do not trust is
// refused, naming the proxy; a trusted one carries the stream.
func TestConnectOverTLSToTheProxy(t *testing.T) {
	check.Leaks(t)
	cert, roots := testutil.SelfSignedCert(t)
	addr, _ := fakeProxyOn(t, "HTTP/1.1 200 Connection established\r\n\r\n", &cert)
	_, port, _ := net.SplitHostPort(addr)
	u, err := ParseProxy("https://localhost:" + port)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	d, _ := ViaProxy(u, nil) // the system's roots: they do not know the test CA
	if c, err := d(ctx, "relay.example:8080"); err == nil {
		c.Close()
		t.Fatal("an untrusted proxy certificate was accepted")
	} else if !strings.Contains(err.Error(), "proxy https://localhost:"+port+": TLS handshake") || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("error %q: want a TLS handshake failure naming the proxy", err)
	}

	p := &proxy{url: u, name: Redact(u), addr: proxyAddr(u), next: Direct, tls: &tls.Config{RootCAs: roots}}
	c, err := p.connect(ctx, "relay.example:8080")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, "over TLS"); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len("over TLS"))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "over TLS" {
		t.Fatalf("echo through the TLS proxy: %q, %v", buf, err)
	}
	if got := c.RemoteAddr().String(); got != "relay.example:8080" {
		t.Errorf("RemoteAddr = %s, want relay.example:8080", got)
	}
}
