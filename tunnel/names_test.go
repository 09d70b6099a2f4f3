package tunnel_test

import (
	"bytes"
	"crypto/ed25519"
	crand "crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"math/rand"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/testutil"
	"tcprelay/server"
	"tcprelay/tunnel"
)

// serveTLS serves a TLS echo server, with a certificate for name, on ln
// (a relayed Listener): what a real server behind the relay does.
func serveTLS(t *testing.T, ln net.Listener, name string) *x509.CertPool {
	t.Helper()
	cert, pool := testutil.CertFor(t, name)
	testutil.Serve(t, tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{cert}}), func(c net.Conn) {
		io.Copy(c, c)
		c.(*tls.Conn).CloseWrite()
	})
	return pool
}

// dialName opens TLS to the shared port at addr with server name name.
func dialName(addr, name string, roots *x509.CertPool) (*tls.Conn, error) {
	d := &net.Dialer{Timeout: 5 * time.Second}
	c, err := tls.DialWithDialer(d, "tcp", addr, &tls.Config{ServerName: name, RootCAs: roots})
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	return c, nil
}

// TestNamesRouteByServerName: two agents with a name each on the shared
// port; each TLS client reaches the server of the name it asked for (its
// certificate proves it), byte for byte both ways and through a
// half-close; a name nobody has, and a client that does not speak TLS,
// are closed without a byte.
func TestNamesRouteByServerName(t *testing.T) {
	check.Leaks(t)
	relay, names := testutil.StartNamesRelay(t, server.Config{})
	_, port, _ := net.SplitHostPort(names)
	roots := map[string]*x509.CertPool{}
	for _, h := range []string{"db", "web.team-a"} {
		// web.team-a takes no pre-opened connections: its clients are
		// announced, and its bytes go after the agent attaches.
		ln := listen(t, relay.Addr, tunnel.Config{Hostname: h, DisablePool: h != "db"})
		full := h + ".names.test"
		if got, want := ln.Addr().String(), full+":"+port; got != want {
			t.Fatalf("Addr() = %s, want %s", got, want)
		}
		roots[full] = serveTLS(t, ln, full)
	}
	for name, pool := range roots {
		c, err := dialName(names, strings.ToUpper(name), pool) // names are case-blind
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if got := c.ConnectionState().PeerCertificates[0].DNSNames; len(got) != 1 || got[0] != name {
			t.Errorf("%s: reached the server of %v", name, got)
		}
		data := make([]byte, 8<<20)
		rand.New(rand.NewSource(int64(len(name)))).Read(data)
		errc := make(chan error, 1)
		go func() {
			_, err := c.Write(data)
			if err == nil {
				err = c.CloseWrite()
			}
			errc <- err
		}()
		got, err := io.ReadAll(c)
		if err != nil || <-errc != nil {
			t.Fatalf("%s: echo: %v", name, err)
		}
		if sha256.Sum256(got) != sha256.Sum256(data) {
			t.Fatalf("%s: echo: %d bytes back, not the %d sent", name, len(got), len(data))
		}
		c.Close()
	}

	// Nobody's name, and no TLS at all: closed at once, and counted.
	if c, err := dialName(names, "nope.names.test", nil); err == nil {
		c.Close()
		t.Fatal("a name nobody has got a TLS handshake")
	}
	raw := testutil.Dial(t, names)
	raw.Write([]byte("GET / HTTP/1.0\r\n\r\n"))
	raw.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := raw.Read(make([]byte, 1)); n != 0 || err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("a client that is not TLS: read %d, %v; want it closed", n, err)
	}
	m := testutil.Metrics(t, relay.Server)
	if m["tcprelay_sni_unknown_total"] != 1 || m["tcprelay_sni_rejected_total"] != 1 {
		t.Errorf("unknown %d, rejected %d; want 1 and 1", m["tcprelay_sni_unknown_total"], m["tcprelay_sni_rejected_total"])
	}
}

