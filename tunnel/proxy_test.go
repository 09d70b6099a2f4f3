package tunnel_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/testutil"
	"tcprelay/server"
	"tcprelay/tunnel"
)

// connectProxy is an HTTP CONNECT proxy for tests: it counts the streams
// it carried, and answers refuse (a status line) instead if it is set.
type connectProxy struct {
	URL     string
	streams atomic.Int64
	refuse  string
}

func startConnectProxy(t *testing.T, refuse string) *connectProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &connectProxy{URL: "http://" + ln.Addr().String(), refuse: refuse}
	testutil.Serve(t, ln, func(c net.Conn) {
		br := bufio.NewReader(c)
		req, err := http.ReadRequest(br)
		if err != nil || req.Method != "CONNECT" {
			return
		}
		if p.refuse != "" {
			io.WriteString(c, "HTTP/1.1 "+p.refuse+"\r\n\r\n")
			return
		}
		up, err := net.Dial("tcp", req.Host)
		if err != nil {
			io.WriteString(c, "HTTP/1.1 502 Bad Gateway\r\n\r\n")
			return
		}
		defer up.Close()
		p.streams.Add(1)
		io.WriteString(c, "HTTP/1.1 200 Connection established\r\n\r\n")
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			io.Copy(up, br)
			up.(*net.TCPConn).CloseWrite()
		}()
		io.Copy(c, up)
		c.(*net.TCPConn).CloseWrite()
		wg.Wait()
	})
	return p
}

// TestProxyCarriesEveryConnection: with Config.Proxy, the control
// connection, the pooled data connections and the announced ones all go
// through the proxy, and clients are served through it (half-close too,
// since this proxy carries it).
func TestProxyCarriesEveryConnection(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	for _, pool := range []bool{true, false} {
		p := startConnectProxy(t, "")
		ln := listen(t, relay.Addr, tunnel.Config{Proxy: p.URL, DisablePool: !pool})
		testutil.Serve(t, ln, testutil.Echo)
		if err := testutil.EchoCheck(ln.Addr().String(), []byte("through the proxy"), 5*time.Second); err != nil {
			t.Fatalf("pool %v: echo: %v", pool, err)
		}
		if pool {
			// The control connection and at least one pre-opened one.
			check.Eventually(t, 5*time.Second, func() error {
				if n := p.streams.Load(); n < 2 {
					return fmt.Errorf("the proxy carried %d streams, want the control connection and pooled data connections", n)
				}
				return nil
			})
		} else if n := p.streams.Load(); n != 2 {
			t.Errorf("without a pool the proxy carried %d streams, want 2: the control connection and the announced data connection", n)
		}
		ln.Close()
	}
}

// TestProxyWithPinnedTLS: TLS runs end to end with the relay on top of the
// proxied stream, the pin checked as directly.
func TestProxyWithPinnedTLS(t *testing.T) {
	check.Leaks(t)
	cert, _ := testutil.SelfSignedCert(t)
	relay := testutil.StartTLSRelay(t, server.Config{}, cert)
	sum := sha256.Sum256(cert.Certificate[0])
	pinned, err := tunnel.PinnedTLS(hex.EncodeToString(sum[:]))
	if err != nil {
		t.Fatal(err)
	}
	p := startConnectProxy(t, "")
	ln := listen(t, relay.Addr, tunnel.Config{Proxy: p.URL, TLS: pinned, DisablePool: true})
	testutil.Serve(t, ln, testutil.Echo)
	if err := testutil.EchoCheck(ln.Addr().String(), []byte("pinned through the proxy"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if n := p.streams.Load(); n != 2 {
		t.Errorf("the proxy carried %d streams, want 2", n)
	}

	wrong, _ := tunnel.PinnedTLS(strings.Repeat("ab", 32))
	cfg := tunnel.Config{Proxy: p.URL, TLS: wrong, Logger: testutil.Logger(t)}
	if l, err := cfg.Listen(testutil.Context(t), relay.Addr); err == nil || !strings.Contains(err.Error(), "fingerprint") {
		if l != nil {
			l.Close()
		}
		t.Fatalf("Listen through the proxy with the wrong pin: %v, want a fingerprint mismatch", err)
	}
}

// TestProxyRefusingCredentialsIsFinal: a 407 is not retried, even with
// WaitForRelay, and the error names the proxy and its answer; a 403 is
// retried, like an unreachable relay.
func TestProxyRefusingCredentialsIsFinal(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	p := startConnectProxy(t, "407 Proxy Authentication Required")
	cfg := tunnel.Config{Proxy: strings.Replace(p.URL, "://", "://user:wrong@", 1), WaitForRelay: true, Logger: testutil.Logger(t)}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	ln, err := cfg.Listen(ctx, relay.Addr)
	if err == nil {
		ln.Close()
		t.Fatal("Listen through a proxy that answers 407 succeeded")
	}
	want := "proxy " + p.URL + " refused CONNECT " + relay.Addr + ": 407 Proxy Authentication Required"
	if !strings.Contains(err.Error(), want) || strings.Contains(err.Error(), "wrong") {
		t.Errorf("error %q, want it to say %q, without the password", err, want)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("Listen took %v: a 407 was retried", took)
	}

	p = startConnectProxy(t, "403 Forbidden")
	// Long enough that a loaded machine still reaches the proxy (a second
	// was not, once in CI): what matters is that it ends by the context.
	ctx, cancel = context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	cfg.Proxy, cfg.MaxBackoff = p.URL, 100*time.Millisecond
	if ln, err := cfg.Listen(ctx, relay.Addr); err == nil {
		ln.Close()
		t.Fatal("Listen through a proxy that answers 403 succeeded")
	} else if !strings.Contains(err.Error(), "403 Forbidden") || ctx.Err() == nil {
		t.Errorf("error %q: want a 403 retried until the context ended", err)
	}
}

// TestProxySetting: a bad proxy URL fails Listen at once, naming what is
// wanted; "direct" ignores the environment's proxy.
func TestProxySetting(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	for _, bad := range []string{"proxy.example:3128", "ftp://proxy.example", "http://"} {
		cfg := tunnel.Config{Proxy: bad, WaitForRelay: true, Logger: testutil.Logger(t)}
		if ln, err := cfg.Listen(testutil.Context(t), relay.Addr); err == nil || !strings.Contains(err.Error(), "bad proxy URL") {
			if ln != nil {
				ln.Close()
			}
			t.Errorf("Proxy %q: %v, want a bad proxy URL error", bad, err)
		}
	}
	t.Setenv("HTTPS_PROXY", "ftp://not-a-proxy")
	cfg := tunnel.Config{Logger: testutil.Logger(t)}
	if ln, err := cfg.Listen(testutil.Context(t), "relay.example:8080"); err == nil || !strings.Contains(err.Error(), "HTTPS_PROXY") {
		if ln != nil {
			ln.Close()
		}
		t.Errorf("with a bad HTTPS_PROXY: %v, want an error naming it", err)
	}
	ln := listen(t, relay.Addr, tunnel.Config{Proxy: "direct"})
	testutil.Serve(t, ln, testutil.Echo)
	if err := testutil.EchoCheck(ln.Addr().String(), []byte("direct"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
}
