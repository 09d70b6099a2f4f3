// Package testutil holds helpers shared by the relay's tests: an in-process
// relay on a loopback port 0, dials, echo servers and a raw agent. The leak
// check and Eventually are in package check.
package testutil

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/server"
)

// Relay is an in-process relay for tests.
type Relay struct {
	*server.Server
	Addr string // control address, 127.0.0.1:port
}

// StartRelay serves a relay on 127.0.0.1:0 and closes it when the test ends.
// Unless cfg sets one, logs go to the test log at debug level.
func StartRelay(t testing.TB, cfg server.Config) *Relay {
	t.Helper()
	return StartRelayAt(t, "127.0.0.1:0", cfg)
}

// StartRelayAt is StartRelay on a given address, e.g. the address of a relay
// that was closed, to play a restart.
func StartRelayAt(t testing.TB, addr string, cfg server.Config) *Relay {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return ServeRelay(t, ln, cfg)
}

// ServeRelay runs a relay with cfg on ln (logging to the test) until the
// test ends.
func ServeRelay(t testing.TB, ln net.Listener, cfg server.Config) *Relay {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = Logger(t)
	}
	srv, err := server.New(cfg)
	if err != nil {
		ln.Close()
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	t.Cleanup(func() {
		srv.Close()
		if err := <-done; !errors.Is(err, server.ErrServerClosed) {
			t.Errorf("Serve returned %v, want ErrServerClosed", err)
		}
	})
	return &Relay{Server: srv, Addr: ln.Addr().String()}
}

// Logger returns a logger that writes to t.Log, so logs show only for
// failing tests (or with -v).
func Logger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tlogWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tlogWriter struct{ t testing.TB }

func (w tlogWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// Dial connects to addr with a test-length timeout and closes the conn when
// the test ends.
func Dial(t testing.TB, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// Context returns a context that ends with the test, bounded to a minute.
func Context(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// ReadAllTimeout reads r to EOF, failing the test if that takes longer than d.
func ReadAllTimeout(t testing.TB, c net.Conn, d time.Duration) []byte {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(d))
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read to EOF: %v (after %d bytes)", err, len(b))
	}
	return b
}

// WaitParked waits until relay holds at least n pre-opened data
// connections: a park travels on its own socket, so nothing else orders it.
func WaitParked(t testing.TB, relay *Relay, n int) {
	t.Helper()
	check.Eventually(t, 5*time.Second, func() error {
		if got := relay.Stats().Parked; got < n {
			return fmt.Errorf("relay holds %d parked connections, want at least %d", got, n)
		}
		return nil
	})
}

// WaitRefused waits until connections to addr are refused: the relay
// closed the public port.
func WaitRefused(t testing.TB, addr string) {
	t.Helper()
	check.Eventually(t, 5*time.Second, func() error {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return nil
		}
		c.Close()
		return fmt.Errorf("public port %s still accepts connections", addr)
	})
}

// StartNamesRelay is StartRelay with a shared TLS port for names under
// "names.test" (server.ServeNames) on 127.0.0.1:0, whose address it
// returns too.
func StartNamesRelay(t testing.TB, cfg server.Config) (*Relay, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg.NamesDomain, cfg.NamesPort = "names.test", ln.Addr().(*net.TCPAddr).Port
	r := StartRelay(t, cfg)
	done := make(chan error, 1)
	go func() { done <- r.ServeNames(ln) }()
	t.Cleanup(func() {
		r.Close()
		if err := <-done; !errors.Is(err, server.ErrServerClosed) {
			t.Errorf("ServeNames returned %v, want ErrServerClosed", err)
		}
	})
	return r, ln.Addr().String()
}

// ServeNamesControl serves r's control listener on its shared TLS port
// (server.NamesControl, bound to 127.0.0.1) over TLS with a new
// self-signed certificate for 127.0.0.1, as ./relay does with -tls-cert
// (without its WebSocket sniffing: transport's own tests use this
// package), until the test ends, and returns the TLS config that trusts
// it, for an agent.
func ServeNamesControl(t testing.TB, r *Relay) *tls.Config {
	t.Helper()
	cert, pool := SelfSignedCert(t)
	ctl := r.NamesControl(&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	done := make(chan error, 1)
	go func() { done <- r.Serve(tls.NewListener(ctl, &tls.Config{Certificates: []tls.Certificate{cert}})) }()
	t.Cleanup(func() { r.Close(); <-done })
	return &tls.Config{RootCAs: pool}
}
