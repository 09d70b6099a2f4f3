package e2e

import (
	"bytes"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

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
