package tunnel_test

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"math/rand"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/copier"
	"tcprelay/internal/testutil"
	"tcprelay/server"
	"tcprelay/tunnel"
)

// reusePaths runs f against a relayed listener, plain and over TLS, whose
// data connections serve one client after another (feature reuse).
func reusePaths(t *testing.T, f func(t *testing.T, relay *testutil.Relay, ln *tunnel.Listener)) {
	for _, useTLS := range []bool{false, true} {
		t.Run(map[bool]string{false: "tcp", true: "tls"}[useTLS], func(t *testing.T) {
			check.Leaks(t)
			var cfg tunnel.Config
			var relay *testutil.Relay
			if useTLS {
				// The relay's own TLS listener, whose data connections
				// the copier reads through Records (crypto/tls's listener
				// gives conns the relay does not count, and does not reuse).
				cert, roots := testutil.SelfSignedCert(t)
				relay = startRelayAs(t, "127.0.0.1:0", server.Config{}, &cert)
				cfg.TLS = &tls.Config{RootCAs: roots}
			} else {
				relay = testutil.StartRelay(t, server.Config{})
			}
			ln := listen(t, relay.Addr, cfg)
			testutil.WaitParked(t, relay, 4)
			f(t, relay, ln)
		})
	}
}

// TestReuseServesClientAfterClient: with the echo served three ways (Read
// and Write, copier.Copy as ./echoserver does, a copier Link to a target
// as ./expose does), 60 clients one after another each get their bytes and
// then EOF, every one of them on a parked data connection, and the relay
// parks the connections again instead of the agent opening new ones.
func TestReuseServesClientAfterClient(t *testing.T) {
	target, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer target.Close()
	testutil.Serve(t, target, testutil.Echo)
	servers := map[string]func(net.Conn){
		"read-write": func(c net.Conn) {
			b := make([]byte, 1000)
			for {
				n, err := c.Read(b)
				if _, werr := c.Write(b[:n]); werr != nil {
					return
				}
				if err == io.EOF {
					c.(interface{ CloseWrite() error }).CloseWrite()
					return
				}
				if err != nil {
					return
				}
			}
		},
		"copy": func(c net.Conn) {
			if _, err := copier.Copy(c, c); err == nil {
				c.(interface{ CloseWrite() error }).CloseWrite()
			}
		},
		"link": func(c net.Conn) {
			tc, err := net.Dial("tcp", target.Addr().String())
			if err != nil {
				return
			}
			done := make(chan struct{})
			copier.Start(c, tc, func(*copier.Link, copier.Result) { close(done) })
			<-done
		},
	}
	for name, serve := range servers {
		t.Run(name, func(t *testing.T) {
			reusePaths(t, func(t *testing.T, relay *testutil.Relay, ln *tunnel.Listener) {
				testutil.Serve(t, ln, serve)
				rng := rand.New(rand.NewSource(1))
				before := testutil.Metrics(t, relay.Server)
				const n = 60
				for i := range n {
					data := make([]byte, []int{0, 1, 4096, 100 << 10}[i%4]+rng.Intn(100))
					rng.Read(data)
					if err := testutil.EchoCheck(ln.Addr().String(), data, 10*time.Second); err != nil {
						t.Fatalf("client %d: %v", i, err)
					}
				}
				after := testutil.Metrics(t, relay.Server)
				if hits := after["tcprelay_pool_hits_total"] - before["tcprelay_pool_hits_total"]; hits != n {
					t.Errorf("%d of %d clients joined to a parked data connection", hits, n)
				}
				// The last client's connection may not be back yet.
				if reused := after["tcprelay_pool_reused_total"] - before["tcprelay_pool_reused_total"]; reused < n-1 {
					t.Errorf("%d data connections parked again after %d clients, want at least %d", reused, n, n-1)
				}
			})
		})
	}
}

