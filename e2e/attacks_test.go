package e2e

import (
	"bufio"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"io"
	"math/big"
	"net"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"tcprelay/internal/child"
	"tcprelay/internal/proto"
	"tcprelay/internal/testutil"
)

// The attacks of issue 16, each against the real binaries: what a
// stranger, a holder of the secret, a tenant and a revoked tenant try.

const attackSecret = "the-secret-of-the-attack-tests"

var secretEnv = []string{"RELAY_SECRET=" + attackSecret}

// holdSilent dials n connections to addr from the IP addresses ips, in
// turn, and keeps them open and silent until the test ends. Dials that
// fail or time out (a relay that stopped accepting lets its backlog fill)
// are counted, not fatal.
func holdSilent(t *testing.T, addr string, n int, ips func(i int) string) (held int) {
	t.Helper()
	var conns []net.Conn
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	for i := range n {
		d := net.Dialer{Timeout: time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(ips(i))}}
		if c, err := d.Dial("tcp", addr); err == nil {
			conns = append(conns, c)
		}
	}
	return len(conns)
}

// metric scrapes one sample without labels from http://maddr/metrics.
func metric(t *testing.T, maddr, name string) int64 {
	t.Helper()
	b := opsGet(t, maddr, "/metrics")
	m := regexp.MustCompile(`(?m)^` + name + ` (\d+)$`).FindStringSubmatch(b)
	if m == nil {
		t.Fatalf("/metrics has no %s:\n%s", name, b)
	}
	v, _ := strconv.ParseInt(m[1], 10, 64)
	return v
}

// TestAttackSilentFloodOnTLSControlPort: a stranger opens 500 silent
// connections from one address and 2,000 from 50 others to a TLS relay's
// control port. Past the per-source cap, the relay's refusal used to be
// written on the *tls.Conn from the accept loop, which ran a TLS handshake
// with no deadline: the accept loop stopped, no agent could register, and
// once the pool ran dry no client was served. Now a new agent registers
// within a second of dialing, and clients of an existing tunnel are
// served throughout.
func TestAttackSilentFloodOnTLSControlPort(t *testing.T) {
	fdHeadroom(t, 3000)
	e := newEnv(t)
	r := e.startRelayWith(nil, nil, "-tls-self-signed", "-state-dir", t.TempDir())
	fp := fingerprint(t, r)
	_, pub := e.startEchoWith("127.0.0.1", r.port, nil, "-tls-fingerprint", fp)

	addr := child.Addr(r.port)
	one := holdSilent(t, addr, 500, func(int) string { return "127.0.0.3" })
	many := holdSilent(t, addr, 2000, func(i int) string { return fmt.Sprintf("127.0.1.%d", i%50+1) })
	t.Logf("flood: %d of 500 silent connections from 127.0.0.3, %d of 2,000 from 50 addresses", one, many)

	// More clients than the agent keeps data connections parked: the pool
	// must refill through the control port during the flood.
	for i := range 48 {
		if err := echoOnce(pub, randomBytes(4<<10), 10*time.Second); err != nil {
			t.Fatalf("client %d of the existing tunnel during the flood: %v; relay's last lines:\n%s", i, err, lastLines(r.Stderr.String(), 20))
		}
	}
	start := time.Now()
	p := e.start(echoBin, []string{"-tls-fingerprint", fp, "127.0.0.1", strconv.Itoa(r.port)}, procOpts{scanStdout: true, daemon: true})
	line, err := p.FirstLine(15 * time.Second)
	took := time.Since(start)
	if err != nil {
		t.Fatalf("a new agent during the flood: %v; its stderr:\n%s\nrelay's last lines:\n%s", err, p.Stderr, lastLines(r.Stderr.String(), 20))
	}
	port, _ := child.AnnouncedPort(line, "127.0.0.1")
	mustEcho(t, "the new agent's tunnel, during the flood", port, randomBytes(64<<10))
	// The process's own start is in the figure: a second of dialing, and
	// as much again for exec and TLS set-up on a loaded machine.
	if took > 2*time.Second {
		t.Errorf("a new agent registered %v after its start, during the flood; want within a second of dialing", took)
	}
	t.Logf("a new agent registered %v after its start, during the flood", took.Round(time.Millisecond))
}

