package tunnel_test

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/testutil"
	"tcprelay/internal/transport"
	"tcprelay/server"
	"tcprelay/tunnel"
)

// startRelayAs serves a relay on addr (127.0.0.1:0 for any port) behind
// the listener ./relay uses: native and WebSocket agents, over TLS with
// cert if it is set.
func startRelayAs(t *testing.T, addr string, cfg server.Config, cert *tls.Certificate) *testutil.Relay {
	t.Helper()
	inner, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	var tlsCfg *tls.Config
	if cert != nil {
		tlsCfg = &tls.Config{Certificates: []tls.Certificate{*cert}}
	}
	return testutil.ServeRelay(t, transport.Listen(inner, tlsCfg), cfg)
}

// echoBack writes size bytes and reads them back on a new connection to
// addr, without half-closing (which a WebSocket path does not keep).
func echoBack(addr string, seed byte, size int) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	data := make([]byte, size)
	for i := range data {
		data[i] = seed + byte(i*7)
	}
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		werr <- err
	}()
	got := make([]byte, size)
	_, rerr := io.ReadFull(c, got)
	if err := <-werr; err != nil {
		return fmt.Errorf("client %d: write: %w", seed, err)
	}
	if rerr != nil {
		return fmt.Errorf("client %d: read: %w", seed, rerr)
	}
	if string(got) != string(data) {
		return fmt.Errorf("client %d: the echo differs", seed)
	}
	return nil
}

// wsPaths runs f on a listener registered over WebSocket: ws://, wss://
// verified by CA and by pin, each with pre-opened data connections and
// without; the relay's counters prove which path each client took.
func wsPaths(t *testing.T, f func(t *testing.T, relay *testutil.Relay, ln *tunnel.Listener)) {
	for _, scheme := range []string{"ws", "wss-ca", "wss-pin"} {
		for _, pool := range []bool{true, false} {
			t.Run(scheme+map[bool]string{false: "/announced", true: "/pooled"}[pool], func(t *testing.T) {
				check.Leaks(t)
				cfg := tunnel.Config{DisablePool: !pool}
				var relay *testutil.Relay
				url := "ws://"
				if scheme == "ws" {
					relay = startRelayAs(t, "127.0.0.1:0", server.Config{}, nil)
				} else {
					cert, roots := testutil.SelfSignedCert(t)
					relay = startRelayAs(t, "127.0.0.1:0", server.Config{}, &cert)
					url = "wss://"
					cfg.TLS = &tls.Config{RootCAs: roots}
					if scheme == "wss-pin" {
						pin, err := tunnel.PinnedTLS(tunnel.Fingerprint(cert.Certificate[0]))
						if err != nil {
							t.Fatal(err)
						}
						cfg.TLS = pin
					}
				}
				ln := listen(t, url+relay.Addr+"/relay", cfg)
				if pool {
					testutil.WaitParked(t, relay, 1)
				}
				f(t, relay, ln)
				hits := testutil.Metrics(t, relay.Server)["tcprelay_pool_hits_total"]
				if pool && hits == 0 || !pool && hits != 0 {
					t.Errorf("%d clients joined to pre-opened data connections, with the pool on = %v", hits, pool)
				}
			})
		}
	}
}

// TestWebSocketEcho: many clients at once, each with a quarter megabyte
// both ways, through a listener registered over WebSocket; the public
// address names the host the agent dialed.
func TestWebSocketEcho(t *testing.T) {
	wsPaths(t, func(t *testing.T, relay *testutil.Relay, ln *tunnel.Listener) {
		if h := ln.Addr().(*tunnel.Addr).Host; h != "127.0.0.1" {
			t.Errorf("Addr host = %q, want the URL's host", h)
		}
		testutil.Serve(t, ln, testutil.Echo)
		atOnce(t, 10, func(i int) error {
			return echoBack(ln.Addr().String(), byte(i), 256<<10)
		})
	})
}

// TestWebSocketHalfCloseEndsTheConnection: WebSocket cannot carry a
// half-close, so a client's half-close reaches the relayed server as EOF
// after every byte sent, and ends the connection: the server's answer
// cannot follow, and the client reads EOF instead of waiting forever.
func TestWebSocketHalfCloseEndsTheConnection(t *testing.T) {
	wsPaths(t, func(t *testing.T, relay *testutil.Relay, ln *tunnel.Listener) {
		client, c := acceptPair(t, ln)
		if _, err := client.Write([]byte("request")); err != nil {
			t.Fatal(err)
		}
		client.CloseWrite()
		if got := testutil.ReadAllTimeout(t, c, 5*time.Second); string(got) != "request" {
			t.Fatalf("server read %q, want %q then EOF", got, "request")
		}
		if got := testutil.ReadAllTimeout(t, client, 5*time.Second); len(got) != 0 {
			t.Fatalf("client read %q, want EOF", got)
		}
	})
}