// TestReuseLeavesNothingToTheNextClient: a server that closes before
// reading all its client sent (the rest is still on its way), or that
// ends its side first, never lets those bytes, or its own, reach the next
// client's server: each client's server reads exactly its client's
// bytes. A connection whose server ended first is not used again.
func TestReuseLeavesNothingToTheNextClient(t *testing.T) {
	reusePaths(t, func(t *testing.T, relay *testutil.Relay, ln *tunnel.Listener) {
		got := make(chan []byte, 1)
		testutil.Serve(t, ln, func(c net.Conn) {
			first := make([]byte, 8)
			if _, err := io.ReadFull(c, first); err != nil {
				got <- nil
				return
			}
			switch string(first) {
			case "partial:": // read a little, close: the rest is left
				got <- first
			case "srvfirst": // answer and end first, then read the rest
				c.Write([]byte("bye"))
				c.(interface{ CloseWrite() error }).CloseWrite()
				rest, _ := io.ReadAll(c)
				got <- append(first, rest...)
			default: // read it all
				rest, _ := io.ReadAll(c)
				got <- append(first, rest...)
			}
		})
		big := bytes.Repeat([]byte("x"), 200<<10)
		for i, tc := range []struct {
			send, want string
		}{
			{"partial:" + string(big), "partial:"},
			{"client 2, whole", "client 2, whole"},
			{"partial:" + string(big[:5000]), "partial:"},
			{"srvfirst and more", "srvfirst and more"},
			{"client 5, whole", "client 5, whole"},
		} {
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			c.SetDeadline(time.Now().Add(10 * time.Second))
			// A server that closes early may reset the rest of the send.
			go func() {
				c.Write([]byte(tc.send))
				c.(*net.TCPConn).CloseWrite()
			}()
			back, _ := io.ReadAll(c)
			c.Close()
			if strings.HasPrefix(tc.send, "srvfirst") && string(back) != "bye" {
				t.Errorf("client %d: read %q, want %q then EOF", i+1, back, "bye")
			}
			select {
			case b := <-got:
				if string(b) != tc.want {
					t.Fatalf("client %d: its server read %.40q (%d bytes), want %.40q", i+1, b, len(b), tc.want)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("client %d: its server read nothing", i+1)
			}
		}
	})
}

// TestReuseSurvivesManyClients: 1,300 clients one after another, faster
// than the relay's bound on an agent's control frames (1,000 at once, then
// 100 a second) would allow if it counted the End that answers each of
// its own. The session holds, and every client is served.
func TestReuseSurvivesManyClients(t *testing.T) {
	if testing.Short() {
		t.Skip("1,300 clients")
	}
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	ln := listen(t, relay.Addr, tunnel.Config{})
	testutil.Serve(t, ln, testutil.Echo)
	testutil.WaitParked(t, relay, 4)
	start := time.Now()
	for i := range 1300 {
		if err := testutil.EchoCheck(ln.Addr().String(), []byte("ping"), 10*time.Second); err != nil {
			t.Fatalf("client %d, %v after the first: %v", i, time.Since(start), err)
		}
	}
	m := testutil.Metrics(t, relay.Server)
	if m["tcprelay_pool_reused_total"] < 1299 {
		t.Errorf("%d data connections parked again after 1,300 clients", m["tcprelay_pool_reused_total"])
	}
	if n := m["tcprelay_agent_sessions_total"]; n != 1 {
		t.Errorf("%d agent sessions for 1,300 clients in %v, want the one", n, time.Since(start))
	}
}

// TestReuseOutlivesItsSession: connections relayed over data connections
// that would be reused still end properly when the agent's session ends
// under them (the relay's operator disconnects it): a client that half-
// closes after the session ended, and one whose end the agent had already
// been told, both get their whole answer and then EOF.
func TestReuseOutlivesItsSession(t *testing.T) {
	reusePaths(t, func(t *testing.T, relay *testutil.Relay, ln *tunnel.Listener) {
		type served struct {
			c    net.Conn
			got  chan []byte   // what it read, to its EOF
			done chan struct{} // the test answered, and closed c
		}
		conns := make(chan served, 2)
		testutil.Serve(t, ln, func(c net.Conn) {
			s := served{c, make(chan []byte, 1), make(chan struct{})}
			conns <- s
			b, _ := io.ReadAll(c)
			s.got <- b
			select { // the test answers on c
			case <-s.done:
			case <-time.After(10 * time.Second):
			}
		})
		dial := func() (net.Conn, served) {
			c, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			c.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := c.Write([]byte("hello")); err != nil {
				t.Fatal(err)
			}
			select {
			case s := <-conns:
				return c, s
			case <-time.After(10 * time.Second):
				t.Fatal("no connection accepted")
			}
			return nil, served{}
		}
		answer := func(what string, c net.Conn, s served) {
			t.Helper()
			if _, err := s.c.Write([]byte("answer")); err != nil {
				t.Fatalf("%s: server write: %v", what, err)
			}
			s.c.(interface{ CloseWrite() error }).CloseWrite()
			if b, err := io.ReadAll(c); err != nil || string(b) != "answer" {
				t.Fatalf("%s: client read %q, %v; want %q then EOF", what, b, err, "answer")
			}
			s.c.Close()
			close(s.done)
		}
		// Told before: the client half-closes, its server reads EOF.
		before, sb := dial()
		before.(*net.TCPConn).CloseWrite()
		if b := <-sb.got; string(b) != "hello" {
			t.Fatalf("server read %q, want %q", b, "hello")
		}
		after, sa := dial()

		agents := relay.Agents()
		if len(agents) != 1 {
			t.Fatalf("%d agents", len(agents))
		}
		if _, err := relay.DisconnectAgent(agents[0].ID); err != nil {
			t.Fatal(err)
		}
		answer("client whose end came before the session ended", before, sb)

		after.(*net.TCPConn).CloseWrite()
		if b := <-sa.got; string(b) != "hello" {
			t.Fatalf("server read %q, want %q", b, "hello")
		}
		answer("client that half-closed after the session ended", after, sa)
	})
}

// TestReuseFirstClientRightAway: a new session's first clients, right
// after it registers, often take a data connection whose PoolJoin the
// agent has only just sent, and the relay's End for them can come before
// the agent's goroutine for that connection waits for its Bind. That End
// used to be dropped, and the client never got its EOF (under load, about
// one session in a hundred). 100 sessions, three clients each.
func TestReuseFirstClientRightAway(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	for i := range 100 {
		ln := listen(t, relay.Addr, tunnel.Config{})
		testutil.Serve(t, ln, testutil.Echo)
		for j := range 3 {
			if err := testutil.EchoCheck(ln.Addr().String(), []byte("through a session just registered"), 5*time.Second); err != nil {
				t.Fatalf("session %d, client %d: %v", i, j, err)
			}
		}
		ln.Close()
	}
}

// TestReuseReadFromCounts: a server that answers with ReadFrom (sendfile
// from a file, splice from a socket, as net/http's file server and io.Copy
// do) on a reused connection. Each client gets its whole answer and then
// EOF, and the connections are parked again: ReadFrom counted what it
// sent, or the relay would end the answer at a short count.
func TestReuseReadFromCounts(t *testing.T) {
	blob := make([]byte, 300<<10)
	rand.New(rand.NewSource(7)).Read(blob)
	file := t.TempDir() + "/blob"
	if err := os.WriteFile(file, blob, 0o600); err != nil {
		t.Fatal(err)
	}
	source, err := net.Listen("tcp", "127.0.0.1:0") // writes the blob to each conn, then closes it
	if err != nil {
		t.Fatal(err)
	}
	defer source.Close()
	testutil.Serve(t, source, func(c net.Conn) { c.Write(blob) })
	reusePaths(t, func(t *testing.T, relay *testutil.Relay, ln *tunnel.Listener) {
		testutil.Serve(t, ln, func(c net.Conn) {
			req, err := io.ReadAll(c)
			if err != nil {
				return
			}
			var r io.Reader
			if string(req) == "file" {
				f, err := os.Open(file)
				if err != nil {
					return
				}
				defer f.Close()
				r = f
			} else {
				s, err := net.Dial("tcp", source.Addr().String())
				if err != nil {
					return
				}
				defer s.Close()
				r = s
			}
			if n, err := c.(io.ReaderFrom).ReadFrom(r); err == nil && n == int64(len(blob)) {
				c.(interface{ CloseWrite() error }).CloseWrite()
			}
		})
		before := testutil.Metrics(t, relay.Server)
		const n = 10
		for i := range n {
			req := []string{"file", "socket"}[i%2]
			c, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			c.SetDeadline(time.Now().Add(10 * time.Second))
			c.Write([]byte(req))
			c.(*net.TCPConn).CloseWrite()
			got, err := io.ReadAll(c)
			c.Close()
			if err != nil || !bytes.Equal(got, blob) {
				t.Fatalf("client %d (%s): %d bytes, %v; want the %d of the blob, then EOF", i, req, len(got), err, len(blob))
			}
		}
		after := testutil.Metrics(t, relay.Server)
		if reused := after["tcprelay_pool_reused_total"] - before["tcprelay_pool_reused_total"]; reused < n-1 {
			t.Errorf("%d data connections parked again after %d clients, want at least %d", reused, n, n-1)
		}
	})
}

// TestReuseProxiedWithIOCopy: a server that proxies each client to a
// target with io.Copy both ways, as a Go sidecar would: WriteTo and
// ReadFrom splice on a reused connection, WriteTo ends at the client's
// count (there is no FIN to end it), and a Read after it says EOF. Each
// client gets its bytes back, then EOF, and the connections are parked
// again.
func TestReuseProxiedWithIOCopy(t *testing.T) {
	target, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer target.Close()
	testutil.Serve(t, target, testutil.Echo)
	reusePaths(t, func(t *testing.T, relay *testutil.Relay, ln *tunnel.Listener) {
		afterEOF := make(chan error, 100)
		testutil.Serve(t, ln, func(c net.Conn) {
			tc, err := net.Dial("tcp", target.Addr().String())
			if err != nil {
				return
			}
			defer tc.Close()
			back := make(chan struct{})
			go func() {
				defer close(back)
				if _, err := io.Copy(c, tc); err == nil {
					c.(interface{ CloseWrite() error }).CloseWrite()
				}
			}()
			if _, err := io.Copy(tc, c); err == nil {
				tc.(*net.TCPConn).CloseWrite()
			}
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			n, err := c.Read(make([]byte, 1))
			if err != io.EOF {
				err = fmt.Errorf("a Read after io.Copy: %d, %v; want EOF", n, err)
			} else {
				err = nil
			}
			afterEOF <- err
			<-back
		})
		before := testutil.Metrics(t, relay.Server)
		rng := rand.New(rand.NewSource(3))
		const n = 12
		for i := range n {
			data := make([]byte, []int{1, 5000, 200 << 10}[i%3])
			rng.Read(data)
			if err := testutil.EchoCheck(ln.Addr().String(), data, 10*time.Second); err != nil {
				t.Fatalf("client %d: %v", i, err)
			}
			if err := <-afterEOF; err != nil {
				t.Errorf("client %d: %v", i, err)
			}
		}
		after := testutil.Metrics(t, relay.Server)
		if reused := after["tcprelay_pool_reused_total"] - before["tcprelay_pool_reused_total"]; reused < n-1 {
			t.Errorf("%d data connections parked again after %d clients, want at least %d", reused, n, n-1)
		}
	})
}
