//go:build linux

package tunnel_test

import (
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"runtime"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/copier"
	"tcprelay/internal/testutil"
	"tcprelay/server"
	"tcprelay/tunnel"
)

// TestIdleTLSConnsHoldNoGoroutine: connections relayed over TLS data
// connections, and linked at the agent to a target with copier.Start (as
// ./expose does), hold no goroutine once idle, at the relay or at the
// agent, as over plain TCP: each end's Link reads its TLS conn over
// copier.Records and parks. They wake for bytes from either end.
func TestIdleTLSConnsHoldNoGoroutine(t *testing.T) {
	check.Leaks(t)
	cert, pool := testutil.SelfSignedCert(t)
	relay := startRelayAs(t, "127.0.0.1:0", server.Config{}, &cert)
	ln := listen(t, relay.Addr, tunnel.Config{TLS: &tls.Config{RootCAs: pool}})
	target, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer target.Close()
	linked := make(chan bool, 1)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if c.(*tunnel.Conn).TLSRecords() == nil {
				t.Error("a relayed conn over TLS has no Records to park on")
			}
			tc, err := net.Dial("tcp", target.Addr().String())
			if err != nil {
				c.Close()
				continue
			}
			copier.Start(c, tc, func(*copier.Link, copier.Result) {})
			linked <- true
		}
	}()
	type conn struct{ client, target net.Conn }
	open := func() conn {
		client := testutil.Dial(t, ln.Addr().String())
		if _, err := client.Write([]byte("hi")); err != nil {
			t.Fatal(err)
		}
		<-linked
		tc, err := target.Accept()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { tc.Close() })
		c := conn{client, tc}
		buf := make([]byte, 2)
		tc.SetReadDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.ReadFull(tc, buf); err != nil || string(buf) != "hi" {
			t.Fatalf("target read %q, %v; want \"hi\"", buf, err)
		}
		exchange(t, c.target, c.client, "ho")
		return c
	}
	settled := func(want int, what string) {
		t.Helper()
		check.Eventually(t, 10*time.Second, func() error {
			if got := runtime.NumGoroutine(); got > want {
				return fmt.Errorf("%s: %d goroutines, want at most %d", what, got, want)
			}
			return nil
		})
	}
	// The first conn starts the poller and has the agent refill its pool
	// of data connections: what stays after it is the baseline.
	open()
	time.Sleep(time.Second)
	g0 := runtime.NumGoroutine()
	const n = 50
	conns := make([]conn, n)
	for i := range conns {
		conns[i] = open()
	}
	// A little slack for the pool's refills in flight; without parking,
	// each idle conn would hold 4 (2 at the relay, 2 at the agent).
	settled(g0+2, fmt.Sprintf("%d idle relayed TLS conns", n))
	for round := range 2 {
		for _, c := range conns {
			exchange(t, c.target, c.client, fmt.Sprint("from the target ", round))
			exchange(t, c.client, c.target, fmt.Sprint("from the client ", round))
		}
		settled(g0+2, fmt.Sprintf("round %d, idle again", round))
	}
}

// exchange writes msg on from and reads it on to.
func exchange(t *testing.T, from, to net.Conn, msg string) {
	t.Helper()
	if _, err := from.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(msg))
	to.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(to, buf); err != nil || string(buf) != msg {
		t.Fatalf("read %q, %v; want %q", buf, err, msg)
	}
}
