package e2e

// Fault tests with the real binaries: processes killed, stopped and
// terminated mid-transfer, floods of silent connections, garbage and forged
// frames, wrong secrets. Each test logs its recovery time and the bytes
// lost, measured.

import (
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"tcprelay/internal/child"
	"tcprelay/internal/testutil"
)

// ---------------------------------------------------------------- helpers

// stream is a client of an echo tunnel that writes an endless pseudo-random
// byte stream (ChaCha8 from a random seed) and, concurrently, checks that
// what comes back is exactly that stream's prefix: any corrupted,
// reordered, duplicated or skipped byte is caught at its offset.
type stream struct {
	conn *net.TCPConn
	seed [32]byte
	pace time.Duration // between 16 KiB writes; 0: as fast as it goes

	sent atomic.Int64 // bytes the kernel accepted from the client
	recv atomic.Int64 // bytes echoed back, each checked
	bad  atomic.Int64 // 1 + offset of the first wrong byte; 0: none

	stopWrite chan struct{} // closed: stop writing and half-close
	stopOnce  sync.Once
	writeDone chan struct{}
	readDone  chan struct{}
	writeErr  error     // set before writeDone closes
	readErr   error     // set before readDone closes; nil: clean EOF
	readEnd   time.Time // set before readDone closes
}

// startStream connects to 127.0.0.1:port and starts streaming.
func startStream(t *testing.T, port int) *stream {
	t.Helper()
	c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), 2*time.Second)
	if err != nil {
		t.Fatalf("dial public port %d: %v", port, err)
	}
	return streamOn(t, c, 0)
}

// streamOn starts streaming on a connection, a 16 KiB write every pace.
func streamOn(t *testing.T, c net.Conn, pace time.Duration) *stream {
	s := &stream{conn: c.(*net.TCPConn), pace: pace, stopWrite: make(chan struct{}),
		writeDone: make(chan struct{}), readDone: make(chan struct{})}
	rand.Read(s.seed[:])
	go s.write()
	go s.read()
	t.Cleanup(func() {
		s.conn.Close()
		<-s.writeDone
		<-s.readDone
	})
	return s
}

func (s *stream) write() {
	defer close(s.writeDone)
	rng := mrand.NewChaCha8(s.seed)
	buf := make([]byte, 16<<10)
	var tick <-chan time.Time
	if s.pace > 0 {
		t := time.NewTicker(s.pace)
		defer t.Stop()
		tick = t.C
	}
	for {
		select {
		case <-s.stopWrite:
			s.writeErr = s.conn.CloseWrite()
			return
		default:
		}
		if tick != nil {
			select {
			case <-s.stopWrite:
				s.writeErr = s.conn.CloseWrite()
				return
			case <-tick:
			}
		}
		rng.Read(buf)
		n, err := s.conn.Write(buf)
		s.sent.Add(int64(n))
		if err != nil {
			s.writeErr = err
			return
		}
	}
}

