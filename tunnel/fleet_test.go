package tunnel_test

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/testutil"
	"tcprelay/server"
	"tcprelay/tunnel"
)

// TestSeveralRelays: a Listener registers with every relay it is given, on
// one port, reports every address, and accepts the clients of all; when
// one relay goes away, the others go on serving.
func TestSeveralRelays(t *testing.T) {
	check.Leaks(t)
	r1 := testutil.StartRelayAt(t, "127.0.0.1:0", server.Config{})
	r2 := testutil.StartRelayAt(t, "127.0.0.2:0", server.Config{})
	var ln *tunnel.Listener
	var addrs chan net.Addr
	var all []net.Addr
	// The port relay 1 picks may be taken on 127.0.0.2 by another test
	// running meanwhile: then relay 2 refuses it, and a new Listener gets
	// another.
	for attempt := 1; ; attempt++ {
		addrs = make(chan net.Addr, 4)
		cfg := tunnel.Config{Logger: testutil.Logger(t), OnAddr: func(a net.Addr) { addrs <- a }}
		var err error
		if ln, err = cfg.Listen(testutil.Context(t), r1.Addr, r2.Addr); err != nil {
			t.Fatal(err)
		}
		if all = ln.Addrs(); len(all) == 2 && all[0] != nil && all[1] != nil || attempt == 3 {
			break
		}
		t.Logf("attempt %d: Addrs() = %v: relay 1's port is taken on 127.0.0.2; trying another", attempt, all)
		ln.Close()
	}
	defer ln.Close()
	testutil.Serve(t, ln, testutil.Echo)
	if len(all) != 2 || all[0] == nil || all[1] == nil {
		t.Fatalf("Addrs() = %v, want two addresses", all)
	}
	a1, a2 := all[0].(*tunnel.Addr), all[1].(*tunnel.Addr)
	if a1.Host != "127.0.0.1" || a2.Host != "127.0.0.2" || a1.Port != a2.Port {
		t.Fatalf("Addrs() = %v, %v; want the same port on 127.0.0.1 and 127.0.0.2", a1, a2)
	}
	if ln.Addr().String() != a1.String() {
		t.Errorf("Addr() = %v, want the first relay's %v", ln.Addr(), a1)
	}
	for range 2 {
		select {
		case <-addrs:
		case <-time.After(5 * time.Second):
			t.Fatal("OnAddr was not called for each relay")
		}
	}
	for i, a := range all {
		if err := testutil.EchoCheck(a.String(), []byte("through relay "+strconv.Itoa(i+1)), 5*time.Second); err != nil {
			t.Fatalf("through relay %d: %v", i+1, err)
		}
	}
	r1.Close()
	testutil.WaitRefused(t, a1.String())
	if err := testutil.EchoCheck(a2.String(), []byte("relay 2 after relay 1 went away"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
}

// TestSeveralRelaysOnePort: a relay that cannot give the port the others
// gave is not used with another port: the Listener stays on the relays
// that agree, and reports none for that one.
func TestSeveralRelaysOnePort(t *testing.T) {
	check.Leaks(t)
	r1 := testutil.StartRelayAt(t, "127.0.0.1:0", server.Config{})
	r2 := testutil.StartRelayAt(t, "127.0.0.2:0", server.Config{})
	// Something else holds a port on 127.0.0.2; ask the first relay for it.
	squatter, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	defer squatter.Close()
	port := squatter.Addr().(*net.TCPAddr).Port
	cfg := tunnel.Config{Port: port, Logger: testutil.Logger(t)}
	ln, err := cfg.Listen(testutil.Context(t), r1.Addr, r2.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	all := ln.Addrs()
	if all[0] == nil || all[0].(*tunnel.Addr).Port != port || all[1] != nil {
		t.Fatalf("Addrs() = %v, want port %d on the first relay and none on the second", all, port)
	}
}

// logTo is a logger that writes to buf, for tests that check what the
// Listener logs.
func logTo(buf *testutil.LockedBuffer) *slog.Logger {
	return slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// TestSeveralRelaysOneRefusesPort: a relay that cannot give the port the
// others gave says so in its own words; the Listener logs them at ERROR
// naming that relay, shows them in Status, serves through the others, and
// asks that relay again with the backoff, so it joins once the port is
// free there.
func TestSeveralRelaysOneRefusesPort(t *testing.T) {
	check.Leaks(t)
	r1 := testutil.StartRelayAt(t, "127.0.0.1:0", server.Config{})
	r2 := testutil.StartRelayAt(t, "127.0.0.2:0", server.Config{})
	// Another agent holds the port on the second relay.
	other := listen(t, r2.Addr, tunnel.Config{})
	port := other.Addr().(*tunnel.Addr).Port
	var logs testutil.LockedBuffer
	cfg := tunnel.Config{Port: port, PortRequired: true, MaxBackoff: 100 * time.Millisecond, Logger: logTo(&logs)}
	ln, err := cfg.Listen(testutil.Context(t), r1.Addr, r2.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	testutil.Serve(t, ln, testutil.Echo)
	if err := testutil.EchoCheck(net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), []byte("through the relay that accepted"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	check.Eventually(t, 5*time.Second, func() error {
		for _, line := range strings.Split(logs.String(), "\n") {
			if strings.Contains(line, "level=ERROR") && strings.Contains(line, "relay="+r2.Addr) && strings.Contains(line, "relay says:") {
				return nil
			}
		}
		return fmt.Errorf("no ERROR line with relay=%s and its words; logs:\n%s", r2.Addr, logs.String())
	})
	st := ln.Status()
	if len(st) != 2 || st[0].Err != nil || st[0].Addr == nil || st[1].Addr != nil || st[1].GaveUp ||
		!errors.Is(st[1].Err, tunnel.ErrPortUnavailable) || !strings.Contains(st[1].Err.Error(), "relay says:") {
		t.Fatalf("Status() = %+v; want relay 1 registered, relay 2 refusing the port in its own words, still tried", st)
	}

	other.Close() // the port frees up on the second relay
	check.Eventually(t, 10*time.Second, func() error {
		if a := ln.Addrs()[1]; a == nil || a.(*tunnel.Addr).Port != port {
			return fmt.Errorf("relay 2: %v, want port %d", a, port)
		}
		return nil
	})
	if st := ln.Status(); st[1].Err != nil {
		t.Errorf("Status() of relay 2 once registered: %+v, want no error", st[1])
	}
	if err := testutil.EchoCheck(net.JoinHostPort("127.0.0.2", strconv.Itoa(port)), []byte("through the relay that joined later"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
}

// TestSeveralRelaysOneRefusesSecret: a relay that refuses the secret is
// given up after its refusal is logged at ERROR; the other keeps serving,
// and Accept does not fail.
func TestSeveralRelaysOneRefusesSecret(t *testing.T) {
	check.Leaks(t)
	r1 := testutil.StartRelayAt(t, "127.0.0.1:0", server.Config{Secret: "s3cret"})
	r2 := testutil.StartRelayAt(t, "127.0.0.2:0", server.Config{Secret: "another"})
	var logs testutil.LockedBuffer
	cfg := tunnel.Config{Secret: "s3cret", MaxBackoff: 100 * time.Millisecond, Logger: logTo(&logs)}
	ln, err := cfg.Listen(testutil.Context(t), r1.Addr, r2.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	testutil.Serve(t, ln, testutil.Echo)
	if !strings.Contains(logs.String(), "level=ERROR") || !strings.Contains(logs.String(), "relay="+r2.Addr) {
		t.Errorf("no ERROR line naming relay %s; logs:\n%s", r2.Addr, logs.String())
	}
	st := ln.Status()
	if !st[1].GaveUp || !errors.Is(st[1].Err, tunnel.ErrAuthFailed) || st[0].Err != nil {
		t.Errorf("Status() = %+v; want relay 2 given up on, with ErrAuthFailed", st)
	}
	if err := testutil.EchoCheck(ln.Addr().String(), []byte("relay 1 serves on"), 5*time.Second); err != nil {
		t.Fatal(err)
	}
}
