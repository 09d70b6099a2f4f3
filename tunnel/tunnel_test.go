package tunnel_test

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/nettest"

	"tcprelay/internal/check"
	"tcprelay/internal/testutil"
	"tcprelay/server"
	"tcprelay/tunnel"
)

// acceptPair connects an outside client to ln's public address and returns
// it with the conn Accept gave for it; both close when the test ends.
func acceptPair(t *testing.T, ln net.Listener) (*net.TCPConn, net.Conn) {
	t.Helper()
	client := testutil.Dial(t, ln.Addr().String())
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return client, c
}

// listen registers a tunnel with the relay and closes it when the test ends.
func listen(t *testing.T, relayAddr string, cfg tunnel.Config) *tunnel.Listener {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = testutil.Logger(t)
	}
	ln, err := cfg.Listen(testutil.Context(t), relayAddr)
	if err != nil {
		t.Fatalf("Listen: %v", err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

func TestAddrAndRemoteAddr(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	ln := listen(t, relay.Addr, tunnel.Config{})

	a, ok := ln.Addr().(*tunnel.Addr)
	if !ok || a.Host != "127.0.0.1" || a.Port == 0 {
		t.Fatalf("Addr() = %#v, want 127.0.0.1 (the dialed host) and a port", ln.Addr())
	}
	client, c := acceptPair(t, ln)
	if got, want := c.RemoteAddr().String(), client.LocalAddr().String(); got != want {
		t.Errorf("RemoteAddr() = %s, want the outside client's address %s", got, want)
	}
	if got, want := c.LocalAddr().String(), client.RemoteAddr().String(); got != want {
		t.Errorf("LocalAddr() = %s, want the relay address the client dialed, %s", got, want)
	}
}

func TestPublicHostAdvertised(t *testing.T) {
	relay := testutil.StartRelay(t, server.Config{PublicHost: "relay.example.com"})
	ln := listen(t, relay.Addr, tunnel.Config{})
	if h := ln.Addr().(*tunnel.Addr).Host; h != "relay.example.com" {
		t.Fatalf("Addr host = %q, want the relay's advertised host", h)
	}
}

// TestManyClientsManyTunnels relays random payloads through several tunnels
// with many concurrent clients each, writing and reading at the same time,
// and checks every byte by hash.
func TestManyClientsManyTunnels(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	const tunnels, clients, size = 4, 25, 256 << 10

	var wg sync.WaitGroup
	errc := make(chan error, tunnels*clients)
	for i := range tunnels {
		ln := listen(t, relay.Addr, tunnel.Config{})
		testutil.Serve(t, ln, testutil.Echo)
		for j := range clients {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errc <- echoRoundTrip(ln.Addr().String(), int64(i*1000+j), size)
			}()
		}
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		if err != nil {
			t.Error(err)
		}
	}
}

// atOnce runs client(0) to client(n-1) at the same time, each in a
// goroutine, and reports the errors they return.
func atOnce(t *testing.T, n int, client func(i int) error) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- client(i)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}

// echoRoundTrip sends size random bytes (from seed) through the echo server
// at addr while reading the echo concurrently, half-closes, and compares.
func echoRoundTrip(addr string, seed int64, size int) error {
	data := make([]byte, size)
	rand.New(rand.NewSource(seed)).Read(data)
	if err := testutil.EchoCheck(addr, data, 30*time.Second); err != nil {
		return fmt.Errorf("client %d: %w", seed, err)
	}
	return nil
}