func (s *stream) read() {
	defer close(s.readDone)
	rng := mrand.NewChaCha8(s.seed)
	buf := make([]byte, 32<<10)
	want := make([]byte, len(buf))
	for {
		n, err := s.conn.Read(buf)
		if n > 0 {
			rng.Read(want[:n])
			if i := firstDiff(buf[:n], want[:n]); i >= 0 {
				s.bad.Store(s.recv.Load() + int64(i) + 1)
				s.readErr = fmt.Errorf("byte %d of the echo is %#02x, want %#02x", s.recv.Load()+int64(i), buf[i], want[i])
				s.readEnd = time.Now()
				return
			}
			s.recv.Add(int64(n))
		}
		if err != nil {
			if err != io.EOF {
				s.readErr = err
			}
			s.readEnd = time.Now()
			return
		}
	}
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// waitRecv waits up to d until at least n bytes came back.
func (s *stream) waitRecv(n int64, d time.Duration) bool {
	child.WaitFor(d, func() bool { return s.recv.Load() >= n || s.ended() })
	return s.recv.Load() >= n
}

func (s *stream) ended() bool {
	select {
	case <-s.readDone:
		return true
	default:
		return false
	}
}

// waitEnd waits up to d for the echo direction to end (EOF or error).
func (s *stream) waitEnd(d time.Duration) bool {
	select {
	case <-s.readDone:
		return true
	case <-time.After(d):
		return false
	}
}

// finish stops writing, half-closes, reads the rest of the echo up to EOF
// (bounded by d), and checks that every byte sent came back exactly.
func (s *stream) finish(d time.Duration) error {
	s.stopOnce.Do(func() { close(s.stopWrite) })
	select {
	case <-s.writeDone:
	case <-time.After(d):
		return fmt.Errorf("writer still blocked %v after stop (%d bytes sent, %d back)", d, s.sent.Load(), s.recv.Load())
	}
	if !s.waitEnd(d) {
		return fmt.Errorf("no EOF %v after the half-close (%d bytes sent, %d back)", d, s.sent.Load(), s.recv.Load())
	}
	switch {
	case s.writeErr != nil:
		return fmt.Errorf("write: %v (%d bytes sent, %d back)", s.writeErr, s.sent.Load(), s.recv.Load())
	case s.readErr != nil:
		return fmt.Errorf("read: %v (%d bytes sent, %d back)", s.readErr, s.sent.Load(), s.recv.Load())
	case s.recv.Load() != s.sent.Load():
		return fmt.Errorf("EOF after %d bytes back, %d sent", s.recv.Load(), s.sent.Load())
	}
	return nil
}

// echoOnce is testutil.EchoCheck on 127.0.0.1:port.
func echoOnce(port int, data []byte, d time.Duration) error {
	return testutil.EchoCheck(child.Addr(port), data, d)
}

// mustEcho is echoOnce that fails the test.
func mustEcho(t *testing.T, what string, port int, data []byte) {
	t.Helper()
	if err := echoOnce(port, data, 20*time.Second); err != nil {
		t.Fatalf("%s: echo of %d bytes through 127.0.0.1:%d: %v", what, len(data), port, err)
	}
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// refused reports whether 127.0.0.1:port refuses a connection.
func refused(port int) bool {
	c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), 500*time.Millisecond)
	if err == nil {
		c.Close()
		return false
	}
	return errors.Is(err, syscall.ECONNREFUSED)
}

// waitRefused polls until port refuses connections, up to d, and returns
// the time since from at that moment.
func waitRefused(port int, from time.Time, d time.Duration) (time.Duration, bool) {
	ok := child.WaitFor(d, func() bool { return refused(port) })
	return time.Since(from), ok
}

// counted sums the events the log lines of s that contain every one of
// subs stand for: the relay writes a line for a flood of events at most
// once a second, with their count=N.
func counted(s string, subs ...string) int {
	n := 0
	for _, l := range linesWith(s, subs...) {
		k := 1
		if i := strings.Index(l, "count="); i >= 0 {
			fmt.Sscanf(l[i:], "count=%d", &k)
		}
		n += k
	}
	return n
}

// linesWith returns the lines of s that contain every one of subs.
func linesWith(s string, subs ...string) []string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		all := true
		for _, sub := range subs {
			all = all && strings.Contains(l, sub)
		}
		if all {
			out = append(out, l)
		}
	}
	return out
}

// attachFrame is a data connection's opening: preamble and Attach frame
// (type 0x10, 4-byte big-endian length 16, then the token).
func attachFrame(token []byte) []byte {
	b := []byte("TRLY\x02\x10")
	b = binary.BigEndian.AppendUint32(b, uint32(len(token)))
	return append(b, token...)
}

// ---------------------------------------------------------------- tests