// TestNamesScope: a name belongs to whoever registered it; the agents
// file's hosts= bounds who may ask; a refusal never says who holds it.
func TestNamesScope(t *testing.T) {
	check.Leaks(t)
	alice, bob := newKey(t), newKey(t)
	agents := parseAgents(t, "alice "+tunnel.PublicKey(alice)+" hosts=db,*.team-a\nbob "+tunnel.PublicKey(bob)+"\n")
	relay, _ := testutil.StartNamesRelay(t, server.Config{Agents: agents})
	listen(t, relay.Addr, tunnel.Config{Key: alice, Hostname: "db"})
	listen(t, relay.Addr, tunnel.Config{Key: alice, Hostname: "api.team-a"})
	for _, tc := range []struct {
		key  ed25519.PrivateKey
		name string
	}{{bob, "db"}, {bob, "DB.names.test"}, {alice, "web"}, {alice, "team-a"}} {
		_, err := (&tunnel.Config{Key: tc.key, Hostname: tc.name, Logger: testutil.Logger(t)}).Listen(testutil.Context(t), relay.Addr)
		if err == nil || !strings.Contains(err.Error(), "is not allowed for this agent") || strings.Contains(err.Error(), "alice") {
			t.Errorf("%s: got %v, want a refusal that does not name the holder", tc.name, err)
		}
	}
	ln := listen(t, relay.Addr, tunnel.Config{Key: bob, Hostname: "web"})
	if !strings.HasPrefix(ln.Addr().String(), "web.names.test:") {
		t.Errorf("bob's Addr() = %s", ln.Addr())
	}
	for _, bad := range []string{"bad name!", "-x", "a..b"} {
		if _, err := (&tunnel.Config{Key: bob, Hostname: bad}).Listen(testutil.Context(t), relay.Addr); err == nil {
			t.Errorf("hostname %q accepted", bad)
		}
	}
	if _, err := (&tunnel.Config{Hostname: "db", Port: 8080}).Listen(testutil.Context(t), relay.Addr); err == nil {
		t.Error("Hostname and Port together accepted")
	}
}

// TestNamesWithoutSharedPort: a relay without a shared port says so.
func TestNamesWithoutSharedPort(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	_, err := (&tunnel.Config{Hostname: "db", Logger: testutil.Logger(t)}).Listen(testutil.Context(t), relay.Addr)
	if err == nil || !strings.Contains(err.Error(), "routes no names") {
		t.Fatalf("got %v, want the relay's refusal", err)
	}
}

// TestNamesSurviveRestart: after a restart the state file keeps a name for
// its owner through the grace: another tenant is refused, the owner gets
// it back.
func TestNamesSurviveRestart(t *testing.T) {
	check.Leaks(t)
	alice, bob := newKey(t), newKey(t)
	agents := parseAgents(t, "alice "+tunnel.PublicKey(alice)+"\nbob "+tunnel.PublicKey(bob)+"\n")
	cfg := server.Config{Agents: agents, StateFile: filepath.Join(t.TempDir(), "state.json"), PortGrace: time.Minute}
	first, _ := testutil.StartNamesRelay(t, cfg)
	a := listen(t, first.Addr, tunnel.Config{Key: alice, Hostname: "db", DisableReconnect: true})
	first.Close()
	a.Close()

	second, names := testutil.StartNamesRelay(t, cfg)
	if _, err := (&tunnel.Config{Key: bob, Hostname: "db", Logger: testutil.Logger(t)}).Listen(testutil.Context(t), second.Addr); err == nil ||
		!strings.Contains(err.Error(), "not allowed") {
		t.Fatalf("bob asking for alice's reserved name: %v", err)
	}
	ln := listen(t, second.Addr, tunnel.Config{Key: alice, Hostname: "db"})
	_, port, _ := net.SplitHostPort(names)
	if got := ln.Addr().String(); got != "db.names.test:"+port {
		t.Fatalf("alice got %s back, want db.names.test:%s", got, port)
	}
	pool := serveTLS(t, ln, "db.names.test")
	c, err := dialName(names, "db.names.test", pool)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
}

// TestNamesPool: agents of one pool serve one name; each client goes to
// one of them.
func TestNamesPool(t *testing.T) {
	check.Leaks(t)
	relay, names := testutil.StartNamesRelay(t, server.Config{})
	cert, pool := testutil.CertFor(t, "web.names.test")
	served := make(chan int, 40)
	for i := range 2 {
		ln := listen(t, relay.Addr, tunnel.Config{Pool: "web", Hostname: "web"})
		testutil.Serve(t, tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{cert}}), func(c net.Conn) {
			served <- i
			c.Write([]byte(strconv.Itoa(i)))
		})
	}
	if _, err := (&tunnel.Config{Pool: "web", Hostname: "other", Logger: testutil.Logger(t)}).Listen(testutil.Context(t), relay.Addr); err == nil {
		t.Error("a pool member asking for another name was accepted")
	}
	seen := map[int]int{}
	for range 40 {
		c, err := dialName(names, "web.names.test", pool)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(c)
		c.Close()
		seen[<-served]++
		if len(b) != 1 {
			t.Fatalf("read %q", b)
		}
	}
	if seen[0] == 0 || seen[1] == 0 {
		t.Errorf("clients per member: %v; want both served", seen)
	}
}