// TestHalfClose: the client half-closes, the server sees EOF, and its answer
// still reaches the client, followed by EOF.
// paths runs f on a relayed listener over every data path: plain TCP and
// TLS, each with pre-opened data connections and without. With the pool on,
// a connection is parked before f runs and f's first client takes it; the
// relay's counters then prove which path each client took.
func paths(t *testing.T, f func(t *testing.T, ln *tunnel.Listener)) {
	for _, useTLS := range []bool{false, true} {
		for _, pool := range []bool{true, false} {
			name := map[bool]string{false: "tcp", true: "tls"}[useTLS] + map[bool]string{false: "/announced", true: "/pooled"}[pool]
			t.Run(name, func(t *testing.T) {
				check.Leaks(t)
				cfg := tunnel.Config{DisablePool: !pool}
				var relay *testutil.Relay
				if useTLS {
					cert, roots := testutil.SelfSignedCert(t)
					relay = testutil.StartTLSRelay(t, server.Config{}, cert)
					cfg.TLS = &tls.Config{RootCAs: roots}
				} else {
					relay = testutil.StartRelay(t, server.Config{})
				}
				ln := listen(t, relay.Addr, cfg)
				if pool {
					testutil.WaitParked(t, relay, 1)
				}
				f(t, ln)
				hits := testutil.Metrics(t, relay.Server)["tcprelay_pool_hits_total"]
				if pool && hits == 0 || !pool && hits != 0 {
					t.Errorf("%d clients joined to pre-opened data connections, with the pool on = %v", hits, pool)
				}
			})
		}
	}
}

func TestHalfClose(t *testing.T) {
	paths(t, func(t *testing.T, ln *tunnel.Listener) {
		client, c := acceptPair(t, ln)
		if _, err := client.Write([]byte("request")); err != nil {
			t.Fatal(err)
		}
		client.CloseWrite()

		if got := testutil.ReadAllTimeout(t, c, 5*time.Second); string(got) != "request" {
			t.Fatalf("server read %q, want %q then EOF", got, "request")
		}
		if _, err := c.Write([]byte("response")); err != nil {
			t.Fatalf("server write after client half-close: %v", err)
		}
		c.(interface{ CloseWrite() error }).CloseWrite()
		if got := testutil.ReadAllTimeout(t, client, 5*time.Second); string(got) != "response" {
			t.Fatalf("client read %q, want %q then EOF", got, "response")
		}
	})
}

// TestConnConformance runs x/net/nettest's net.Conn suite on relayed pairs:
// the outside client's conn and the conn Accept returned.
func TestConnConformance(t *testing.T) {
	paths(t, func(t *testing.T, ln *tunnel.Listener) {
		nettest.TestConn(t, func() (c1, c2 net.Conn, stop func(), err error) {
			c1, err = net.Dial("tcp", ln.Addr().String())
			if err != nil {
				return nil, nil, nil, err
			}
			c2, err = ln.Accept()
			if err != nil {
				c1.Close()
				return nil, nil, nil, err
			}
			return c1, c2, func() { c1.Close(); c2.Close() }, nil
		})
	})
}

func TestCloseUnblocksAcceptAndFreesPort(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	ln := listen(t, relay.Addr, tunnel.Config{})
	pub := ln.Addr().String()

	errc := make(chan error, 1)
	go func() {
		_, err := ln.Accept()
		errc <- err
	}()
	ln.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Accept after Close: %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not unblock Accept")
	}
	if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("second Accept after Close: %v, want net.ErrClosed", err)
	}
	testutil.WaitRefused(t, pub)
}

// TestRelayGoneEndsAccept: without reconnection, when the relay closes,
// Accept returns an error wrapping ErrRelayLost (not net.ErrClosed: the
// caller did not close it).
func TestRelayGoneEndsAccept(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	ln := listen(t, relay.Addr, tunnel.Config{DisableReconnect: true})
	relay.Close()
	_, err := ln.Accept()
	if !errors.Is(err, tunnel.ErrRelayLost) || errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept after the relay closed: %v, want ErrRelayLost", err)
	}
}

func TestSecret(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{Secret: "s3cret"})
	for _, secret := range []string{"", "wrong", "s3cret "} {
		cfg := tunnel.Config{Secret: secret, Logger: testutil.Logger(t)}
		ln, err := cfg.Listen(testutil.Context(t), relay.Addr)
		if !errors.Is(err, tunnel.ErrAuthFailed) {
			if ln != nil {
				ln.Close()
			}
			t.Fatalf("Listen with secret %q: %v, want ErrAuthFailed", secret, err)
		}
	}
	ln := listen(t, relay.Addr, tunnel.Config{Secret: "s3cret"})
	testutil.Serve(t, ln, testutil.Echo)
	if err := echoRoundTrip(ln.Addr().String(), 1, 1000); err != nil {
		t.Fatal(err)
	}
}