// TestKillRelayMidTransferAndRestart SIGKILLs the relay while a client
// streams through it, checks that what the client got back is an exact
// prefix of what it sent and that its connection ends at once, restarts the
// relay on the same port, and waits for the echoserver to register again
// with the same address.
func TestKillRelayMidTransferAndRestart(t *testing.T) {
	e := newEnv(t)
	r := e.startRelay(nil)
	es, pub := e.startEcho("127.0.0.1", r.port)
	es.expectLines(2) // the first registration and the one after the restart

	s := startStream(t, pub)
	if !s.waitRecv(4<<20, 20*time.Second) {
		t.Fatalf("stream through port %d: %d bytes back within 20s, want 4 MiB before the fault (read error: %v)", pub, s.recv.Load(), s.readErr)
	}
	killAt := time.Now()
	r.kill()
	if !s.waitEnd(5 * time.Second) {
		t.Fatalf("client connection through the SIGKILLed relay still open 5s later (%d bytes sent, %d back)", s.sent.Load(), s.recv.Load())
	}
	ended := s.readEnd.Sub(killAt)
	select {
	case <-s.writeDone: // the write fails, or has failed: the socket is gone
	case <-time.After(5 * time.Second):
		t.Fatalf("client still blocked in write 5s after the relay's SIGKILL (%d bytes sent)", s.sent.Load())
	}
	if bad := s.bad.Load(); bad != 0 {
		t.Fatalf("echo corrupted before the fault: %v", s.readErr)
	}
	sent, recv := s.sent.Load(), s.recv.Load()
	t.Logf("relay SIGKILLed mid-transfer: client connection ended %v later (read: %v; write: %v)",
		ended.Round(time.Millisecond), s.readErr, s.writeErr)
	t.Logf("client sent %d bytes, got %d back, all an exact prefix of what it sent: 0 bytes lost or corrupted among echoed data; %d bytes were in flight (socket buffers of the killed relay and the echoserver) and ended with the connection",
		sent, recv, sent-recv)

	restartAt := time.Now()
	r2 := e.restartRelay(r)
	readyAt := time.Now()
	line, ok := es.waitLine(2, 10*time.Second)
	if !ok {
		t.Fatalf("echoserver printed no second announcement within 10s of the relay's restart; stdout %q; stderr:\n%s\nnew relay stderr:\n%s",
			es.Out(), es.Stderr, r2.Stderr)
	}
	announced := time.Now()
	port2, ok := child.AnnouncedPort(line, "127.0.0.1")
	if !ok || port2 != pub {
		t.Fatalf("echoserver's second announcement is %q, want %q (the same address)", line, fmt.Sprintf("established relay address: 127.0.0.1:%d", pub))
	}
	t.Logf("re-registered with the same address 127.0.0.1:%d: %v after the SIGKILL, %v after the restart began, %v after the new relay accepted",
		pub, announced.Sub(killAt).Round(time.Millisecond), announced.Sub(restartAt).Round(time.Millisecond), announced.Sub(readyAt).Round(time.Millisecond))

	mustEcho(t, "after the restart", pub, randomBytes(1<<20))
	t.Logf("1 MiB echoed byte-identical through 127.0.0.1:%d after the restart, %v after the SIGKILL", pub, time.Since(killAt).Round(time.Millisecond))
}

// TestKillAgent SIGKILLs one of two echoservers while both relay a stream:
// its public port closes at once and its client is closed; the other's
// client goes on untouched.
func TestKillAgent(t *testing.T) {
	e := newEnv(t)
	r := e.startRelayWith(nil, nil, "-heartbeat", "5s")
	a, pa := e.startEcho("127.0.0.1", r.port)
	_, pb := e.startEcho("127.0.0.1", r.port)

	sa, sb := startStream(t, pa), startStream(t, pb)
	for _, s := range []*stream{sa, sb} {
		if !s.waitRecv(2<<20, 20*time.Second) {
			t.Fatalf("stream: %d bytes back within 20s, want 2 MiB before the fault (read error: %v)", s.recv.Load(), s.readErr)
		}
	}
	killAt := time.Now()
	a.kill()
	took, ok := waitRefused(pa, killAt, 3*time.Second)
	if !ok {
		t.Fatalf("public port %d of the SIGKILLed echoserver still accepts %v later; relay stderr:\n%s", pa, took.Round(time.Millisecond), r.Stderr)
	}
	t.Logf("public port %d refuses connections %v after the SIGKILL (heartbeat 5s: the relay saw the control connection close, not a missed heartbeat)", pa, took.Round(time.Millisecond))

	if !sa.waitEnd(5 * time.Second) {
		t.Fatalf("killed agent's client connection still open 5s after the SIGKILL (%d bytes sent, %d back)", sa.sent.Load(), sa.recv.Load())
	}
	if sa.bad.Load() != 0 {
		t.Fatalf("killed agent's client: echo corrupted: %v", sa.readErr)
	}
	t.Logf("killed agent's client connection closed %v after the SIGKILL (read: %v); sent %d, got back %d, an exact prefix: 0 bytes corrupted, %d in flight ended with the agent",
		sa.readEnd.Sub(killAt).Round(time.Millisecond), sa.readErr, sa.sent.Load(), sa.recv.Load(), sa.sent.Load()-sa.recv.Load())

	// The other agent: its stream goes on and ends cleanly; a new client works.
	before := sb.recv.Load()
	if !sb.waitRecv(before+2<<20, 20*time.Second) {
		t.Fatalf("other agent's stream stalled after the kill: %d bytes back, %d before the kill (read error: %v)", sb.recv.Load(), before, sb.readErr)
	}
	if err := sb.finish(10 * time.Second); err != nil {
		t.Fatalf("other agent's stream: %v", err)
	}
	t.Logf("other agent's client: %d bytes sent and echoed, 0 lost", sb.sent.Load())
	mustEcho(t, "other agent after the kill", pb, randomBytes(256<<10))
}