// TestWebSocketReconnectSamePort: the relay restarts on its address; the
// listener registered over WebSocket comes back on its old public port.
func TestWebSocketReconnectSamePort(t *testing.T) {
	check.Leaks(t)
	relay := startRelayAs(t, "127.0.0.1:0", server.Config{}, nil)
	cfg, addrs := reconnecting()
	ln := listen(t, "ws://"+relay.Addr+"/", cfg)
	nextAddr(t, addrs)
	testutil.Serve(t, ln, testutil.Echo)
	pub := ln.Addr().String()
	if err := echoBack(pub, 1, 10<<10); err != nil {
		t.Fatal(err)
	}
	relay.Close()
	startRelayAs(t, relay.Addr, server.Config{}, nil)
	if a := nextAddr(t, addrs); a.String() != pub {
		t.Errorf("re-registered on %s, want the old port back: %s", a, pub)
	}
	if err := echoBack(pub, 2, 10<<10); err != nil {
		t.Fatalf("after the restart: %v", err)
	}
}

// TestWSSRefusesAWrongPin: wss:// checks the pin as native TLS does.
func TestWSSRefusesAWrongPin(t *testing.T) {
	check.Leaks(t)
	cert, _ := testutil.SelfSignedCert(t)
	relay := startRelayAs(t, "127.0.0.1:0", server.Config{}, &cert)
	wrong, _ := tunnel.PinnedTLS(strings.Repeat("ab", 32))
	cfg := tunnel.Config{TLS: wrong, Logger: testutil.Logger(t)}
	if l, err := cfg.Listen(testutil.Context(t), "wss://"+relay.Addr+"/"); err == nil || !strings.Contains(err.Error(), "fingerprint") {
		if l != nil {
			l.Close()
		}
		t.Fatalf("Listen over wss:// with the wrong pin: %v, want a fingerprint mismatch", err)
	}
	cfg.TLS = &tls.Config{}
	if _, err := cfg.Listen(testutil.Context(t), "ws://"+relay.Addr+"/"); err == nil || !strings.Contains(err.Error(), "wss://") {
		t.Fatalf("Listen over ws:// with TLS: %v, want an error that says wss://", err)
	}
}

// TestKeysOverEveryTransport: an agent key is accepted over native TLS
// through the relay's listener (its session bound to the TLS channel, as
// with tls.NewListener), and over ws:// and wss:// (where nothing is bound:
// the agent's TLS may end at a reverse proxy).
func TestKeysOverEveryTransport(t *testing.T) {
	check.Leaks(t)
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	cert, roots := testutil.SelfSignedCert(t)
	agents := []server.Agent{{Name: "web", Key: key.Public().(ed25519.PublicKey)}}
	tlsRelay := startRelayAs(t, "127.0.0.1:0", server.Config{Agents: agents}, &cert)
	plainRelay := startRelayAs(t, "127.0.0.1:0", server.Config{Agents: agents}, nil)
	for _, tc := range []struct{ name, addr string }{
		{"native TLS", tlsRelay.Addr},
		{"wss", "wss://" + tlsRelay.Addr + "/"},
		{"ws", "ws://" + plainRelay.Addr + "/"},
	} {
		cfg := tunnel.Config{Key: key, DisablePool: true}
		if !strings.HasPrefix(tc.addr, "ws://") {
			cfg.TLS = &tls.Config{RootCAs: roots}
		}
		ln := listen(t, tc.addr, cfg)
		testutil.Serve(t, ln, testutil.Echo)
		if err := echoBack(ln.Addr().String(), 3, 1000); err != nil {
			t.Errorf("%s: %v", tc.name, err)
		}
		ln.Close()
	}
}

// TestNativeLinksStillSpliceBehindTheRelayListener: behind the listener
// that tells WebSocket from native, a plain native link is still copied
// by splice(2), which parks an idle link without a goroutine; a buffered
// copy would hold two goroutines per link.
func TestNativeLinksStillSpliceBehindTheRelayListener(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the copier parks idle links on Linux only")
	}
	check.Leaks(t)
	relay := startRelayAs(t, "127.0.0.1:0", server.Config{}, nil)
	ln := listen(t, relay.Addr, tunnel.Config{})
	const n = 20
	exchangeOn := func(a, b net.Conn, msg string) {
		t.Helper()
		echoOnce := func(w, r net.Conn) {
			if _, err := w.Write([]byte(msg)); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, len(msg))
			r.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(r, buf); err != nil {
				t.Fatal(err)
			}
		}
		echoOnce(a, b)
		echoOnce(b, a)
	}
	first, c0 := acceptPair(t, ln)
	exchangeOn(first, c0, "x") // the first link starts the copier's poller
	g0 := runtime.NumGoroutine()
	for range n {
		client, c := acceptPair(t, ln)
		exchangeOn(client, c, "x")
	}
	check.Eventually(t, 5*time.Second, func() error {
		if g := runtime.NumGoroutine(); g-g0 >= n {
			return fmt.Errorf("%d idle native links hold %d goroutines: the relay copies them through a buffer, not by splice", n, g-g0)
		}
		return nil
	})
}