// TestAttackParallelGuesses: a stranger opens 40 handshakes at once from
// one address, collects 40 challenges, then sends 40 guesses of the
// secret. The throttle used to be checked at Hello and spent only when an
// Auth failed, so all 40 guesses were checked. Now each check spends a
// token first: at most the burst (5) plus the refill (2 a second) are
// checked, the rest are refused unchecked, and the log and /metrics say
// so.
func TestAttackParallelGuesses(t *testing.T) {
	const k = 40
	e := newEnv(t)
	maddr := child.Addr(freePort(t))
	r := e.startRelayWith(nil, secretEnv, "-metrics-addr", maddr)
	addr := child.Addr(r.port)

	conns := make([]*net.TCPConn, k)
	nonces := make([][proto.NonceLen]byte, k)
	for i := range k {
		conns[i] = testutil.DialFrom(t, "127.0.0.7", addr)
		conns[i].SetDeadline(time.Now().Add(10 * time.Second))
		conns[i].Write(append(proto.Preamble(), proto.Append(nil, &proto.Hello{Agent: "guesser"})...))
	}
	for i, c := range conns {
		m, err := proto.ReadMessage(c, proto.DefaultMaxPayload)
		if err != nil {
			t.Fatalf("handshake %d: %v", i, err)
		}
		ch, ok := m.(*proto.Challenge)
		if !ok {
			t.Fatalf("handshake %d: got %s %+v, want a challenge (all Hellos come before any guess)", i, m.Type(), m)
		}
		nonces[i] = ch.Nonce
	}
	start := time.Now()
	checked, throttled := 0, 0
	for i, c := range conns {
		c.Write(proto.Append(nil, &proto.Auth{MAC: proto.AuthMAC("a wrong guess", nonces[i])}))
		m, err := proto.ReadMessage(c, proto.DefaultMaxPayload)
		if err != nil {
			t.Fatalf("guess %d: %v", i, err)
		}
		switch m := m.(type) {
		case *proto.Error:
			switch m.Code {
			case proto.CodeAuthFailed:
				checked++
			case proto.CodeLimit:
				throttled++
			default:
				t.Fatalf("guess %d: %+v", i, m)
			}
		default:
			t.Fatalf("guess %d: got %s, want an Error", i, m.Type())
		}
	}
	took := time.Since(start)
	if limit := 5 + int(2*took.Seconds()) + 1; checked > limit {
		t.Errorf("%d of %d parallel guesses were checked in %v, want at most %d (burst 5, 2 a second)", checked, k, took, limit)
	}
	t.Logf("%d parallel guesses in %v: %d checked, %d refused unchecked", k, took.Round(time.Millisecond), checked, throttled)
	if n := metric(t, maddr, "tcprelay_auth_throttled_total"); n < int64(throttled) || throttled == 0 {
		t.Errorf("tcprelay_auth_throttled_total %d, want at least the %d guesses refused unchecked (and some)", n, throttled)
	}
	if !child.WaitFor(5*time.Second, func() bool {
		return counted(r.Stderr.String(), "authentication refused unchecked") >= throttled
	}) {
		t.Errorf("the relay's log does not count the %d guesses refused unchecked:\n%s", throttled, lastLines(r.Stderr.String(), 20))
	}
}

// taggedServer serves, on a loopback port, every connection the line
// tag+"\n", and returns its address.
func taggedServer(t *testing.T, tag string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	testutil.Serve(t, ln, func(c net.Conn) {
		c.Write([]byte(tag + "\n"))
		io.Copy(io.Discard, c)
	})
	return ln.Addr().String()
}