// TestStoppedAgent SIGSTOPs an echoserver: the relay drops it after three
// silent heartbeats and closes its port, other agents unaffected; after
// SIGCONT it registers again, and its relayed connection, which the relay
// keeps, resumes without loss.
func TestStoppedAgent(t *testing.T) {
	e := newEnv(t)
	r := e.startRelayWith(nil, nil, "-heartbeat", "500ms")
	a, pa := e.startEcho("127.0.0.1", r.port)
	// Registered after a's own stop cleanup: runs before it, whatever happens.
	t.Cleanup(func() { a.Cmd.Process.Signal(syscall.SIGCONT) })
	_, pb := e.startEcho("127.0.0.1", r.port)

	sa := startStream(t, pa)
	if !sa.waitRecv(1<<20, 20*time.Second) {
		t.Fatalf("stream: %d bytes back within 20s, want 1 MiB before the fault (read error: %v)", sa.recv.Load(), sa.readErr)
	}
	stopAt := time.Now()
	a.signal(syscall.SIGSTOP)
	a.expectLines(2)
	took, ok := waitRefused(pa, stopAt, 5*time.Second)
	if !ok {
		t.Fatalf("public port %d of the SIGSTOPped echoserver still accepts %v later, want closed after 3 heartbeats of 500ms; relay stderr:\n%s",
			pa, took.Round(time.Millisecond), r.Stderr)
	}
	t.Logf("public port %d refuses connections %v after SIGSTOP (3 heartbeats = 1.5s)", pa, took.Round(time.Millisecond))
	mustEcho(t, "other agent while one is stopped", pb, randomBytes(256<<10))

	contAt := time.Now()
	a.signal(syscall.SIGCONT)
	line, ok := a.waitLine(2, 10*time.Second)
	if !ok {
		t.Fatalf("echoserver printed no second announcement within 10s of SIGCONT; stdout %q; stderr:\n%s", a.Out(), a.Stderr)
	}
	pa2, ok := child.AnnouncedPort(line, "127.0.0.1")
	if !ok {
		t.Fatalf("echoserver's second line %q is not an announcement", line)
	}
	t.Logf("re-registered %v after SIGCONT (%v after SIGSTOP): %q (same port: %v)",
		time.Since(contAt).Round(time.Millisecond), time.Since(stopAt).Round(time.Millisecond), line, pa2 == pa)
	mustEcho(t, "stopped agent after SIGCONT, new address", pa2, randomBytes(1<<20))

	// The relayed connection outlived the session: it resumes and ends clean.
	before := sa.recv.Load()
	if !sa.waitRecv(before+1<<20, 10*time.Second) {
		t.Fatalf("stream through the stopped agent did not resume after SIGCONT: %d bytes back, %d at SIGCONT (read error: %v)", sa.recv.Load(), before, sa.readErr)
	}
	if err := sa.finish(10 * time.Second); err != nil {
		out, _ := exec.Command("ss", "-tnoiH", "state", "all").Output()
		var socks []string
		for _, l := range strings.Split(string(out), "\n") {
			if strings.Contains(l, fmt.Sprintf(":%d ", r.port)) || strings.Contains(l, fmt.Sprintf(":%d ", pa)) {
				socks = append(socks, l)
			}
		}
		t.Fatalf("stream through the stopped agent: %v\nrelay's last lines:\n%s\nstopped agent's stderr:\n%s\nits sockets:\n%s",
			err, lastLines(r.Stderr.String(), 30), lastLines(a.Stderr.String(), 30), strings.Join(socks, "\n"))
	}
	t.Logf("stream relayed across the stop: %d bytes sent and echoed, 0 lost", sa.sent.Load())
	mustEcho(t, "other agent at the end", pb, randomBytes(64<<10))
}

