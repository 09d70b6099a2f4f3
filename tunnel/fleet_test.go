package tunnel_test

import (
	"net"
	"strconv"
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
	addrs := make(chan net.Addr, 4)
	cfg := tunnel.Config{Logger: testutil.Logger(t), OnAddr: func(a net.Addr) { addrs <- a }}
	ln, err := cfg.Listen(testutil.Context(t), r1.Addr, r2.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	testutil.Serve(t, ln, testutil.Echo)
	all := ln.Addrs()
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