// readTag connects to port and reads the line the server behind it
// writes first.
func readTag(port int) (string, error) {
	c, err := net.DialTimeout("tcp", child.Addr(port), 5*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	c.Write([]byte("hello\n"))
	return bufio.NewReader(c).ReadString('\n')
}

// TestAttackSecretHolderJoinsKeyedPool: on a relay with an agents file
// and a secret, a holder of the secret asks to join alice's pool. The pool
// scope used to be checked only for agents with a key, so it joined, and
// with its parked connections took most of alice's clients. Now the
// secret's agents have pools of their own: its pool of that name is
// another pool, on another port, and every client of alice's reaches
// alice's server, whichever of them came first.
func TestAttackSecretHolderJoinsKeyedPool(t *testing.T) {
	e := newEnv(t)
	aliceFile, aliceKey := e.agentKey("alice")
	agents := writeAgents(t, "", "alice "+aliceKey+" pools=web\n")
	r := e.startRelayWith(nil, secretEnv, "-agents", agents)
	// The secret holder first, to squat the name; then alice.
	_, mallory := e.startAgentWith(exposeBin, []string{"-pool", "web", "127.0.0.1", strconv.Itoa(r.port), taggedServer(t, "mallory")},
		"127.0.0.1", secretEnv)
	_, pub := e.startExpose("127.0.0.1", r.port, taggedServer(t, "alice"), "-key", aliceFile, "-pool", "web")
	if pub == mallory {
		t.Fatalf("alice's pool web and the secret holder's are one port, %d", pub)
	}
	// And a holder that comes after alice does not get in either.
	_, late := e.startAgentWith(exposeBin, []string{"-pool", "web", "127.0.0.1", strconv.Itoa(r.port), taggedServer(t, "mallory")},
		"127.0.0.1", secretEnv)
	if late != mallory {
		t.Errorf("the second secret holder's pool web is on port %d, want the first's, %d", late, mallory)
	}
	for i := range 20 {
		if tag, err := readTag(pub); tag != "alice\n" {
			t.Fatalf("client %d of alice's pool reached %q (%v), want alice's server", i, tag, err)
		}
	}
}

// rawSessions opens up to n sessions of holders of the secret from the IP
// address from, without a key or each with a new key of its own (keyed),
// each asking for tunnels public ports and parking as many pre-opened
// connections as the relay offers, and stops at the first session the
// relay refuses. It returns the sessions opened and the ports they got.
func rawSessions(t *testing.T, addr, from string, n, tunnels int, keyed bool) (sessions, ports int) {
	t.Helper()
	for range n {
		o := testutil.RawOptions{Secret: attackSecret, From: from, Features: proto.FeaturePool}
		if keyed {
			_, o.Key, _ = ed25519.GenerateKey(rand.Reader)
		}
		a, refused := testutil.DialRaw(t, addr, o)
		// An attacker retries while its own pre-opened connections are
		// still in handshake.
		for try := 0; refused != nil && strings.Contains(refused.Message, "in handshake") && try < 20; try++ {
			time.Sleep(50 * time.Millisecond)
			a, refused = testutil.DialRaw(t, addr, o)
		}
		if refused != nil {
			t.Logf("from %s: session %d refused: %s", from, sessions+1, refused.Message)
			return sessions, ports
		}
		sessions++
		for i := range tunnels {
			a.Send(t, proto.Append(nil, &proto.Listen{ID: uint32(i + 1)}))
			if _, ok := a.Next(t).(*proto.ListenOK); ok {
				ports++
			}
		}
		if a.PoolKey != nil {
			for range a.PoolKey.Max {
				a.Park(t, a.PoolKey.Key)
			}
		}
	}
	return sessions, ports
}

// TestAttackSecretHolderTakesAgentsBudget: one holder of the secret, from
// one address, opens sessions with every pre-opened connection it is
// offered, and asks each for 16 ports. It used to take the whole agents'
// budget (every other agent was told "relay busy") and every port of a
// small range. Now its address has its fair share of the budget and 16
// ports; another agent of the secret, and a keyed tenant, still register.
// On a relay with an agents file, and on one with the secret only.
func TestAttackSecretHolderTakesAgentsBudget(t *testing.T) {
	for _, mode := range []string{"agents file and secret", "secret only"} {
		t.Run(mode, func(t *testing.T) {
			e := newEnv(t)
			lo := publicRange()
			flags := []string{"-max-fds", "800", "-ports", fmt.Sprintf("%d-%d", lo, lo+39)}
			aliceFile, aliceKey := e.agentKey("alice")
			if mode == "agents file and secret" {
				flags = append(flags, "-agents", writeAgents(t, "", "alice "+aliceKey+"\n"))
			}
			r := e.startRelayWith(nil, secretEnv, flags...)
			addr := child.Addr(r.port)

			sessions, ports := rawSessions(t, addr, "127.0.0.9", 4, 16, false)
			t.Logf("4 sessions from 127.0.0.9 asking for 16 ports each: %d sessions, %d of the 40 ports", sessions, ports)
			if ports > 16 {
				t.Errorf("one address got %d of the 40 ports, want at most 16", ports)
			}
			more, _ := rawSessions(t, addr, "127.0.0.9", 200, 0, false)
			t.Logf("then %d more sessions with their pre-opened connections from 127.0.0.9", more)

			_, pub := e.startEchoWith("127.0.0.1", r.port, secretEnv)
			mustEcho(t, "another agent of the secret, after the flood", pub, randomBytes(16<<10))
			_, keyed := e.startEchoWith("127.0.0.1", r.port, secretEnv, "-key", aliceFile)
			mustEcho(t, "an agent with a key, after the flood", keyed, randomBytes(16<<10))
		})
	}
}

// publicRange picks the first of 40 public ports for a relay's -ports:
// below the ephemeral range (32768 and up here), so that no relay's
// control port, picked by freePort among the ephemeral ones, falls in it.
func publicRange() int { return 20000 + int(randInt(12000)) }

func randInt(n int64) int64 {
	v, _ := rand.Int(rand.Reader, big.NewInt(n))
	return v.Int64()
}

// TestAttackEveryDescriptor: a holder of the secret opens 120 sessions,
// each with a new key of its own making and 16 tunnels, against a relay
// whose process may hold 2,048 files. Public listeners used to be outside
// the budget: they took every descriptor, and then no client of another
// tunnel was served, no agent could register, and the log filled with
// "too many open files". Now listeners count in the agents' budget, in
// its address's share: the existing tunnel serves its clients, another
// agent registers, and the relay never runs out.
func TestAttackEveryDescriptor(t *testing.T) {
	e := newEnv(t)
	e.relayWrap = []string{"prlimit", "--nofile=2048:2048"}
	r := e.startRelayWith(nil, secretEnv)
	addr := child.Addr(r.port)
	_, before := e.startEchoWith("127.0.0.1", r.port, secretEnv)

	sessions, ports := rawSessions(t, addr, "127.0.3.1", 120, 16, true)
	t.Logf("120 sessions of 16 tunnels from one address: %d sessions, %d public ports", sessions, ports)
	for i := range 20 {
		if err := echoOnce(before, randomBytes(4<<10), 10*time.Second); err != nil {
			t.Fatalf("client %d of the tunnel opened before the flood: %v", i, err)
		}
	}
	_, after := e.startEchoWith("127.0.0.1", r.port, secretEnv)
	mustEcho(t, "an agent registered after the flood", after, randomBytes(64<<10))
	if n := counted(r.Stderr.String(), "too many open files"); n > 0 {
		t.Errorf("the relay ran out of descriptors %d times:\n%s", n, lastLines(r.Stderr.String(), 20))
	}
}

// TestAttackKeysCostNothingToMake: a holder of the secret makes a new key
// for each of 300 handshakes on a relay without an agents file. Each key
// used to leave its identity behind for good (about 1.2 KB each: +46 MiB
// after 40,000). Now an identity with no session and no port is
// forgotten.
func TestAttackKeysCostNothingToMake(t *testing.T) {
	e := newEnv(t)
	maddr := child.Addr(freePort(t))
	r := e.startRelayWith(nil, secretEnv, "-metrics-addr", maddr)
	addr := child.Addr(r.port)
	for i := range 300 {
		_, key, _ := ed25519.GenerateKey(rand.Reader)
		a, refused := testutil.DialRaw(t, addr, testutil.RawOptions{Secret: attackSecret, Key: key})
		if refused != nil {
			t.Fatalf("handshake %d with a new key: %+v", i, refused)
		}
		a.Conn.Close()
	}
	var n int64
	if !child.WaitFor(5*time.Second, func() bool { n = metric(t, maddr, "tcprelay_identities"); return n == 0 }) {
		t.Errorf("after 300 handshakes with new keys, all ended: tcprelay_identities %d, want 0", n)
	}
}

// TestAttackRevokedTenantKeepsConnections: a tenant removed from the
// agents file (SIGHUP) used to keep answering its relayed clients for as
// long as they stayed connected. Now its relayed connections, its session
// and its port end within a second.
func TestAttackRevokedTenantKeepsConnections(t *testing.T) {
	e := newEnv(t)
	aliceFile, aliceKey := e.agentKey("alice")
	_, bobKey := e.agentKey("bob")
	agents := writeAgents(t, "", "alice "+aliceKey+"\nbob "+bobKey+"\n")
	r := e.startRelayWith(nil, nil, "-agents", agents)
	// Not a daemon: it is to exit on its own.
	alice := e.start(echoBin, []string{"-key", aliceFile, "127.0.0.1", strconv.Itoa(r.port)}, procOpts{scanStdout: true})
	line, err := alice.FirstLine(announceTimeout)
	pub, ok := child.AnnouncedPort(line, "127.0.0.1")
	if err != nil || !ok {
		t.Fatalf("alice: %q, %v; stderr:\n%s", line, err, alice.Stderr)
	}
	live := openLive(t, pub)

	writeAgents(t, agents, "bob "+bobKey+"\n")
	start := time.Now()
	r.signal(syscall.SIGHUP)
	if took, ok := live.closedWithin(2 * time.Second); !ok || took > time.Second {
		t.Errorf("a relayed connection of the revoked tenant: closed %v (%v after SIGHUP), want closed within a second", ok, took)
	}
	if took, ok := waitRefused(pub, start, 2*time.Second); !ok || took > time.Second {
		t.Errorf("the revoked tenant's port: refused %v, %v after SIGHUP, want within a second", ok, took)
	}
	alice.mustExit(10 * time.Second)
	if alice.ExitCode() == 0 || !strings.Contains(alice.Stderr.String(), "authentication failed") {
		t.Errorf("the revoked agent: %s, stderr:\n%s\nwant a non-zero exit saying authentication failed", alice.Status(), alice.Stderr)
	}
}

// TestAttackNarrowedTenantKeepsPort: a tenant whose ports= is narrowed to
// exclude the port it holds used to keep it, its connections, and even got
// it back after a relay restart, from the state file. Now its connections
// through that port end within a second of the SIGHUP, its agent registers
// again inside its new scope, and after a restart the old port is not
// given back.
func TestAttackNarrowedTenantKeepsPort(t *testing.T) {
	e := newEnv(t)
	lo := publicRange()
	rng := fmt.Sprintf("%d-%d", lo, lo+9)
	aliceFile, aliceKey := e.agentKey("alice")
	agents := writeAgents(t, "", "alice "+aliceKey+" ports="+rng+"\n")
	stateDir := t.TempDir()
	r := e.startRelayWith(nil, nil, "-agents", agents, "-ports", rng, "-state-dir", stateDir)
	alice, pub := e.startAgent(echoBin, []string{"-key", aliceFile, "127.0.0.1", strconv.Itoa(r.port)}, "127.0.0.1")
	live := openLive(t, pub)

	// Narrowed to the other ports of the range.
	narrow := fmt.Sprintf("%d-%d", lo+1, lo+9)
	if pub != lo {
		narrow = fmt.Sprintf("%d-%d", lo, pub-1)
	}
	writeAgents(t, agents, "alice "+aliceKey+" ports="+narrow+"\n")
	r.signal(syscall.SIGHUP)
	if took, ok := live.closedWithin(2 * time.Second); !ok || took > time.Second {
		t.Errorf("a relayed connection through the port outside the new scope: closed %v (%v after SIGHUP), want within a second", ok, took)
	}
	again := alice.reannounced(10 * time.Second)
	if again == pub {
		t.Fatalf("after the narrowing the agent announced port %d again, want another", pub)
	}
	mustEcho(t, "the tenant's new port, inside its new scope", again, []byte("inside\n"))

	// Killed, the relay leaves its state file; narrowed again while it is
	// down, to exclude the new port too, it does not give that port back.
	r.kill()
	alice.kill()
	writeAgents(t, agents, "alice "+aliceKey+" ports="+strconv.Itoa(lo+9)+"\n")
	if again == lo+9 {
		writeAgents(t, agents, "alice "+aliceKey+" ports="+strconv.Itoa(lo)+"\n")
	}
	r = e.restartRelay(r)
	_, third := e.startAgent(echoBin, []string{"-key", aliceFile, "127.0.0.1", strconv.Itoa(r.port)}, "127.0.0.1")
	if third == again || third == pub {
		t.Errorf("after a restart the narrowed tenant got port %d back, outside its scope", third)
	}
}

// live is a relayed connection held open, echoing.
type live struct {
	c      net.Conn
	closed chan time.Time
}

// openLive connects to port, checks one echo, and watches for the close.
func openLive(t *testing.T, port int) *live {
	t.Helper()
	c, err := net.DialTimeout("tcp", child.Addr(port), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 5)
	if _, err := c.Write([]byte("live\n")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatalf("echo on a live connection: %v", err)
	}
	c.SetDeadline(time.Time{})
	l := &live{c: c, closed: make(chan time.Time, 1)}
	go func() {
		io.Copy(io.Discard, c)
		l.closed <- time.Now()
	}()
	return l
}

// closedWithin waits up to d for the connection to be closed by the relay
// and says how long after the call it was.
func (l *live) closedWithin(d time.Duration) (time.Duration, bool) {
	start := time.Now()
	select {
	case at := <-l.closed:
		return at.Sub(start), true
	case <-time.After(d):
		return d, false
	}
}

// TestAttackSlowAgentEvictedBySilentChurn: 100 addresses keep some 2,000
// silent connections churning on the control port, filling the handshake
// budget, while an agent behind a link that adds 1.2 s of delay each way
// registers. Eviction used to look only at a handshake's age, so the slow
// agent's, the oldest, was closed over and over. Now a handshake that sent
// bytes is not evicted while silent ones are there.
func TestAttackSlowAgentEvictedBySilentChurn(t *testing.T) {
	fdHeadroom(t, 2500)
	e := newEnv(t)
	r := e.startRelay(nil)
	addr := child.Addr(r.port)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var dials atomic.Int64
	for i := range 100 {
		ip := fmt.Sprintf("127.0.2.%d", i+1)
		for range 20 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				d := net.Dialer{Timeout: time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}
				for {
					c, err := d.Dial("tcp", addr)
					if err == nil {
						dials.Add(1)
					}
					// Each lives 0.3 to 1.5 s, silent, then dials again.
					select {
					case <-stop:
					case <-time.After(300*time.Millisecond + time.Duration(randInt(1200))*time.Millisecond):
					}
					if c != nil {
						c.Close()
					}
					select {
					case <-stop:
						return
					default:
					}
				}
			}()
		}
	}
	defer func() {
		close(stop)
		wg.Wait()
	}()

	slow := delayProxy(t, addr, 1200*time.Millisecond)
	p := e.start(echoBin, []string{"127.0.0.1", strconv.Itoa(slow)}, procOpts{scanStdout: true, daemon: true})
	line, err := p.FirstLine(30 * time.Second)
	if err != nil {
		t.Fatalf("the slow agent during the churn: %v; its stderr:\n%s\nrelay's last lines:\n%s", err, p.Stderr, lastLines(r.Stderr.String(), 20))
	}
	t.Logf("the slow agent registered (%q) while the churn made %d silent connections", line, dials.Load())
	if evicted := counted(p.Stderr.String(), "EOF"); evicted > 0 {
		t.Errorf("the slow agent's handshake was cut %d times:\n%s", evicted, p.Stderr)
	}
}

