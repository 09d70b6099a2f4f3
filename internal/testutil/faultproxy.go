package testutil

import (
	"io"
	"net"
	"sync"
	"testing"
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
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &FaultProxy{ln: ln, target: target}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	return p
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
	p.mu.Unlock()
	p.wg.Wait()
}
