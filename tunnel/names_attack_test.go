package tunnel_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/testutil"
	"tcprelay/server"
	"tcprelay/tunnel"
)

// The attacks and demands of a review of issue 19 (names on a shared TLS
// port). Each test says what it shows; those marked FAILS fail on the
// code they were written against.

// severingProxy forwards connections to target, and can sever one on the
// relay's side only: the relay sees its peer close (a FIN), the agent sees
// nothing, as when a middlebox between them ends an idle flow.
type severingProxy struct {
	ln      net.Listener
	target  string
	mu      sync.Mutex
	legs    []net.Conn // the relay-side leg of each connection, by accept order
	agents  []net.Conn
	severed map[net.Conn]bool
	wg      sync.WaitGroup
}

func newSeveringProxy(t *testing.T, target string) *severingProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &severingProxy{ln: ln, target: target, severed: map[net.Conn]bool{}}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			a, err := ln.Accept()
			if err != nil {
				return
			}
			b, err := net.Dial("tcp", target)
			if err != nil {
				a.Close()
				continue
			}
			p.mu.Lock()
			p.legs = append(p.legs, b)
			p.agents = append(p.agents, a)
			p.mu.Unlock()
			p.wg.Add(2)
			go func() { defer p.wg.Done(); io.Copy(b, a) }()
			go func() {
				defer p.wg.Done()
				buf := make([]byte, 32<<10)
				for {
					n, err := b.Read(buf)
					p.mu.Lock()
					severed := p.severed[b]
					p.mu.Unlock()
					if severed {
						if err != nil {
							return
						}
						continue // what the relay sends now reaches nobody
					}
					if n > 0 {
						if _, werr := a.Write(buf[:n]); werr != nil {
							err = werr
						}
					}
					if err != nil {
						a.Close()
						return
					}
				}
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		p.mu.Lock()
		for _, c := range append(p.legs, p.agents...) {
			c.Close()
		}
		p.mu.Unlock()
		p.wg.Wait()
	})
	return p
}

func (p *severingProxy) addr() string { return p.ln.Addr().String() }

func (p *severingProxy) conns() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.legs)
}

// sever ends connection i on the relay's side only, as a peer that
// closed it would: the relay gets a FIN, and what it sends after is read
// and dropped. The agent's side stays open and hears nothing.
func (p *severingProxy) sever(i int) {
	p.mu.Lock()
	b := p.legs[i]
	p.severed[b] = true
	p.mu.Unlock()
	b.(*net.TCPConn).CloseWrite()
}

// TestNamesPortDeadParkedConns: the relay checks a parked data connection
// is alive (idle: one peek at its socket) before it binds a client to it,
// so a client is never bound to a connection that a NAT or a firewall
// closed under an agent that does not know yet: it goes to a live one, or
// is announced. For an agent on the control port that holds; for one that
// came in on the shared TLS port (the "443 alone" setup of OPERATING.md)
// the peek cannot reach the socket under the handoff's wrapper, so the
// client's ClientHello goes into a dead connection and the client is
// closed. Its "shared port" subtest failed before the fix.
func TestNamesPortDeadParkedConns(t *testing.T) {
	check.Leaks(t)
	relay, names := testutil.StartNamesRelay(t, server.Config{})
	pin := testutil.ServeNamesControl(t, relay)
	for _, tc := range []struct {
		name, addr string
		tls        *tls.Config
	}{{"control port", relay.Addr, nil}, {"shared port", names, pin}} {
		t.Run(tc.name, func(t *testing.T) {
			p := newSeveringProxy(t, tc.addr)
			host := "db-" + map[bool]string{true: "tls", false: "plain"}[tc.tls != nil]
			ln := listen(t, p.addr(), tunnel.Config{TLS: tc.tls, Hostname: host, DisableReconnect: true})
			roots := serveTLS(t, ln, host+".names.test")
			check.Eventually(t, 5*time.Second, func() error {
				if n := p.conns(); n < 5 {
					return errors.New("the agent has not parked its 4 first data connections yet")
				}
				return nil
			})
			time.Sleep(200 * time.Millisecond) // the last parks reach the relay
			n := p.conns()
			for i := 1; i < n; i++ { // all but the control connection
				p.sever(i)
			}
			time.Sleep(200 * time.Millisecond) // the FINs cross loopback
			c, err := dialName(names, host+".names.test", roots)
			if err != nil {
				t.Fatalf("a client of the name, after the agent's %d parked connections died on the relay's side: %v", n-1, err)
			}
			c.Write([]byte("ping"))
			b := make([]byte, 4)
			if _, err := io.ReadFull(c, b); err != nil || string(b) != "ping" {
				t.Fatalf("echo: %q, %v", b, err)
			}
			c.Close()
		})
	}
}

