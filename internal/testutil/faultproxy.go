package testutil

import (
	"bytes"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"tcprelay/internal/proto"
)

// FaultProxy forwards TCP connections to a target and can cut or freeze any
// one of them, to play a pulled cable or a frozen peer between an agent and
// the relay. Connections are numbered in the order they were accepted.
type FaultProxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	links  []*faultLink
	closed bool
	wg     sync.WaitGroup

	// The first cutFirst connections go to cut instead (see
	// NewCuttingProxy); held are those it has not closed yet.
	cutFirst int
	cut      func(i int, agent net.Conn, target string)
	held     []net.Conn
	seen     int
}

type faultLink struct {
	a, b   net.Conn
	frozen chan struct{} // closed by Freeze
	once   sync.Once
}

// NewFaultProxy listens on 127.0.0.1:0 and forwards to target until the test
// ends.
func NewFaultProxy(t testing.TB, target string) *FaultProxy {
	t.Helper()
	return NewCuttingProxy(t, target, 0, nil)
}

// NewCuttingProxy is a FaultProxy that hands each of its first n
// connections to cut (i counts them from 0) instead of forwarding it: cut
// plays the relay's side of it, and the connection is closed when cut
// returns, or when the test ends.
func NewCuttingProxy(t testing.TB, target string, n int, cut func(i int, agent net.Conn, target string)) *FaultProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &FaultProxy{ln: ln, target: target, cutFirst: n, cut: cut}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

// Seen is the number of connections accepted so far, cut or forwarded.
func (p *FaultProxy) Seen() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.seen
}

// Addr is the proxy's address, to give to agents instead of the relay's.
func (p *FaultProxy) Addr() string { return p.ln.Addr().String() }

func (p *FaultProxy) accept() {
	defer p.wg.Done()
	for {
		a, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		i := p.seen
		p.seen++
		if i < p.cutFirst && !p.closed {
			p.held = append(p.held, a)
			p.wg.Add(1)
			go func() {
				defer p.wg.Done()
				defer a.Close()
				p.cut(i, a, p.target)
			}()
			p.mu.Unlock()
			continue
		}
		p.mu.Unlock()
		b, err := net.Dial("tcp", p.target)
		if err != nil {
			a.Close()
			continue
		}
		l := &faultLink{a: a, b: b, frozen: make(chan struct{})}
		p.mu.Lock()
		if p.closed {
			// close ran while this one was being dialed.
			p.mu.Unlock()
			l.cut()
			return
		}
		p.links = append(p.links, l)
		p.mu.Unlock()
		p.wg.Add(2)
		go func() { defer p.wg.Done(); l.pump(a, b) }()
		go func() { defer p.wg.Done(); l.pump(b, a) }()
	}
}

// pump copies src to dst until an error, or holds still once frozen.
func (l *faultLink) pump(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		select {
		case <-l.frozen:
			return // the bytes in buf are never delivered
		default:
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				l.cut()
				return
			}
		}
		if err != nil {
			if tc, ok := dst.(*net.TCPConn); ok && err == io.EOF {
				tc.CloseWrite()
				return
			}
			l.cut()
			return
		}
	}
}

func (l *faultLink) cut() {
	l.a.Close()
	l.b.Close()
}

func (p *FaultProxy) link(t testing.TB, i int) *faultLink {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	if i >= len(p.links) {
		t.Fatalf("fault proxy has %d connections, no #%d", len(p.links), i)
	}
	return p.links[i]
}

// Conns is the number of connections accepted so far.
func (p *FaultProxy) Conns() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.links)
}

// Cut closes connection i on both sides at once, like a reset.
func (p *FaultProxy) Cut(t testing.TB, i int) {
	p.link(t, i).cut()
}

// Freeze stops forwarding on connection i in both directions while keeping
// both sockets open: the peers see silence, as with a frozen process or a
// pulled cable.
func (p *FaultProxy) Freeze(t testing.TB, i int) {
	l := p.link(t, i)
	l.once.Do(func() { close(l.frozen) })
}

func (p *FaultProxy) close() {
	p.ln.Close()
	p.mu.Lock()
	p.closed = true
	for _, l := range p.links {
		l.cut()
	}
	for _, c := range p.held {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// HandshakeCut is a way a handshake dies on the relay's side, as when a
// relay under a flood evicts it, played by a cutting proxy in front of
// the relay at target.
type HandshakeCut struct {
	Name string
	Cut  func(agent net.Conn, target string)
}

// HandshakeCuts are the ways a handshake dies: closed or reset after the
// agent's Hello, closed after a real relay's Challenge and the agent's
// Auth, or silent after the Hello.
var HandshakeCuts = []HandshakeCut{
	{"closed after the hello", func(agent net.Conn, _ string) {
		readHello(agent, io.Discard)
	}},
	{"reset after the hello", func(agent net.Conn, _ string) {
		readHello(agent, io.Discard)
		agent.(*net.TCPConn).SetLinger(0)
	}},
	{"closed after the challenge", func(agent net.Conn, target string) {
		var hello bytes.Buffer
		if readHello(agent, &hello) != nil {
			return
		}
		r, err := net.Dial("tcp", target)
		if err != nil {
			return
		}
		defer r.Close()
		r.SetDeadline(time.Now().Add(5 * time.Second))
		var ch bytes.Buffer
		if _, err := r.Write(hello.Bytes()); err != nil {
			return
		}
		if _, err := proto.ReadMessage(io.TeeReader(r, &ch), proto.MaxPreAuthPayload); err != nil {
			return
		}
		agent.Write(ch.Bytes())
		proto.ReadMessage(agent, proto.MaxPreAuthPayload) // the Auth
	}},
	{"silent after the hello", func(agent net.Conn, _ string) {
		readHello(agent, io.Discard)
		agent.SetReadDeadline(time.Time{})
		io.Copy(io.Discard, agent) // until the agent gives up on it
	}},
}

// readHello reads the agent's preamble and Hello, copying them to tee.
func readHello(agent net.Conn, tee io.Writer) error {
	agent.SetReadDeadline(time.Now().Add(5 * time.Second))
	pre := make([]byte, proto.PreambleLen)
	if _, err := io.ReadFull(agent, pre); err != nil {
		return err
	}
	tee.Write(pre)
	_, err := proto.ReadMessage(io.TeeReader(agent, tee), proto.MaxPreAuthPayload)
	return err
}