// TestAgentsOnTheNamesPort: a relay can serve its agents and their clients
// on the one shared port: an agent's ClientHello offers the relay's ALPN,
// so it reaches the control listener whatever its server name.
func TestAgentsOnTheNamesPort(t *testing.T) {
	check.Leaks(t)
	relay, names := testutil.StartNamesRelay(t, server.Config{})
	pin := testutil.ServeNamesControl(t, relay) // its public ports bind to 127.0.0.1
	ln := listen(t, names, tunnel.Config{TLS: pin, Hostname: "db"})
	pool := serveTLS(t, ln, "db.names.test")
	for range 3 { // pooled and announced data connections come the same way
		c, err := dialName(names, "db.names.test", pool)
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("ping"))
		b := make([]byte, 4)
		if _, err := io.ReadFull(c, b); err != nil || !bytes.Equal(b, []byte("ping")) {
			t.Fatalf("echo: %q, %v", b, err)
		}
		c.Close()
	}

	// A port asked for this way binds where the control listener says,
	// here 127.0.0.1 alone, as a port asked for on the control port does.
	byPort := listen(t, names, tunnel.Config{TLS: pin})
	testutil.Serve(t, byPort, testutil.Echo)
	_, port, _ := net.SplitHostPort(byPort.Addr().String())
	if err := testutil.EchoCheck("127.0.0.1:"+port, []byte("x"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if c, err := net.DialTimeout("tcp", "127.0.0.2:"+port, time.Second); err == nil {
		c.Close()
		t.Fatalf("port %s took a client on 127.0.0.2: bound to every interface", port)
	}
}

func newKey(t *testing.T) ed25519.PrivateKey {
	t.Helper()
	_, key, err := ed25519.GenerateKey(crand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return key
}

func parseAgents(t *testing.T, file string) []server.Agent {
	t.Helper()
	agents, err := server.ParseAgents(strings.NewReader(file))
	if err != nil {
		t.Fatal(err)
	}
	return agents
}

// TestNamesProxiedHelloTimesOut: behind a trusted proxy, a client whose
// PROXY header came but whose ClientHello does not is closed at the
// handshake timeout, like any other.
func TestNamesProxiedHelloTimesOut(t *testing.T) {
	check.Leaks(t)
	lb := []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}
	_, names := testutil.StartNamesRelay(t, server.Config{ProxyProtocolFrom: lb, HandshakeTimeout: 300 * time.Millisecond})
	c := testutil.Dial(t, names)
	c.Write([]byte("PROXY TCP4 192.0.2.7 127.0.0.1 40000 443\r\n"))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read %d, %v; want the relay to close it at its handshake timeout", n, err)
	}
}

// TestNamesNarrowedScope: a name its owner's new scope leaves out is
// taken from it at once: its clients are closed, and the agent cannot
// have it back.
func TestNamesNarrowedScope(t *testing.T) {
	check.Leaks(t)
	alice := newKey(t)
	relay, names := testutil.StartNamesRelay(t, server.Config{Agents: parseAgents(t, "alice "+tunnel.PublicKey(alice)+" hosts=db\n")})
	ln := listen(t, relay.Addr, tunnel.Config{Key: alice, Hostname: "db"})
	pool := serveTLS(t, ln, "db.names.test")
	c, err := dialName(names, "db.names.test", pool)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	relay.SetAgents(parseAgents(t, "alice "+tunnel.PublicKey(alice)+" hosts=web\n"))
	if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the narrowed name's client: read %d, %v; want it closed", n, err)
	}
	check.Eventually(t, 5*time.Second, func() error {
		c, err := dialName(names, "db.names.test", pool)
		if err == nil {
			c.Close()
			return errors.New("db.names.test still reachable after alice's scope left it out")
		}
		return nil
	})
}