// TestSilentConnectionFlood opens 1,000 connections to the control port
// that send nothing, from 20 addresses, each within its share of the
// handshake budget: an agent still registers and echoes meanwhile, and the
// relay closes all of them at its handshake timeout, with a few log lines
// whose counts add up to them.
func TestSilentConnectionFlood(t *testing.T) {
	const flood, handshake, slack = 1000, 2 * time.Second, 2 * time.Second
	fdHeadroom(t, flood+200)

	e := newEnv(t)
	// -max-fds 20000: 2,000 handshakes at a time, 62 per source address.
	r := e.startRelayWith(nil, nil, "-handshake-timeout", handshake.String(), "-max-fds", "20000")
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(r.port))

	type silent struct {
		conn             net.Conn
		dialed, closedAt time.Time
		n                int
		err              error
	}
	conns := make([]*silent, flood)
	var wg sync.WaitGroup
	t.Cleanup(func() {
		for _, c := range conns {
			if c != nil {
				c.conn.Close()
			}
		}
		wg.Wait()
	})
	var closed atomic.Int64
	floodStart := time.Now()
	for i := range conns {
		d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 1, byte(1+i%20))}}
		// Timed from before the dial: the relay cannot start its clock
		// earlier, however late this goroutine runs after the connect.
		dialing := time.Now()
		c, err := d.Dial("tcp", addr)
		if err != nil {
			t.Fatalf("flood connection %d: %v", i, err)
		}
		s := &silent{conn: c, dialed: dialing}
		conns[i] = s
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.SetReadDeadline(s.dialed.Add(handshake + slack + time.Second))
			s.n, s.err = c.Read(make([]byte, 1))
			s.closedAt = time.Now()
			closed.Add(1)
		}()
	}
	floodEnd := time.Now()
	t.Logf("%d silent connections open in %v", flood, floodEnd.Sub(floodStart).Round(time.Millisecond))

	_, pub := e.startEcho("127.0.0.1", r.port)
	mustEcho(t, "agent registered during the flood", pub, randomBytes(256<<10))
	echoed := time.Since(floodEnd)
	if n := closed.Load(); n != 0 {
		t.Errorf("%d of the %d silent connections were already closed when the agent had registered and echoed (%v after the flood), before the %v handshake timeout",
			n, flood, echoed.Round(time.Millisecond), handshake)
	}
	t.Logf("echoserver registered and echoed 256 KiB %v after the flood, with all %d silent connections open", echoed.Round(time.Millisecond), flood)

	wg.Wait() // every reader ends: closed by the relay or at its own deadline
	var held, early, data int
	var first, last time.Duration
	for i, s := range conns {
		life := s.closedAt.Sub(s.dialed)
		var ne net.Error
		switch {
		case s.n > 0:
			data++
		case errors.As(s.err, &ne) && ne.Timeout():
			held++
		case life < handshake-100*time.Millisecond:
			early++
		}
		if i == 0 || life < first {
			first = life
		}
		last = max(last, life)
	}
	lastClose := slices.MaxFunc(conns, func(a, b *silent) int { return a.closedAt.Compare(b.closedAt) }).closedAt
	if held+early+data > 0 {
		t.Errorf("of %d silent connections: %d still open %v after their dial, %d closed before the %v handshake timeout, %d received bytes",
			flood, held, handshake+slack+time.Second, early, handshake, data)
	}
	if last > handshake+slack {
		t.Errorf("the last silent connection was closed %v after its dial, want within the %v handshake timeout plus %v", last.Round(time.Millisecond), handshake, slack)
	}
	t.Logf("relay closed all %d silent connections %v-%v after their dial (handshake timeout %v), the last %v after the flood ended",
		flood, first.Round(time.Millisecond), last.Round(time.Millisecond), handshake, lastClose.Sub(floodEnd).Round(time.Millisecond))
	var drops []string
	count := 0
	if !child.WaitFor(5*time.Second, func() bool {
		drops = linesWith(r.Stderr.String(), "dropped connection on control port: no preamble")
		count = counted(r.Stderr.String(), "dropped connection on control port: no preamble")
		return count >= flood
	}) {
		t.Errorf("relay's \"no preamble\" lines count %d drops, want %d (one per silent connection)", count, flood)
	}
	t.Logf("relay logged the %d drops in %d lines", count, len(drops))
	mustEcho(t, "agent after the flood", pub, randomBytes(64<<10))
}