// TestStalledReaderBoundsMemory: a client that stops reading makes the
// server's writes block, through the relay, instead of piling up in memory.
func TestStalledReaderBoundsMemory(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	ln := listen(t, relay.Addr, tunnel.Config{})
	client, c := acceptPair(t, ln)

	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)

	// The server writes as fast as it can for 2s; the client reads nothing.
	chunk := make([]byte, 64<<10)
	var written int64
	c.SetWriteDeadline(time.Now().Add(2 * time.Second))
	for written < 1<<30 {
		n, err := c.Write(chunk)
		written += int64(n)
		if err != nil {
			break
		}
	}
	var after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&after)
	growth := int64(after.HeapInuse) - int64(before.HeapInuse)
	t.Logf("stalled reader: server wrote %d KiB before blocking; heap in use grew %d KiB", written>>10, growth>>10)
	// What the kernel may hold: send and receive buffers on the two hops
	// (client-relay, relay-agent) at their maximum autotuned sizes, plus a
	// splice pipe. Anything beyond that would be buffered by us.
	if bound := 2*(sysctlMax(t, "tcp_rmem")+sysctlMax(t, "tcp_wmem")) + 2<<20; written > bound {
		t.Errorf("%d MiB accepted for a reader that reads nothing, more than the kernel's %d MiB of buffers: the path buffers without bound",
			written>>20, bound>>20)
	}
	if growth > 8<<20 {
		t.Errorf("heap grew %d MiB while the reader stalled", growth>>20)
	}

	// Everything accepted is delivered once the reader wakes up.
	c.Close()
	client.SetReadDeadline(time.Now().Add(30 * time.Second))
	got, err := io.Copy(io.Discard, client)
	if err != nil || got != written {
		t.Fatalf("reader got %d bytes (err %v), want the %d written", got, err, written)
	}
}

// TestAgentDeathClosesPortAndWaitingClients uses a raw agent whose control
// connection dies abruptly while a client waits to be picked up.
func TestAgentDeathClosesPortAndWaitingClients(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	other := listen(t, relay.Addr, tunnel.Config{})
	testutil.Serve(t, other, testutil.Echo)

	agent := testutil.NewRawAgent(t, relay.Addr, "")
	pub := agent.Listen(t, 0)
	waiting := testutil.Dial(t, pub)
	agent.ExpectIncoming(t)

	agent.Conn.SetLinger(0)
	agent.Conn.Close() // the agent dies without a word

	waiting.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := waiting.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("waiting client: read %d bytes, err %v; want the relay to close it", n, err)
	}
	testutil.WaitRefused(t, pub)
	if err := echoRoundTrip(other.Addr().String(), 7, 100<<10); err != nil {
		t.Fatalf("another agent's tunnel was disturbed: %v", err)
	}
}

// TestAcceptedConnSurvivesClose: a conn Accept returned stays usable when
// the listener is closed right away, although its data connection may still
// be on its way to the relay.
func TestAcceptedConnSurvivesClose(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	for i := range 20 {
		cfg := tunnel.Config{Logger: testutil.Logger(t)}
		ln, err := cfg.Listen(testutil.Context(t), relay.Addr)
		if err != nil {
			t.Fatal(err)
		}
		client, c := acceptPair(t, ln)
		ln.Close()
		client.Write([]byte("still here"))
		buf := make([]byte, 10)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatalf("round %d: accepted conn lost when the listener closed: %v", i, err)
		}
		c.Close()
	}
}

// sysctlMax reads the maximum of a net.ipv4 tcp_rmem/tcp_wmem triple.
func sysctlMax(t *testing.T, name string) int64 {
	b, err := os.ReadFile("/proc/sys/net/ipv4/" + name)
	if err != nil {
		t.Skipf("read %s: %v", name, err)
	}
	f := strings.Fields(string(b))
	v, err := strconv.ParseInt(f[len(f)-1], 10, 64)
	if err != nil {
		t.Fatalf("parse %s %q: %v", name, b, err)
	}
	return v
}