// delayProxy forwards each connection to target, delivering every chunk
// delay after it was read, in both directions: a long round trip. It
// returns its port.
func delayProxy(t *testing.T, target string, delay time.Duration) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	testutil.Serve(t, ln, func(c net.Conn) {
		up, err := net.Dial("tcp", target)
		if err != nil {
			c.Close()
			return
		}
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { defer wg.Done(); delayed(up, c, delay) }()
		go func() { defer wg.Done(); delayed(c, up, delay) }()
		wg.Wait()
	})
	return ln.Addr().(*net.TCPAddr).Port
}

// delayed copies src to dst, each chunk delay after it was read, and
// closes both at the end of either side.
func delayed(dst, src net.Conn, delay time.Duration) {
	type chunk struct {
		b  []byte
		at time.Time
	}
	q := make(chan chunk, 64)
	go func() {
		defer close(q)
		for {
			b := make([]byte, 32<<10)
			n, err := src.Read(b)
			if n > 0 {
				q <- chunk{b[:n], time.Now().Add(delay)}
			}
			if err != nil {
				return
			}
		}
	}()
	for ch := range q {
		time.Sleep(time.Until(ch.at)) // the link's latency, not a synchronisation
		if _, err := dst.Write(ch.b); err != nil {
			break
		}
	}
	dst.Close()
	src.Close()
	for range q {
	}
}