// TestGarbageOnPublicPort sends bytes of every kind through a public port:
// they are relayed verbatim, never interpreted, even the relay's own frames.
func TestGarbageOnPublicPort(t *testing.T) {
	e := newEnv(t)
	r := e.startRelay(nil)
	_, pub := e.startEcho("127.0.0.1", r.port)

	hello := []byte("TRLY\x02\x01\x00\x00\x00\x0e\x00\x04evil\x00\x00\x00\x00\x00\x00\x00\x01") // a forged Hello frame
	payloads := []struct {
		name string
		data []byte
	}{
		{"HTTP request", []byte("GET / HTTP/1.1\r\nHost: example.com\r\nUser-Agent: e2e\r\nConnection: close\r\n\r\n")},
		{"TLS ClientHello", clientHello(t)},
		{"relay magic + forged Attach", attachFrame(randomBytes(16))},
		{"relay magic + forged Hello", hello},
		{"64 KiB random", randomBytes(64 << 10)},
	}
	var all []byte
	for _, p := range payloads {
		mustEcho(t, p.name, pub, p.data)
		t.Logf("%s (%d bytes, starting %q) came back byte-identical", p.name, len(p.data), p.data[:min(12, len(p.data))])
		all = append(all, p.data...)
	}
	mustEcho(t, "all of them on one connection", pub, all)
	t.Logf("all %d bytes on one connection came back byte-identical: 0 bytes lost or altered", len(all))
	if d := linesWith(r.Stderr.String(), "dropped connection", "token"); len(d) > 0 {
		t.Errorf("relay interpreted public-port bytes as a frame:\n%s", strings.Join(d, "\n"))
	}
}

// clientHello returns the first record a Go TLS client sends: a ClientHello.
func clientHello(t *testing.T) []byte {
	t.Helper()
	c1, c2 := net.Pipe()
	defer c1.Close()
	defer c2.Close()
	go tls.Client(c1, &tls.Config{ServerName: "example.com"}).Handshake() // fails when c1 closes
	c2.SetReadDeadline(time.Now().Add(5 * time.Second))
	hdr := make([]byte, 5)
	if _, err := io.ReadFull(c2, hdr); err != nil {
		t.Fatalf("capture ClientHello: %v", err)
	}
	body := make([]byte, binary.BigEndian.Uint16(hdr[3:]))
	if _, err := io.ReadFull(c2, body); err != nil {
		t.Fatalf("capture ClientHello: %v", err)
	}
	if hdr[0] != 0x16 || body[0] != 0x01 {
		t.Fatalf("captured record % x... is not a ClientHello", hdr)
	}
	return append(hdr, body...)
}

// TestSecrets checks who the relay lets in: wrong or missing secrets are
// refused (the agent exits non-zero, announces nothing, the relay logs it),
// the right one works from the environment and from -secret, and a relay
// without a secret warns that it is open.
func TestSecrets(t *testing.T) {
	e := newEnv(t)
	secretEnv := []string{"RELAY_SECRET=s3cret"}
	r := e.startRelayWith(nil, secretEnv)
	rp := strconv.Itoa(r.port)

	for _, c := range []struct {
		name  string
		env   []string
		flags []string
	}{
		{"no secret", nil, nil},
		{"wrong secret in RELAY_SECRET", []string{"RELAY_SECRET=wrong"}, nil},
		{"wrong -secret flag", nil, []string{"-secret", "wrong"}},
		{"wrong -secret flag over the right RELAY_SECRET", secretEnv, []string{"-secret", "S3CRET"}},
	} {
		start := time.Now()
		p := e.start(echoBin, append(append([]string(nil), c.flags...), "127.0.0.1", rp), procOpts{env: c.env})
		p.mustExit(5 * time.Second)
		took := time.Since(start)
		switch {
		case p.ExitCode() <= 0:
			t.Errorf("%s: %s: %s, want a non-zero exit status", c.name, p, p.Status())
		case !strings.Contains(p.Stderr.String(), "authentication failed"):
			t.Errorf("%s: %s: stderr lacks \"authentication failed\":\n%s", c.name, p, p.Stderr)
		case p.Out() != "":
			t.Errorf("%s: %s printed on stdout: %q, want nothing", c.name, p, p.Out())
		case took > 3*time.Second:
			t.Errorf("%s: %s took %v to give up, want < 3s", c.name, p, took.Round(time.Millisecond))
		}
		t.Logf("%s: %s in %v; stderr: %q", c.name, p.Status(), took.Round(time.Millisecond), strings.TrimSpace(p.Stderr.String()))
	}
	var refusals []string
	if !child.WaitFor(5*time.Second, func() bool {
		refusals = linesWith(r.Stderr.String(), "agent handshake failed", "authentication failed")
		return counted(r.Stderr.String(), "agent handshake failed", "authentication failed") >= 4
	}) || counted(r.Stderr.String(), "agent handshake failed", "authentication failed") != 4 {
		t.Errorf("relay logged %d refusals, want 4; stderr:\n%s", counted(r.Stderr.String(), "agent handshake failed", "authentication failed"), r.Stderr)
	} else {
		t.Logf("relay logged:\n%s", strings.Join(refusals, "\n"))
	}

	_, p1 := e.startEchoWith("127.0.0.1", r.port, secretEnv)
	mustEcho(t, "right secret in RELAY_SECRET", p1, randomBytes(64<<10))
	_, p2 := e.startEchoWith("127.0.0.1", r.port, nil, "-secret", "s3cret")
	mustEcho(t, "right -secret flag", p2, randomBytes(64<<10))
	if s := r.Stderr.String(); strings.Contains(s, "OPEN relay") {
		t.Errorf("relay with RELAY_SECRET set warns of an open relay:\n%s", s)
	}

	open := e.startRelay(nil)
	if !child.WaitFor(5*time.Second, func() bool { return strings.Contains(open.Stderr.String(), "OPEN relay") }) {
		t.Errorf("relay without a secret logged no warning containing \"OPEN relay\"; stderr:\n%s", open.Stderr)
	} else {
		t.Logf("open relay warns: %s", linesWith(open.Stderr.String(), "OPEN relay")[0])
	}
}