// TestNamesControlStatusDeadlock: with the shared port's control listener
// served (./relay -sni-addr with -tls-cert or -tls-self-signed, the "agents
// on 443 alone" setup), the first scrape of /metrics, or a look at the
// status page or /status, deadlocks the whole relay: takeStatus holds s.mu
// while it calls Addr().String() on every control listener, and the
// handoff listener's address (namesAddr) takes s.mu to read the shared
// port. From then on every agent, client and admin request waits on s.mu
// forever. The test runs the relay in a child process, bounded by
// -test.timeout, since a deadlocked relay cannot be closed. It failed before the fix.
func TestNamesControlStatusDeadlock(t *testing.T) {
	if os.Getenv("TCPRELAY_NAMES_DEADLOCK_CHILD") == "1" {
		relay, names := testutil.StartNamesRelay(t, server.Config{})
		pin := testutil.ServeNamesControl(t, relay)
		// An agent on the shared port: its control listener is served.
		listen(t, names, tunnel.Config{TLS: pin, Hostname: "db"})
		if err := relay.WriteMetrics(io.Discard); err != nil {
			t.Fatal(err)
		}
		fmt.Println("METRICS WRITTEN")
		return
	}
	out, err := runChild(t, "TestNamesControlStatusDeadlock", "TCPRELAY_NAMES_DEADLOCK_CHILD")
	if err != nil || !bytes.Contains(out, []byte("METRICS WRITTEN")) {
		t.Fatalf("WriteMetrics on a relay serving NamesControl: %s: %v\nwhere: %s", childFailure(out), err,
			stackWith(out, "namesPortNow", "takeStatus", "namesAddr"))
	}
}

// TestNamesPoolJoinWithoutNameSkipsHosts: hosts= bounds the names a key
// may hold. bob (hosts=other, pools=web) asking for pool web with its
// name, web, is refused ("not allowed"); asking for pool web with no name
// at all, he is let in, and serves web.names.test's clients: a TLS client
// of that name reaches bob's server. OPERATING.md: "A pool may have a
// name: its members all ask for the pool and the name". It failed before the fix.
func TestNamesPoolJoinWithoutNameSkipsHosts(t *testing.T) {
	check.Leaks(t)
	alice, bob := newKey(t), newKey(t)
	relay, names := testutil.StartNamesRelay(t, server.Config{Agents: parseAgents(t,
		"alice "+tunnel.PublicKey(alice)+" hosts=web pools=web\n"+
			"bob "+tunnel.PublicKey(bob)+" hosts=other pools=web\n")})
	a := listen(t, relay.Addr, tunnel.Config{Key: alice, Pool: "web", Hostname: "web"})
	cert, roots := testutil.CertFor(t, "web.names.test")
	served := make(chan string, 64)
	serve := func(ln net.Listener, who string) {
		testutil.Serve(t, tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{cert}}), func(c net.Conn) {
			served <- who
			c.Write([]byte(who[:1]))
		})
	}
	serve(a, "alice")

	_, err := (&tunnel.Config{Key: bob, Pool: "web", Hostname: "web", Logger: testutil.Logger(t)}).Listen(testutil.Context(t), relay.Addr)
	if err == nil || !strings.Contains(err.Error(), "not allowed") {
		t.Fatalf("bob asking for pool web and name web, outside his hosts=: %v, want a refusal", err)
	}
	b, err := (&tunnel.Config{Key: bob, Pool: "web", Logger: testutil.Logger(t)}).Listen(testutil.Context(t), relay.Addr)
	if err != nil {
		return // refused: what hosts= is for
	}
	defer b.Close()
	serve(b, "bob")
	for range 40 {
		c, err := dialName(names, "web.names.test", roots)
		if err != nil {
			t.Fatal(err)
		}
		io.ReadAll(c)
		c.Close()
		if who := <-served; who == "bob" {
			t.Fatalf("bob (hosts=other) joined pool web without naming it (his Addr() is %s) and serves web.names.test's clients", b.Addr())
		}
	}
	t.Fatalf("bob (hosts=other) joined pool web on web.names.test without naming it: Addr() %s", b.Addr())
}

