package e2e

import (
	"fmt"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/child"
	"tcprelay/internal/testutil"
)

// TestHandshakeCutAtStartRetried: a relay under a flood evicts handshakes,
// closing or resetting them without a word. An agent starting then
// (echoserver, expose) retries with its backoff, as for a relay it cannot
// reach, instead of exiting; it registers once the relay lets it through,
// announces its address and serves.
func TestHandshakeCutAtStartRetried(t *testing.T) {
	e := newEnv(t)
	r := e.startRelay(nil)
	target := taggedEcho(t, 'x')
	for _, agent := range []struct {
		name string
		bin  string
		tail []string
	}{
		{"echoserver", echoBin, nil},
		{"expose", exposeBin, []string{target}},
	} {
		// Each of the first n connections dies in the next of the ways.
		const n = 3
		cut := testutil.NewCuttingProxy(t, child.Addr(r.port), n, func(i int, agent net.Conn, target string) {
			testutil.HandshakeCuts[i%len(testutil.HandshakeCuts)].Cut(agent, target)
		})
		_, cutPort, _ := net.SplitHostPort(cut.Addr())
		args := append([]string{"127.0.0.1", cutPort}, agent.tail...)
		p, port := e.startAgent(agent.bin, args, "127.0.0.1")
		if got := cut.Seen(); got <= n {
			t.Fatalf("%s: announced after %d connections, want more than the %d cut", agent.name, got, n)
		}
		if strings.Count(p.Stderr.String(), "retrying") < n {
			t.Errorf("%s: stderr does not tell of %d retries:\n%s", agent.name, n, p.Stderr)
		}
		if agent.bin == exposeBin {
			if a := tryClient(net.JoinHostPort("127.0.0.1", strconv.Itoa(port))); a.err != nil || a.tag != 'x' {
				t.Fatalf("expose after cut handshakes: tag %q, %v", a.tag, a.err)
			}
			continue
		}
		mustEcho(t, agent.name+" after cut handshakes", port, randomBytes(64<<10))
	}
}

// TestRelayRefusingPortIsReported: ./expose -port N registers with two
// relays, and the second cannot give N (another agent holds it there). The
// agent announces and serves through the first, logs the second's refusal
// in the relay's own words at ERROR naming it, keeps asking it with
// backoff, and joins it once the port is free there.
func TestRelayRefusingPortIsReported(t *testing.T) {
	e := newEnv(t)
	var r2 *relay
	// The squatter's port, below the ephemeral range, so that no other
	// test's connection holds it on 127.0.0.1 when relay 1 binds it.
	for attempt := 0; r2 == nil && attempt < 5; attempt++ {
		lo := publicRange()
		r2 = e.tryRelay("127.0.0.2", freePort(t), nil, []string{"-ports", fmt.Sprintf("%d-%d", lo, lo+50)})
	}
	if r2 == nil {
		t.Fatal("relay on 127.0.0.2: no free port in 5 attempts")
	}
	squatter, n := e.startEcho("127.0.0.2", r2.port)
	r1 := e.startRelayWith(nil, nil, "-ports", fmt.Sprintf("%d-%d", n, n))
	relay2 := net.JoinHostPort("127.0.0.2", strconv.Itoa(r2.port))

	relays := fmt.Sprintf("127.0.0.1:%d,%s", r1.port, relay2)
	p, port := e.startAgent(exposeBin, []string{"-port", strconv.Itoa(n), relays, taggedEcho(t, 'x')}, "127.0.0.1")
	if port != n {
		t.Fatalf("expose announced port %d, want %d", port, n)
	}
	if a := tryClient(child.Addr(n)); a.err != nil || a.tag != 'x' {
		t.Fatalf("through relay 1: tag %q, %v", a.tag, a.err)
	}
	check.Eventually(t, 10*time.Second, func() error {
		for _, line := range strings.Split(p.Stderr.String(), "\n") {
			if strings.Contains(line, "level=ERROR") && strings.Contains(line, "relay="+relay2) &&
				strings.Contains(line, "relay says:") && strings.Contains(line, strconv.Itoa(n)) {
				return nil
			}
		}
		return fmt.Errorf("no ERROR line with relay=%s and its words about port %d; stderr:\n%s", relay2, n, p.Stderr)
	})

	squatter.stop() // the port frees up on relay 2
	p.expectLines(2)
	line, ok := p.waitLine(2, 30*time.Second)
	if want := "established relay address: " + net.JoinHostPort("127.0.0.2", strconv.Itoa(n)); !ok || line != want {
		t.Fatalf("second announcement %q (%v), want %q; stderr:\n%s", line, ok, want, p.Stderr)
	}
	if a := tryClient(net.JoinHostPort("127.0.0.2", strconv.Itoa(n))); a.err != nil || a.tag != 'x' {
		t.Fatalf("through relay 2: tag %q, %v", a.tag, a.err)
	}
}