// TestHijackWithGuessedTokens opens 500 forged data connections with random
// tokens to the control port while 20 real clients keep connecting through
// the relay: every forged one is closed without a byte, and no real client
// sees a byte it did not send.
func TestHijackWithGuessedTokens(t *testing.T) {
	const forged, forgers, clients = 500, 25, 20
	e := newEnv(t)
	r := e.startRelayWith(nil, nil, "-pickup-timeout", "5s")
	_, pub := e.startEcho("127.0.0.1", r.port)
	ctl := net.JoinHostPort("127.0.0.1", strconv.Itoa(r.port))

	var (
		mu       sync.Mutex
		failures []string
	)
	fail := func(format string, args ...any) {
		mu.Lock()
		failures = append(failures, fmt.Sprintf(format, args...))
		mu.Unlock()
	}

	done := make(chan struct{})
	var rounds atomic.Int64
	var cwg sync.WaitGroup
	for i := range clients {
		cwg.Add(1)
		go func() {
			defer cwg.Done()
			for n := 0; ; n++ {
				if err := echoOnce(pub, randomBytes(32<<10+mrand.IntN(32<<10)), 20*time.Second); err != nil {
					fail("real client %d, round %d: %v", i, n, err)
					return
				}
				rounds.Add(1)
				select {
				case <-done:
					return
				default:
				}
			}
		}()
	}

	var slowest atomic.Int64
	var fwg sync.WaitGroup
	start := time.Now()
	for w := range forgers {
		fwg.Add(1)
		go func() {
			defer fwg.Done()
			for i := range forged / forgers {
				c, err := net.DialTimeout("tcp", ctl, 5*time.Second)
				if err != nil {
					fail("forger %d/%d: dial: %v", w, i, err)
					continue
				}
				sentAt := time.Now()
				c.Write(append(attachFrame(randomBytes(16)), "HIJACK: bytes a hijacker would inject"...))
				c.SetReadDeadline(time.Now().Add(5 * time.Second))
				n, err := io.Copy(io.Discard, c) // nil at EOF
				took := time.Since(sentAt)
				c.Close()
				var ne net.Error
				switch {
				case n > 0:
					fail("forged connection %d/%d received %d bytes", w, i, n)
				case errors.As(err, &ne) && ne.Timeout():
					fail("forged connection %d/%d still open 5s after its Attach", w, i)
				case err != nil && !errors.Is(err, syscall.ECONNRESET):
					fail("forged connection %d/%d: %v", w, i, err)
				}
				for {
					old := slowest.Load()
					if int64(took) <= old || slowest.CompareAndSwap(old, int64(took)) {
						break
					}
				}
			}
		}()
	}
	fwg.Wait()
	forgedIn := time.Since(start)
	close(done)
	cwg.Wait()

	for _, f := range failures {
		t.Error(f)
	}
	t.Logf("%d forged Attach connections closed without a byte in %v (slowest close %v after its frame); %d real echo connections (32-64 KiB each) meanwhile, all byte-identical: 0 bytes lost or injected",
		forged, forgedIn.Round(time.Millisecond), time.Duration(slowest.Load()).Round(time.Millisecond), rounds.Load())
	var drops int
	if !child.WaitFor(5*time.Second, func() bool {
		drops = counted(r.Stderr.String(), "unknown, used or expired token")
		return drops >= forged
	}) || drops != forged {
		t.Errorf("relay's log counts %d \"unknown, used or expired token\" drops, want %d", drops, forged)
	}
	mustEcho(t, "after the forgeries", pub, randomBytes(1<<20))
}

