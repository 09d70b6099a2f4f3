// Package testutil holds helpers shared by the relay's tests: an in-process
// relay on a loopback port 0, and goroutine and file-descriptor leak checks.
package testutil

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime"
	"runtime/pprof"
	"strings"
	"testing"
	"time"

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
	if cfg.Logger == nil {
		cfg.Logger = Logger(t)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	srv := server.New(cfg)
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

// CheckLeaks records the goroutine and open-fd counts now and, when the test
// ends (after cleanups registered later have run), fails the test if they do
// not come back to that baseline within a few seconds. Call it first in a
// test, before anything is started; tests using it must not run in parallel.
func CheckLeaks(t testing.TB) {
	t.Helper()
	g0, fd0 := runtime.NumGoroutine(), OpenFDs(t)
	t.Cleanup(func() {
		var g, fd int
		deadline := time.Now().Add(5 * time.Second)
		for {
			// Go keeps splice pipes in a sync.Pool and closes them from a
			// finalizer: collect so pooled pipes do not count as leaks.
			runtime.GC()
			g, fd = runtime.NumGoroutine(), OpenFDs(t)
			if g <= g0 && fd <= fd0 || time.Now().After(deadline) {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if g > g0 {
			var buf bytes.Buffer
			pprof.Lookup("goroutine").WriteTo(&buf, 1)
			t.Errorf("goroutine leak: %d goroutines, baseline %d\n%s", g, g0, buf.String())
		}
		if fd > fd0 {
			t.Errorf("fd leak: %d open fds, baseline %d:\n%s", fd, fd0, describeFDs())
		}
	})
}

// describeFDs lists this process's fds and what they are.
func describeFDs() string {
	ents, _ := os.ReadDir("/proc/self/fd")
	var b strings.Builder
	for _, e := range ents {
		target, _ := os.Readlink("/proc/self/fd/" + e.Name())
		fmt.Fprintf(&b, "  fd %s -> %s\n", e.Name(), target)
	}
	return b.String()
}

// OpenFDs counts this process's open file descriptors.
func OpenFDs(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatalf("count fds: %v", err)
	}
	return len(ents) - 1 // the directory being read
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

// WaitParked polls until relay holds at least n pre-opened data
// connections: a park travels on its own socket, so nothing else orders it.
func WaitParked(t testing.TB, relay *Relay, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for relay.Stats().Parked < n {
		if time.Now().After(deadline) {
			t.Fatalf("relay holds %d parked connections, want at least %d", relay.Stats().Parked, n)
		}
		time.Sleep(time.Millisecond)
	}
}
