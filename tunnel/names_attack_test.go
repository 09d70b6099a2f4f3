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
	"tcprelay/internal/transport"
	"tcprelay/server"
	"tcprelay/tunnel"
)

// The attacks and demands of a review of issue 19 (names on a shared TLS
// port). Each test says what it shows; those marked FAILS fail on the
// code they were written against.

// serveNamesControl serves the relay's own TLS on the shared port's
// control listener, as ./relay does with -tls-cert, and returns the pinned
// TLS config an agent needs to reach it.
func serveNamesControl(t *testing.T, relay *testutil.Relay) *tls.Config {
	t.Helper()
	cert, _ := testutil.SelfSignedCert(t)
	done := make(chan error, 1)
	go func() {
		done <- relay.Serve(transport.Listen(relay.NamesControl(), &tls.Config{Certificates: []tls.Certificate{cert}}))
	}()
	t.Cleanup(func() { relay.Close(); <-done })
	pin, err := tunnel.PinnedTLS(tunnel.Fingerprint(cert.Certificate[0]))
	if err != nil {
		t.Fatal(err)
	}
	return pin
}

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
// closed. FAILS on main (subtest "shared port").
func TestNamesPortDeadParkedConns(t *testing.T) {
	check.Leaks(t)
	relay, names := testutil.StartNamesRelay(t, server.Config{})
	pin := serveNamesControl(t, relay)
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
// -test.timeout, since a deadlocked relay cannot be closed. FAILS on main.
func TestNamesControlStatusDeadlock(t *testing.T) {
	if os.Getenv("TCPRELAY_NAMES_DEADLOCK_CHILD") == "1" {
		relay, _ := testutil.StartNamesRelay(t, server.Config{})
		serveNamesControl(t, relay)
		if err := relay.WriteMetrics(io.Discard); err != nil {
			t.Fatal(err)
		}
		fmt.Println("METRICS WRITTEN")
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestNamesControlStatusDeadlock$", "-test.timeout=10s", "-test.v")
	cmd.Env = append(os.Environ(), "TCPRELAY_NAMES_DEADLOCK_CHILD=1")
	out, err := cmd.CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte("METRICS WRITTEN")) {
		why := "it failed"
		if bytes.Contains(out, []byte("test timed out")) {
			why = "it hung (deadlock)"
		}
		var stack []string
		for _, l := range strings.Split(string(out), "\n") {
			if strings.Contains(l, "namesPortNow") || strings.Contains(l, "takeStatus") || strings.Contains(l, "namesAddr") {
				stack = append(stack, strings.TrimSpace(l))
			}
		}
		t.Fatalf("WriteMetrics on a relay serving NamesControl: %s: %v\nwhere: %s", why, err, strings.Join(stack, " <- "))
	}
}
