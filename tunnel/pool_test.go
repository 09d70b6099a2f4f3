package tunnel_test

import (
	"testing"

	"tcprelay/internal/check"
	"tcprelay/internal/testutil"
	"tcprelay/server"
	"tcprelay/tunnel"
)

// TestPoolKeptFull: the library parks data connections at the relay and
// replaces each one a client uses.
func TestPoolKeptFull(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	ln := listen(t, relay.Addr, tunnel.Config{})
	testutil.Serve(t, ln, testutil.Echo)
	testutil.WaitParked(t, relay, 4)
	for i := range 10 {
		if err := echoRoundTrip(ln.Addr().String(), int64(i), 1000); err != nil {
			t.Fatal(err)
		}
	}
	testutil.WaitParked(t, relay, 4)
}

func TestDisablePool(t *testing.T) {
	check.Leaks(t)
	relay := testutil.StartRelay(t, server.Config{})
	ln := listen(t, relay.Addr, tunnel.Config{DisablePool: true})
	testutil.Serve(t, ln, testutil.Echo)
	if err := echoRoundTrip(ln.Addr().String(), 1, 1000); err != nil {
		t.Fatal(err)
	}
	if n := relay.Stats().Parked; n != 0 {
		t.Fatalf("%d parked connections with DisablePool", n)
	}
}