// TestNamesNarrowedHostsCutsPoolMember: TestNamesNarrowedScope for a name
// served by a pool. alice (hosts=web pools=web) serves pool web on name
// web; her hosts= narrows to api, so web.names.test is outside her scope
// (a new registration of it is refused) and her member serving it should
// be ended, its clients closed, as for a name of her own. On main
// narrowLocked looks at pools= only for pool members, and she keeps
// serving the name. It failed before the fix.
func TestNamesNarrowedHostsCutsPoolMember(t *testing.T) {
	check.Leaks(t)
	alice := newKey(t)
	relay, names := testutil.StartNamesRelay(t, server.Config{Agents: parseAgents(t, "alice "+tunnel.PublicKey(alice)+" hosts=web pools=web\n")})
	ln := listen(t, relay.Addr, tunnel.Config{Key: alice, Pool: "web", Hostname: "web", DisableReconnect: true})
	roots := serveTLS(t, ln, "web.names.test")
	c, err := dialName(names, "web.names.test", roots)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	relay.SetAgents(parseAgents(t, "alice "+tunnel.PublicKey(alice)+" hosts=api pools=web\n"))
	if _, err := (&tunnel.Config{Key: alice, Hostname: "web", Logger: testutil.Logger(t)}).Listen(testutil.Context(t), relay.Addr); err == nil {
		t.Fatal("web is still in alice's scope after hosts=api")
	}
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("a client of web.names.test, served by alice's pool member, 3s after her hosts= left web out: read %d, %v; want it closed", n, err)
	}
	if c, err := dialName(names, "web.names.test", roots); err == nil {
		c.Close()
		t.Errorf("web.names.test still served by alice's pool member after her hosts= left it out")
	}
}

// TestNamesRelayPublicHostNotRegistrable: the relay's own names, DOMAIN and
// -public-host, route to its control listener. DOMAIN itself is refused
// to agents ("the relay's own"); -public-host, when it lies under DOMAIN,
// is not: an agent gets it, its Addr() says clients reach it there, yet
// every ClientHello for it goes to the relay, and the name shows as the
// tenant's in the operator's views. It failed before the fix (hardening).
func TestNamesRelayPublicHostNotRegistrable(t *testing.T) {
	check.Leaks(t)
	relay, _ := testutil.StartNamesRelay(t, server.Config{PublicHost: "relay.names.test"})
	ln, err := (&tunnel.Config{Hostname: "relay", Logger: testutil.Logger(t)}).Listen(testutil.Context(t), relay.Addr)
	if err == nil {
		ln.Close()
		t.Fatalf("an agent registered relay.names.test, the relay's -public-host, whose clients the relay keeps: Addr() %s", ln.Addr())
	}
}