// TestGracefulShutdown sends SIGTERM to the relay, then to an echoserver,
// each with a client mid-conversation: the public port is refused at once,
// the live client finishes its exchange and half-close, and the process
// exits 0 right after, well before its drain deadline.
func TestGracefulShutdown(t *testing.T) {
	const drain = 5 * time.Second
	e := newEnv(t)

	converse := func(c net.Conn, msg string) error {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(c, msg); err != nil {
			return err
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(c, got); err != nil {
			return err
		}
		if string(got) != msg {
			return fmt.Errorf("echoed %q, want %q", got, msg)
		}
		return nil
	}
	// shutdown runs one scenario: victim gets SIGTERM while a client of pub
	// is mid-conversation.
	shutdown := func(name string, victim *proc, pub int) {
		t.Helper()
		c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(pub)), 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		sent := 0
		for i := range 3 {
			msg := fmt.Sprintf("before SIGTERM %d\n", i)
			if err := converse(c, msg); err != nil {
				t.Fatalf("%s: before SIGTERM: %v", name, err)
			}
			sent += len(msg)
		}

		termAt := time.Now()
		victim.sigterm()
		took, ok := waitRefused(pub, termAt, 3*time.Second)
		if !ok {
			t.Fatalf("%s: public port %d still accepts %v after SIGTERM", name, pub, took.Round(time.Millisecond))
		}
		t.Logf("%s: public port %d refuses new connections %v after SIGTERM", name, pub, took.Round(time.Millisecond))

		for i := range 3 {
			msg := fmt.Sprintf("after SIGTERM %d: %s\n", i, strings.Repeat("x", 1000*i))
			if err := converse(c, msg); err != nil {
				t.Fatalf("%s: live client after SIGTERM: %v; stderr:\n%s", name, err, victim.Stderr)
			}
			sent += len(msg)
		}
		if victim.Exited() {
			t.Fatalf("%s: %s exited (%s) while its client was still talking", name, victim, victim.Status())
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if err := c.(*net.TCPConn).CloseWrite(); err != nil {
			t.Fatalf("%s: half-close: %v", name, err)
		}
		rest, err := io.ReadAll(c)
		if err != nil || len(rest) != 0 {
			t.Fatalf("%s: after the half-close read %q, %v; want EOF", name, rest, err)
		}
		finished := time.Now()
		c.Close()
		if !victim.Wait(drain) {
			t.Fatalf("%s: %s still running %v after its last client finished (drain deadline %v); stderr:\n%s",
				name, victim, time.Since(finished).Round(time.Millisecond), drain, victim.Stderr)
		}
		exited := time.Now()
		if victim.ExitCode() != 0 {
			t.Errorf("%s: %s: %s after SIGTERM, want exit status 0; stderr:\n%s", name, victim, victim.Status(), victim.Stderr)
		}
		if s := victim.Stderr.String(); strings.Contains(s, "drain deadline reached") || strings.Contains(s, "panic") {
			t.Errorf("%s: %s hit its drain deadline or panicked; stderr:\n%s", name, victim, s)
		}
		if d := exited.Sub(termAt); d > drain-2*time.Second {
			t.Errorf("%s: exited %v after SIGTERM, want well before the %v drain deadline", name, d.Round(time.Millisecond), drain)
		}
		t.Logf("%s: live client exchanged and half-closed, %d bytes each way, 0 lost; %s %v after it finished, %v after SIGTERM",
			name, sent, victim.Status(), exited.Sub(finished).Round(time.Millisecond), exited.Sub(termAt).Round(time.Millisecond))
	}

	r := e.startRelayWith(nil, nil, "-drain-timeout", drain.String())
	_, pub := e.startEcho("127.0.0.1", r.port)
	shutdown("relay", r.proc, pub)

	r2 := e.startRelay(nil)
	es, pub2 := e.startEchoWith("127.0.0.1", r2.port, nil, "-drain-timeout", drain.String())
	shutdown("echoserver", es, pub2)
}
