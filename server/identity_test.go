package server_test

import (
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/proto"
	"tcprelay/internal/testutil"
	"tcprelay/server"
	"tcprelay/tunnel"
)

func newKey(t *testing.T) ed25519.PrivateKey {
	t.Helper()
	_, k, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func agentOf(name string, k ed25519.PrivateKey) server.Agent {
	return server.Agent{Name: name, Key: k.Public().(ed25519.PublicKey)}
}

// listenAs registers a listener with key (nil: none) and secret, asking for
// port (required if not zero); it is closed when the test ends.
func listenAs(t *testing.T, relayAddr string, key ed25519.PrivateKey, secret string, port int) (*tunnel.Listener, error) {
	t.Helper()
	cfg := tunnel.Config{Key: key, Secret: secret, Port: port, PortRequired: port != 0,
		MaxBackoff: 100 * time.Millisecond, Logger: testutil.Logger(t)}
	ln, err := cfg.Listen(testutil.Context(t), relayAddr)
	if err == nil {
		t.Cleanup(func() { ln.Close() })
	}
	return ln, err
}

func portOf(ln net.Listener) int { return ln.Addr().(*tunnel.Addr).Port }

func TestParseAgents(t *testing.T) {
	k := proto.FormatKey(newKey(t).Public().(ed25519.PublicKey))
	k2 := proto.FormatKey(newKey(t).Public().(ed25519.PublicKey))
	agents, err := server.ParseAgents(strings.NewReader(fmt.Sprintf(`
# team web
web %s ports=9000-9009,9100 tunnels=3 sessions=4 parked=8 pools=www,api allow=10.0.0.0/8,2001:db8::1 deny=10.1.0.0/16
db  %s   # defaults
team secret ports=9200-9299 sessions=64 pools=scratch
`, k, k2)))
	if err != nil {
		t.Fatal(err)
	}
	if len(agents) != 3 {
		t.Fatalf("%d agents, want 3", len(agents))
	}
	if team := agents[2]; !team.Secret || team.Key != nil || team.Name != "team" || team.Sessions != 64 || strings.Join(team.Pools, ",") != "scratch" {
		t.Errorf("the secret's line = %+v", team)
	}
	web := agents[0]
	if web.Name != "web" || len(web.Ports) != 2 || web.Ports[1] != (server.PortRange{Lo: 9100, Hi: 9100}) ||
		web.Tunnels != 3 || web.Sessions != 4 || web.Parked != 8 || strings.Join(web.Pools, ",") != "www,api" {
		t.Errorf("web = %+v", web)
	}
	if proto.FormatPrefixes(web.Allow) != "10.0.0.0/8,2001:db8::1/128" || proto.FormatPrefixes(web.Deny) != "10.1.0.0/16" {
		t.Errorf("web's access lists: allow %v, deny %v", web.Allow, web.Deny)
	}
	if db := agents[1]; db.Name != "db" || db.Ports != nil || db.Tunnels != 0 {
		t.Errorf("db = %+v", db)
	}
	for _, bad := range []string{
		"web",                                              // no key
		"web ed25519:AAAA",                                 // short key
		"web " + k + " ports=9000",                         // fine alone...
		"web " + k + "\nweb " + k2,                         // duplicate name
		"web " + k + "\ndb " + k,                           // duplicate key
		"web " + k + " colour=blue",                        // unknown option
		"web " + k + " ports=9010-9000",                    // backwards range
		"web " + k + " tunnels=0",                          // not positive
		"web " + k + " pools=a,,b",                         // empty pool name
		"web " + k + " ports=0-10",                         // port 0
		"web " + k + " tunnels",                            // no value
		"web " + k + " ports=70000-70001",                  // out of range
		"web " + k + " sessions=many",                      // not a number
		"web " + k + " parked=-1",                          // negative
		"web " + k + " ports=9000-9001-2",                  // garbage
		"web " + k + " pools=",                             // empty value
		"web " + strings.Replace(k, "ed25519:", "rsa:", 1), // another kind of key
		"a secret\nb secret",                               // two secret lines
		"a secret\na " + k,                                 // a name taken by the secret's line
		"web " + k + " allow=10.0.0.0/33",                  // not a prefix
		"web " + k + " deny=example.com",                   // not an address
	} {
		_, err := server.ParseAgents(strings.NewReader(bad))
		if bad == "web "+k+" ports=9000" {
			if err != nil {
				t.Errorf("ParseAgents(%q): %v", bad, err)
			}
			continue
		}
		if err == nil {
			t.Errorf("ParseAgents(%q) accepted", bad)
		} else if !strings.Contains(err.Error(), "line ") {
			t.Errorf("ParseAgents(%q) = %v, want the line named", bad, err)
		}
	}
}

// TestKeysAdmit: a relay with an agents file admits the keys it lists and
// refuses others, and agents without a key, with errors that say so.
func TestKeysAdmit(t *testing.T) {
	check.Leaks(t)
	web, stranger := newKey(t), newKey(t)
	relay := testutil.StartRelay(t, server.Config{Agents: []server.Agent{agentOf("web", web)}})
	ln, err := listenAs(t, relay.Addr, web, "", 0)
	if err != nil {
		t.Fatalf("listed key refused: %v", err)
	}
	testutil.Serve(t, ln, testutil.Echo)
	checkEcho(t, ln.Addr().String(), "admitted by key")

	_, err = listenAs(t, relay.Addr, stranger, "", 0)
	if !errors.Is(err, tunnel.ErrAuthFailed) || !strings.Contains(err.Error(), "unknown agent key "+tunnel.PublicKey(stranger)) {
		t.Errorf("unlisted key: %v, want ErrAuthFailed naming the key", err)
	}
	_, err = listenAs(t, relay.Addr, nil, "", 0)
	if !errors.Is(err, tunnel.ErrAuthFailed) || !strings.Contains(err.Error(), "admits agents by key") {
		t.Errorf("no key: %v, want ErrAuthFailed saying keys are needed", err)
	}
	// With a secret too, agents without a key may come in with it.
	relay2 := testutil.StartRelay(t, server.Config{Secret: "s", Agents: []server.Agent{agentOf("web", web)}})
	if _, err := listenAs(t, relay2.Addr, nil, "s", 0); err != nil {
		t.Errorf("secret holder refused by a relay with agents and a secret: %v", err)
	}
	if _, err := listenAs(t, relay2.Addr, nil, "wrong", 0); !errors.Is(err, tunnel.ErrAuthFailed) {
		t.Errorf("wrong secret: %v, want ErrAuthFailed", err)
	}
}

// TestScopeAcrossSessions: an identity's limits hold over all its sessions
// (two processes with one key share one budget): its port ranges, its
// endpoint count and its session count.
func TestScopeAcrossSessions(t *testing.T) {
	check.Leaks(t)
	base := freeRange(t, 10)
	web := newKey(t)
	a := agentOf("web", web)
	a.Ports = []server.PortRange{{Lo: base, Hi: base + 2}}
	a.Tunnels = 2
	relay := testutil.StartRelay(t, server.Config{PortMin: base, PortMax: base + 9, Agents: []server.Agent{a}})

	var lns []*tunnel.Listener
	for range 2 { // two "processes", one key
		ln, err := listenAs(t, relay.Addr, web, "", 0)
		if err != nil {
			t.Fatal(err)
		}
		if p := portOf(ln); p < base || p > base+2 {
			t.Errorf("port %d outside the agent's range %d-%d", p, base, base+2)
		}
		lns = append(lns, ln)
	}
	_, err := listenAs(t, relay.Addr, web, "", 0)
	if !errors.Is(err, tunnel.ErrLimit) || !strings.Contains(err.Error(), "tunnels=2") {
		t.Errorf("third endpoint of a tunnels=2 agent: %v, want ErrLimit", err)
	}
	// A port of the relay's range but not of the agent's is refused.
	lns[1].Close()
	testutil.WaitRefused(t, lns[1].Addr().String())
	_, err = listenAs(t, relay.Addr, web, "", base+5)
	if !errors.Is(err, tunnel.ErrPortUnavailable) || !strings.Contains(err.Error(), "not allowed") {
		t.Errorf("port outside the agent's range: %v, want ErrPortUnavailable", err)
	}

	// Sessions: two open, and a third over sessions=2, whatever it asks.
	// (The session closed above ends on the relay's side in its own time.)
	check.Eventually(t, 5*time.Second, func() error {
		if n := relay.Stats().Agents; n != 1 {
			return fmt.Errorf("%d sessions, want 1", n)
		}
		return nil
	})
	a.Sessions, a.Tunnels = 2, 5
	relay.SetAgents([]server.Agent{a})
	if _, err := listenAs(t, relay.Addr, web, "", 0); err != nil {
		t.Fatalf("second session of a sessions=2 agent: %v", err)
	}
	_, err = listenAs(t, relay.Addr, web, "", 0)
	if !errors.Is(err, tunnel.ErrLimit) || !strings.Contains(err.Error(), "sessions=2") {
		t.Fatalf("third session of a sessions=2 agent: %v, want ErrLimit", err)
	}
}

// TestPortOwnedAcrossRestart: an identity's port stays reserved for it when
// its relay restarts (the state file) and another identity that asks for
// the port first is refused; the owner gets it back. Then, after the
// owner releases it, the other may have it.
func TestPortOwnedAcrossRestart(t *testing.T) {
	check.Leaks(t)
	owner, other := newKey(t), newKey(t)
	cfg := server.Config{StateFile: filepath.Join(t.TempDir(), "state.json"),
		Agents: []server.Agent{agentOf("owner", owner), agentOf("other", other)}}
	relay := testutil.StartRelay(t, cfg)
	addrs := make(chan net.Addr, 4)
	c := tunnel.Config{Key: owner, MaxBackoff: 200 * time.Millisecond, Logger: testutil.Logger(t), OnAddr: func(a net.Addr) { addrs <- a }}
	ln, err := c.Listen(testutil.Context(t), relay.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	<-addrs
	testutil.Serve(t, ln, testutil.Echo)
	port := portOf(ln)

	relay.Close() // as if killed: the state file says the port was open
	relay = testutil.StartRelayAt(t, relay.Addr, cfg)
	_, err = listenAs(t, relay.Addr, other, "", port)
	// Refused in the words of a port outside its scope: the refusal does
	// not tell another tenant what the owner holds.
	if !errors.Is(err, tunnel.ErrPortUnavailable) || !strings.Contains(err.Error(), "not allowed for this agent") {
		t.Fatalf("another identity asking for the port after the restart: %v, want it refused as not allowed", err)
	}
	backOn(t, addrs, port)
	checkEcho(t, ln.Addr().String(), "the owner's port, after the restart")

	ln.Close() // released on purpose: no reservation
	testutil.WaitRefused(t, ln.Addr().String())
	if _, err := listenAs(t, relay.Addr, other, "", port); err != nil {
		t.Fatalf("the port after its owner released it: %v", err)
	}
}

// TestResumeTokenOwnsPort: without keys (the shared secret's one tenant),
// a port whose agent lost its control connection is kept for that agent's
// registration, by the token its ListenOK carried; another secret holder
// asking for it first is refused.
func TestResumeTokenOwnsPort(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{Secret: "s"})
	proxy := testutil.NewFaultProxy(t, relay.Addr)
	addrs := make(chan net.Addr, 4)
	c := tunnel.Config{Secret: "s", MaxBackoff: time.Second, Logger: testutil.Logger(t), OnAddr: func(a net.Addr) { addrs <- a }}
	ln, err := c.Listen(testutil.Context(t), proxy.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	<-addrs
	testutil.Serve(t, ln, testutil.Echo)
	port := portOf(ln)

	proxy.Cut(t, 0)
	// The relay sees the cut on its own socket: wait until it reserved the
	// port, then try to take it.
	check.Eventually(t, 5*time.Second, func() error {
		if relay.Stats().Reserved != 1 {
			return fmt.Errorf("%+v, want the port reserved", relay.Stats())
		}
		return nil
	})
	if _, err := listenAs(t, relay.Addr, nil, "s", port); !errors.Is(err, tunnel.ErrPortUnavailable) {
		t.Fatalf("another secret holder asking for the reserved port: %v, want it refused", err)
	}
	backOn(t, addrs, port)
	checkEcho(t, ln.Addr().String(), "resumed")
}

// TestRevokedAgent: an agent removed from the agents file loses its session
// and its port at once, and cannot come back.
func TestRevokedAgent(t *testing.T) {
	check.Leaks(t)
	web, db := newKey(t), newKey(t)
	relay := testutil.StartRelay(t, server.Config{Agents: []server.Agent{agentOf("web", web), agentOf("db", db)}})
	lnWeb, err := listenAs(t, relay.Addr, web, "", 0)
	if err != nil {
		t.Fatal(err)
	}
	lnDB, err := listenAs(t, relay.Addr, db, "", 0)
	if err != nil {
		t.Fatal(err)
	}
	testutil.Serve(t, lnDB, testutil.Echo)
	errc := make(chan error, 1)
	go func() {
		_, err := lnWeb.Accept()
		errc <- err
	}()

	start := time.Now()
	relay.SetAgents([]server.Agent{agentOf("db", db)})
	testutil.WaitRefused(t, lnWeb.Addr().String())
	if d := time.Since(start); d > time.Second {
		t.Errorf("revoked agent's port closed %v after the reload, want within a second", d)
	}
	select {
	case err := <-errc:
		if !errors.Is(err, tunnel.ErrAuthFailed) {
			t.Errorf("revoked agent's Accept: %v, want ErrAuthFailed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("revoked agent's Accept still waiting")
	}
	if relay.Stats().Reserved != 0 {
		t.Errorf("%+v: a revoked agent's port is still reserved", relay.Stats())
	}
	checkEcho(t, lnDB.Addr().String(), "the other agent is untouched")
}

// TestDataConnectionProof: with feature proof, a pre-opened data
// connection and a data connection for an announced client must prove
// they belong to the session: a join seen on the wire and replayed, or one
// without proof, is refused, and a forged Attach does not use up the
// client's token.
func TestDataConnectionProof(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	agent := testutil.NewRawAgentWith(t, relay.Addr, "", proto.FeaturePool|proto.FeatureProof)
	pub := agent.Listen(t, 0)
	key := agent.PoolKey.Key
	join := &proto.PoolJoin{Key: key, Seq: 1,
		MAC: proto.ProofMAC(agent.SessionKey, "pool-join", key[:], []byte{0, 0, 0, 0, 0, 0, 0, 1})}
	agent.Open(t, join)
	testutil.WaitParked(t, relay, 1)

	for name, m := range map[string]*proto.PoolJoin{
		"replayed":   join,
		"no proof":   {Key: key},
		"forged MAC": {Key: key, Seq: 2, MAC: [proto.MACLen]byte{1}},
	} {
		expectClosed(t, agent.Open(t, m), 5*time.Second)
		if n := relay.Stats().Parked; n != 1 {
			t.Fatalf("%s join: %d parked, want 1", name, n)
		}
	}

	// Take the parked connection with a client, then make the next client
	// wait for an Attach.
	testutil.Dial(t, pub)
	check.Eventually(t, 5*time.Second, func() error {
		if n := relay.Stats().Parked; n != 0 {
			return fmt.Errorf("%d parked", n)
		}
		return nil
	})
	client := testutil.Dial(t, pub)
	in := agent.ExpectIncoming(t)
	expectClosed(t, agent.Open(t, &proto.Attach{Token: in.Token}), 5*time.Second)
	data := agent.Open(t, &proto.Attach{Token: in.Token, MAC: proto.ProofMAC(agent.SessionKey, "attach", in.Token[:])})
	client.Write([]byte("ping"))
	buf := make([]byte, 4)
	data.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := data.Read(buf); err != nil || string(buf) != "ping" {
		t.Fatalf("the proven Attach got %q, %v; want the client's bytes", buf, err)
	}
}

// backOn waits for the agent's next registration, from its OnAddr channel,
// and checks that it is on port.
func backOn(t *testing.T, addrs <-chan net.Addr, port int) {
	t.Helper()
	select {
	case a := <-addrs:
		if a.(*tunnel.Addr).Port != port {
			t.Fatalf("the agent came back on %v, want port %d", a, port)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the agent did not register again")
	}
}

// TestSecretTenantScope: with an agents file in force, the agents that
// register with the secret and no key are one tenant with the scope of
// the file's secret line: its ports, and its sessions and tunnels over all
// of them. Keyed tenants are not held by it.
func TestSecretTenantScope(t *testing.T) {
	check.Leaks(t)
	base := freeRange(t, 10)
	team := server.Agent{Name: "team", Secret: true, Ports: []server.PortRange{{Lo: base + 5, Hi: base + 9}}, Sessions: 2, Tunnels: 3}
	alice := newKey(t)
	relay := testutil.StartRelay(t, server.Config{Secret: "s", PortMin: base, PortMax: base + 9,
		Agents: []server.Agent{agentOf("alice", alice), team}})
	a := testutil.NewRawAgent(t, relay.Addr, "s")
	b := testutil.NewRawAgent(t, relay.Addr, "s")
	if _, refused := testutil.DialRaw(t, relay.Addr, testutil.RawOptions{Secret: "s", Features: proto.FeaturePool}); refused == nil || refused.Code != proto.CodeLimit {
		t.Errorf("a third session of the secret's agents (sessions=2): %+v, want a limit", refused)
	}
	b.Send(t, proto.Append(nil, &proto.Listen{ID: 10, Port: uint16(base), Flags: proto.ListenPortRequired}))
	if e := b.Expect(t, proto.TypeError).(*proto.Error); !strings.Contains(e.Message, "not allowed for this agent") {
		t.Errorf("a port outside the secret's ports=: %+v, want not allowed", e)
	}
	for i, ag := range []*testutil.RawAgent{a, b, a} {
		_, p, _ := net.SplitHostPort(ag.Listen(t, 0))
		if n, _ := strconv.Atoi(p); n < base+5 || n > base+9 {
			t.Errorf("tunnel %d of the secret's agents on port %d, outside their ports=%d-%d", i+1, n, base+5, base+9)
		}
	}
	b.Send(t, proto.Append(nil, &proto.Listen{ID: 9}))
	if e := b.Expect(t, proto.TypeError).(*proto.Error); e.Code != proto.CodeLimit {
		t.Errorf("a fourth tunnel of the secret's agents (tunnels=3): %+v, want a limit", e)
	}
	if ln, err := listenAs(t, relay.Addr, alice, "", base); err != nil {
		t.Errorf("alice, a keyed tenant, on her port %d: %v", base, err)
	} else {
		ln.Close()
	}
}

// TestAccessLists: who may reach a tunnel is the intersection of its
// identity's allow=/deny= and its agent's own lists: a client outside them
// is closed at accept, counted, and never announced to the agent; an agent
// cannot widen what the agents file allows.
func TestAccessLists(t *testing.T) {
	check.Leaks(t)
	key := newKey(t)
	a := agentOf("web", key)
	a.Allow = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/29")}
	a.Deny = []netip.Prefix{netip.MustParsePrefix("127.0.0.3/32")}
	relay := testutil.StartRelay(t, server.Config{Agents: []server.Agent{a}})
	ag, refused := testutil.DialRaw(t, relay.Addr, testutil.RawOptions{Key: key, Features: proto.FeatureACL})
	if refused != nil {
		t.Fatal(refused)
	}
	// The agent denies one more address, and tries to allow one the file
	// does not.
	ag.Send(t, proto.Append(nil, &proto.Listen{ID: 7, Deny: "127.0.0.4", Allow: "127.0.0.0/24"}))
	ok := ag.Expect(t, proto.TypeListenOK).(*proto.ListenOK)
	pub := net.JoinHostPort("127.0.0.1", strconv.Itoa(int(ok.Port)))

	for _, from := range []string{"127.0.0.3", "127.0.0.4", "127.0.0.9"} {
		c := testutil.DialFrom(t, from, pub)
		if b := testutil.ReadAllTimeout(t, c, 5*time.Second); len(b) != 0 {
			t.Errorf("a client from %s read %q, want it closed", from, b)
		}
	}
	served := testutil.DialFrom(t, "127.0.0.2", pub)
	if in := ag.ExpectIncoming(t); in.Client != served.LocalAddr().String() {
		t.Errorf("the agent heard of %s first, want the one allowed client, %s: the denied ones must not reach it", in.Client, served.LocalAddr())
	}
	m := testutil.Metrics(t, relay.Server)
	if m["tcprelay_clients_denied_total"] != 3 || m[`tcprelay_endpoint_clients_denied_total{port="`+strconv.Itoa(int(ok.Port))+`"}`] != 3 {
		t.Errorf("denied: %d in all, %d on the endpoint; want 3 and 3", m["tcprelay_clients_denied_total"],
			m[`tcprelay_endpoint_clients_denied_total{port="`+strconv.Itoa(int(ok.Port))+`"}`])
	}
	// A list that is not CIDRs is refused, naming it.
	ag.Send(t, proto.Append(nil, &proto.Listen{ID: 8, Allow: "10.0.0.0/33"}))
	if e := ag.Expect(t, proto.TypeError).(*proto.Error); e.ID != 8 || !strings.Contains(e.Message, "10.0.0.0/33") {
		t.Errorf("Listen with a bad allow list: %+v, want an error naming it", e)
	}
}
