package e2e

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/child"
	"tcprelay/internal/proto"
	"tcprelay/internal/testutil"
)

// handshakeCutter stands in front of a relay and kills the first n
// connections in the middle of their handshake, each in the next of three
// ways (closed after the agent's Hello, reset after it, closed after the
// relay's Challenge and the agent's Auth), as a relay that evicts
// handshakes under a flood does. It forwards the others to the relay.
type handshakeCutter struct {
	port int
	seen atomic.Int32
	mu   sync.Mutex
	open []net.Conn
}

func newHandshakeCutter(t *testing.T, relayPort, n int) *handshakeCutter {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	relayAddr := net.JoinHostPort("127.0.0.1", strconv.Itoa(relayPort))
	h := &handshakeCutter{port: ln.Addr().(*net.TCPAddr).Port}
	testutil.Serve(t, ln, func(a net.Conn) {
		i := int(h.seen.Add(1))
		b, err := net.Dial("tcp", relayAddr)
		if err != nil {
			return
		}
		defer b.Close()
		h.mu.Lock()
		h.open = append(h.open, a, b)
		h.mu.Unlock()
		if i <= n {
			cutHandshake(a, b, i%3)
			return
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			io.Copy(b, a)
			b.(*net.TCPConn).CloseWrite()
		}()
		io.Copy(a, b)
		a.(*net.TCPConn).CloseWrite()
		<-done
	})
	t.Cleanup(func() { // before Serve's own, which waits for the handlers
		h.mu.Lock()
		defer h.mu.Unlock()
		for _, c := range h.open {
			c.Close()
		}
	})
	return h
}

// cutHandshake passes the agent's Hello to the relay, then kills the
// handshake: way 1 closes, way 2 resets, way 0 passes the relay's
// Challenge back and closes after the agent's Auth.
func cutHandshake(agent, relay net.Conn, way int) {
	var hello bytes.Buffer
	pre := make([]byte, proto.PreambleLen)
	if _, err := io.ReadFull(agent, pre); err != nil {
		return
	}
	hello.Write(pre)
	if _, err := proto.ReadMessage(io.TeeReader(agent, &hello), proto.MaxPreAuthPayload); err != nil {
		return
	}
	switch way {
	case 1:
		return
	case 2:
		agent.(*net.TCPConn).SetLinger(0)
		return
	}
	relay.Write(hello.Bytes())
	var challenge bytes.Buffer
	if _, err := proto.ReadMessage(io.TeeReader(relay, &challenge), proto.MaxPreAuthPayload); err != nil {
		return
	}
	agent.Write(challenge.Bytes())
	proto.ReadMessage(agent, proto.MaxPreAuthPayload) // the Auth
}

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
		const n = 3
		cut := newHandshakeCutter(t, r.port, n)
		args := append([]string{"127.0.0.1", strconv.Itoa(cut.port)}, agent.tail...)
		p, port := e.startAgent(agent.bin, args, "127.0.0.1")
		if got := int(cut.seen.Load()); got <= n {
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
	for attempt := 0; r2 == nil && attempt < 5; attempt++ {
		r2 = e.tryRelay("127.0.0.2", freePort(t), nil, nil)
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