// TestNamesAllDigitShortName: a name of digits alone would read as a port
// in relay ctl, /ready/ and the admin API (relay ctl drain 8080), so it is
// refused, with the reason; digits with a letter are a name.
func TestNamesAllDigitShortName(t *testing.T) {
	check.Leaks(t)
	relay, _ := testutil.StartNamesRelay(t, server.Config{})
	for _, h := range []string{"8080", "8080.names.test"} {
		_, err := (&tunnel.Config{Hostname: h, Logger: testutil.Logger(t)}).Listen(testutil.Context(t), relay.Addr)
		if err == nil || !strings.Contains(err.Error(), "reads as a port") {
			t.Errorf("hostname %q: got %v, want a refusal that says why", h, err)
		}
	}
	ln := listen(t, relay.Addr, tunnel.Config{Hostname: "8080a"})
	if got := ln.Addr().String(); !strings.HasPrefix(got, "8080a.names.test:") {
		t.Fatalf("Addr() = %s", got)
	}
	if ok, _, _ := relay.EndpointReady("8080a"); !ok {
		t.Errorf("EndpointReady(\"8080a\"): not ready, though it has a ready agent")
	}
	if err := relay.DrainEndpoint("8080a", true); err != nil {
		t.Errorf("drain by short name, as OPERATING.md says: %v", err)
	}
}

// runChild runs the test named test again in a child process, with env
// set to 1, bounded by a 10s -test.timeout: for a relay that may
// deadlock, which a test cannot close.
func runChild(t *testing.T, test, env string) ([]byte, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^"+test+"$", "-test.timeout=10s", "-test.v")
	cmd.Env = append(os.Environ(), env+"=1")
	return cmd.CombinedOutput()
}

func childFailure(out []byte) string {
	if bytes.Contains(out, []byte("test timed out")) {
		return "it hung (deadlock)"
	}
	return "it failed"
}

// stackWith is the lines of a goroutine dump that mention any of funcs.
func stackWith(out []byte, funcs ...string) string {
	var stack []string
	for _, l := range strings.Split(string(out), "\n") {
		for _, f := range funcs {
			if strings.Contains(l, f) {
				stack = append(stack, strings.TrimSpace(l))
				break
			}
		}
	}
	return strings.Join(stack, " <- ")
}

// TestNamesControlUnservedBlocksClose: NamesControl's doc says that until
// it is called, agents' connections on the shared port are closed. Once
// it is called, a connection handed to it waits in handoff.deliver, with
// no deadline and outside the handshake budget, until something Accepts
// it. A program that calls NamesControl and serves it later, or never
// (its Serve failed to start, say), holds a goroutine and a descriptor
// per ClientHello offering ALPN tcprelay, which any stranger can send;
// and Close, which does not close a handoff nobody serves, waits for
// those goroutines forever. It failed before the fix (hardening: an embedding API
// hazard; ./relay calls NamesControl only to serve it).
func TestNamesControlUnservedBlocksClose(t *testing.T) {
	if os.Getenv("TCPRELAY_NAMES_UNSERVED_CHILD") == "1" {
		relay, names := testutil.StartNamesRelay(t, server.Config{HandshakeTimeout: 500 * time.Millisecond})
		relay.NamesControl(&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}) // and never served
		c := testutil.Dial(t, names)
		go tls.Client(c, &tls.Config{NextProtos: []string{"tcprelay"}, InsecureSkipVerify: true}).Handshake()
		time.Sleep(time.Second) // past the handshake timeout
		closed := make(chan struct{})
		go func() { relay.Close(); close(closed) }()
		select {
		case <-closed:
			fmt.Println("CLOSED OK")
		case <-time.After(5 * time.Second):
			fmt.Println("CLOSE HUNG")
			os.Exit(1)
		}
		return
	}
	out, err := runChild(t, "TestNamesControlUnservedBlocksClose", "TCPRELAY_NAMES_UNSERVED_CHILD")
	if err != nil || !bytes.Contains(out, []byte("CLOSED OK")) {
		why := childFailure(out)
		if bytes.Contains(out, []byte("CLOSE HUNG")) {
			why = "Close did not return within 5s"
		}
		t.Fatalf("Close of a relay whose NamesControl is not served, after one agent-like ClientHello: %s: %v", why, err)
	}
}