// TestKeyedAgentsShareSecretPools: on a relay without an agents file, an
// agent with a key of its own used to be refused any pool (its anonymous
// identity had no pools=). It now joins pools within the same rules as
// the agents without a key: both serve one pool on one port.
func TestKeyedAgentsShareSecretPools(t *testing.T) {
	e := newEnv(t)
	keyFile, _ := e.agentKey("k")
	r := e.startRelayWith(nil, secretEnv)
	_, a := e.startEchoWith("127.0.0.1", r.port, secretEnv, "-key", keyFile, "-pool", "web")
	_, b := e.startEchoWith("127.0.0.1", r.port, secretEnv, "-pool", "web")
	if a != b {
		t.Fatalf("the keyed agent's pool is on port %d, the keyless one's on %d: want one pool", a, b)
	}
	mustEcho(t, "the shared pool", a, randomBytes(16<<10))
}

// TestAttackTenantProbesOtherTenantsPort: a tenant asking for a port that
// another tenant holds is told it is not allowed, in the same words as a
// port outside its scope, never "in use", which would tell it what the
// other holds.
func TestAttackTenantProbesOtherTenantsPort(t *testing.T) {
	e := newEnv(t)
	aliceFile, aliceKey := e.agentKey("alice")
	bobFile, bobKey := e.agentKey("bob")
	agents := writeAgents(t, "", "alice "+aliceKey+"\nbob "+bobKey+"\n")
	r := e.startRelayWith(nil, nil, "-agents", agents)
	_, pub := e.startAgent(echoBin, []string{"-key", aliceFile, "127.0.0.1", strconv.Itoa(r.port)}, "127.0.0.1")
	bob := e.start(echoBin, []string{"-key", bobFile, "-port", strconv.Itoa(pub), "-fail-fast", "127.0.0.1", strconv.Itoa(r.port)}, procOpts{})
	bob.mustExit(10 * time.Second)
	out := bob.Stderr.String()
	if bob.ExitCode() == 0 || !strings.Contains(out, "not allowed for this agent") || strings.Contains(out, "in use") {
		t.Errorf("bob asking for alice's port %d: %s, stderr:\n%s\nwant a refusal that says not allowed, and not in use", pub, bob.Status(), out)
	}
}
