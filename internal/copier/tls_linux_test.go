package copier

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"tcprelay/internal/check"
)

// tlsEnd is a TLS conn over Records, as the relay's transport.Conn and the
// agent's tunnel.Conn are: a Link may park the direction that reads it.
type tlsEnd struct {
	*tls.Conn
	rec *Records
}

// TLSRecords: nil until the handshake is done, as for the real ones.
func (c tlsEnd) TLSRecords() *Records {
	if !c.ConnectionState().HandshakeComplete {
		return nil
	}
	return c.rec
}

var testCert = sync.OnceValue(func() tls.Certificate {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		panic(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "copier test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		panic(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
})

// tlsRelay is clientA <-> [a  Link  b] <-> peer: a is a plain socket, b a
// TLS conn over Records, and peer the TLS conn at b's other end.
type tlsRelay struct {
	clientA, a *net.TCPConn
	b          tlsEnd
	peer       *tls.Conn
	l          *Link
	res        chan Result
}

// tlsOptions set up a tlsRelay's TLS.
type tlsOptions struct {
	// agent: b is the TLS client (as an agent's data connection is), the
	// peer the server; else b is the server (as the relay's is).
	agent bool
	// peerConn wraps the peer's socket.
	peerConn func(net.Conn) net.Conn
	server   *tls.Config // the server's config, if not the default
	client   *tls.Config // the client's
}

func startTLSRelay(tb testing.TB, o tlsOptions) *tlsRelay {
	tb.Helper()
	r := &tlsRelay{res: make(chan Result, 1)}
	r.clientA, r.a = tcpPair(tb)
	bRaw, peerRaw := tcpPair(tb)
	srv := o.server
	if srv == nil {
		srv = &tls.Config{}
	}
	srv.Certificates = []tls.Certificate{testCert()}
	cli := o.client
	if cli == nil {
		cli = &tls.Config{}
	}
	cli.InsecureSkipVerify = true // the test's own certificate
	var peerSock net.Conn = peerRaw
	if o.peerConn != nil {
		peerSock = o.peerConn(peerRaw)
	}
	rec := NewRecords(bRaw)
	if o.agent {
		r.b, r.peer = tlsEnd{tls.Client(rec, cli), rec}, tls.Server(peerSock, srv)
	} else {
		r.b, r.peer = tlsEnd{tls.Server(rec, srv), rec}, tls.Client(peerSock, cli)
	}
	errs := make(chan error, 2)
	for _, c := range []*tls.Conn{r.b.Conn, r.peer} {
		go func() {
			c.SetDeadline(time.Now().Add(timeout))
			err := c.Handshake()
			c.SetDeadline(time.Time{}) // before the Link sets its own
			errs <- err
		}()
	}
	for range 2 {
		if err := <-errs; err != nil {
			tb.Fatalf("handshake: %v", err)
		}
	}
	r.l = Start(r.a, r.b, func(_ *Link, res Result) { r.res <- res })
	tb.Cleanup(func() {
		r.l.Close()
		select {
		case <-r.res:
		case <-time.After(timeout):
			tb.Error("Link did not end after Close")
		}
	})
	return r
}

// result waits for the Link's Result; call it once.
func (r *tlsRelay) result(tb testing.TB) Result {
	tb.Helper()
	select {
	case res := <-r.res:
		r.res <- res // for the cleanup
		return res
	case <-time.After(timeout):
		tb.Fatalf("Link did not end within %v", timeout)
		return Result{}
	}
}

// exchange sends msg from clientA to the peer, then back.
func (r *tlsRelay) exchange(tb testing.TB, msg []byte) {
	tb.Helper()
	buf := make([]byte, len(msg))
	for _, p := range [][2]net.Conn{{r.clientA, r.peer}, {r.peer, r.clientA}} {
		p[0].SetWriteDeadline(time.Now().Add(timeout))
		if _, err := p[0].Write(msg); err != nil {
			tb.Fatal(err)
		}
		p[1].SetReadDeadline(time.Now().Add(timeout))
		if _, err := io.ReadFull(p[1], buf); err != nil || string(buf) != string(msg) {
			tb.Fatalf("read %q, %v; want %q", buf, err, msg)
		}
	}
}

var orientations = []struct {
	name string
	o    tlsOptions
}{{"relay side (TLS server)", tlsOptions{}}, {"agent side (TLS client)", tlsOptions{agent: true}}}

// TestTLSLinkBothWays: a Link between a socket and a TLS conn over Records
// moves 4 MiB each way at once, byte for byte, with the half-close of each
// side passed on (a close_notify becomes a CloseWrite and back).
func TestTLSLinkBothWays(t *testing.T) {
	for _, or := range orientations {
		t.Run(or.name, func(t *testing.T) {
			check.Leaks(t)
			r := startTLSRelay(t, or.o)
			if ab, ba := r.l.Spliced(); ab || ba {
				t.Errorf("Spliced() = %v, %v with TLS on one side", ab, ba)
			}
			const size = 4 << 20
			fromA, fromPeer := randomBytes(size, 3), randomBytes(size, 4)
			type closeWriter interface {
				net.Conn
				CloseWrite() error
			}
			var wg sync.WaitGroup
			errs := make(chan error, 4)
			sums := make([][sha256.Size]byte, 2)
			ns := make([]int64, 2)
			send := func(c closeWriter, data []byte) {
				defer wg.Done()
				c.SetWriteDeadline(time.Now().Add(timeout))
				// In pieces of odd sizes: records of every size.
				for len(data) > 0 {
					n := min(len(data), 1+len(data)%40000)
					if _, err := c.Write(data[:n]); err != nil {
						errs <- fmt.Errorf("write: %w", err)
						return
					}
					data = data[n:]
				}
				if err := c.CloseWrite(); err != nil {
					errs <- fmt.Errorf("CloseWrite: %w", err)
				}
			}
			recv := func(c net.Conn, i int) {
				defer wg.Done()
				h := sha256.New()
				c.SetReadDeadline(time.Now().Add(timeout))
				n, err := io.Copy(h, c)
				ns[i] = n
				h.Sum(sums[i][:0])
				if err != nil {
					errs <- fmt.Errorf("read: %w", err)
				}
			}
			wg.Add(4)
			go send(r.clientA, fromA)
			go send(r.peer, fromPeer)
			go recv(r.peer, 0)
			go recv(r.clientA, 1)
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
			if ns[0] != size || sums[0] != sha256.Sum256(fromA) {
				t.Errorf("peer got %d bytes, not clientA's %d", ns[0], size)
			}
			if ns[1] != size || sums[1] != sha256.Sum256(fromPeer) {
				t.Errorf("clientA got %d bytes, not the peer's %d", ns[1], size)
			}
			if res := r.result(t); res.Err != nil || res.AToB != size || res.BToA != size {
				t.Errorf("Result = %+v, want %d each way and no Err", res, size)
			}
		})
	}
}

// TestTLSLinkResetBecomesClose: a reset on either side ends the link with
// an error and closes the other side.
func TestTLSLinkResetBecomesClose(t *testing.T) {
	for _, or := range orientations {
		t.Run(or.name, func(t *testing.T) {
			for _, side := range []string{"plain", "TLS"} {
				check.Leaks(t)
				var raw *net.TCPConn
				o := or.o
				o.peerConn = func(c net.Conn) net.Conn { raw = c.(*net.TCPConn); return c }
				r := startTLSRelay(t, o)
				r.exchange(t, []byte("before"))
				var other net.Conn = r.peer
				if side == "plain" {
					r.clientA.SetLinger(0)
					r.clientA.Close()
				} else {
					raw.SetLinger(0)
					raw.Close()
					other = r.clientA
				}
				if _, err := readAll(other); err != nil {
					t.Logf("%s reset: the other side reads %v", side, err) // a close, or a reset

				}
				if res := r.result(t); res.Err == nil {
					t.Errorf("%s reset: Result = %+v, want the reset as Err", side, res)
				}
			}
		})
	}
}

// TestIdleTLSLinksHoldNoGoroutine: links between a socket and a TLS conn
// that have moved bytes and gone quiet hold no goroutine, on either side of
// the relay (TLS server or client), and wake for bytes from either end as
// often as they come.
func TestIdleTLSLinksHoldNoGoroutine(t *testing.T) {
	check.Leaks(t)
	const n = 200
	g0 := runtime.NumGoroutine()
	relays := make([]*tlsRelay, n)
	for i := range relays {
		relays[i] = startTLSRelay(t, orientations[i%2].o)
		relays[i].exchange(t, []byte{byte(i), 'a'})
	}
	want := g0 + 1 // the poller's
	waitGoroutines(t, want, fmt.Sprintf("%d idle TLS links", n))
	for round := range 3 {
		for i, r := range relays {
			r.exchange(t, []byte{byte(i), byte(round), 'b'})
		}
		waitGoroutines(t, want, fmt.Sprintf("round %d, idle again", round))
		time.Sleep(2 * hotFor)
	}
}

// heldWrites holds back every write after the first (a TLS server's first
// flight) until released.
type heldWrites struct {
	net.Conn
	mu       sync.Mutex
	writes   int
	held     []byte
	released bool
}

func (c *heldWrites) Write(b []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.writes++
	if c.writes > 1 && !c.released {
		c.held = append(c.held, b...)
		return len(b), nil
	}
	return c.Conn.Write(b)
}

func (c *heldWrites) release() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.released = true
	_, err := c.Conn.Write(c.held)
	return err
}

// ticketCache counts the session tickets a client is given.
type ticketCache struct {
	tls.ClientSessionCache
	puts atomic.Int32
}

func (c *ticketCache) Put(key string, cs *tls.ClientSessionState) {
	c.puts.Add(1)
	c.ClientSessionCache.Put(key, cs)
}

// TestTLSSessionTicketWhileParked: a TLS 1.3 session ticket (a record with
// no application data) that comes while the direction reading the TLS
// conn is parked wakes it; it reads the ticket and parks again, holding
// nothing, and still moves bytes both ways after.
func TestTLSSessionTicketWhileParked(t *testing.T) {
	check.Leaks(t)
	g0 := runtime.NumGoroutine()
	var held *heldWrites
	cache := &ticketCache{ClientSessionCache: tls.NewLRUClientSessionCache(4)}
	r := startTLSRelay(t, tlsOptions{
		agent:    true,
		peerConn: func(c net.Conn) net.Conn { held = &heldWrites{Conn: c}; return held },
		// Asking for the client's certificate makes the server send its
		// ticket after the client's Finished: in a write of its own.
		server: &tls.Config{ClientAuth: tls.RequestClientCert, MinVersion: tls.VersionTLS13},
		client: &tls.Config{ClientSessionCache: cache},
	})
	// Only clientA to the peer: the peer's writes are held back.
	exchange1(t, r.clientA, r.peer, []byte("x"))
	waitGoroutines(t, g0+1, "an idle TLS link")
	time.Sleep(2 * hotFor) // parked cold
	if cache.puts.Load() != 0 {
		t.Fatal("the ticket came with the handshake: this test does not test a ticket while parked")
	}
	if err := held.release(); err != nil {
		t.Fatal(err)
	}
	check.Eventually(t, 5*time.Second, func() error {
		if cache.puts.Load() == 0 {
			return errors.New("the parked link did not read the session ticket")
		}
		return nil
	})
	waitGoroutines(t, g0+1, "idle again after the ticket")
	for i := range 3 {
		r.exchange(t, []byte{'y', byte(i)})
	}
	waitGoroutines(t, g0+1, "idle again after the exchange")
}

// TestTLSCloseNotifyWhileParked: a close_notify that comes while the
// direction reading the TLS conn is parked ends that direction cleanly
// (clientA reads EOF), and the other direction still flows.
func TestTLSCloseNotifyWhileParked(t *testing.T) {
	for _, or := range orientations {
		t.Run(or.name, func(t *testing.T) {
			check.Leaks(t)
			r := startTLSRelay(t, or.o)
			r.exchange(t, []byte("x"))
			time.Sleep(2 * hotFor) // parked by now
			if err := r.peer.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			if b, err := readAll(r.clientA); err != nil || len(b) != 0 {
				t.Fatalf("clientA read %q, %v; want a clean EOF", b, err)
			}
			exchange1(t, r.clientA, r.peer, []byte("still open"))
			time.Sleep(2 * hotFor) // the other direction parked too
			exchange1(t, r.clientA, r.peer, []byte("and again"))
			r.clientA.CloseWrite()
			if b, err := readAll(r.peer); err != nil || len(b) != 0 {
				t.Fatalf("peer read %q, %v; want a clean EOF", b, err)
			}
			if res := r.result(t); res.Err != nil || res.AToB != 1+10+9 || res.BToA != 1 {
				t.Fatalf("Result = %+v, want AToB=20 BToA=1 Err=nil", res)
			}
		})
	}
}

// TestCopyTLSEcho: Copy from a TLS conn over Records to itself echoes
// every byte (as ./echoserver does) and ends cleanly at close_notify.
func TestCopyTLSEcho(t *testing.T) {
	check.Leaks(t)
	for _, or := range orientations {
		bRaw, peerRaw := tcpPair(t)
		srv := &tls.Config{Certificates: []tls.Certificate{testCert()}}
		cli := &tls.Config{InsecureSkipVerify: true}
		rec := NewRecords(bRaw)
		var b tlsEnd
		var peer *tls.Conn
		if or.o.agent {
			b, peer = tlsEnd{tls.Client(rec, cli), rec}, tls.Server(peerRaw, srv)
		} else {
			b, peer = tlsEnd{tls.Server(rec, srv), rec}, tls.Client(peerRaw, cli)
		}
		hs := make(chan error, 1)
		go func() { hs <- peer.Handshake() }()
		if err := b.Handshake(); err != nil {
			t.Fatal(err)
		}
		if err := <-hs; err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() {
			_, err := Copy(b, b)
			if err == nil {
				err = b.CloseWrite()
			}
			done <- err
		}()
		msg := randomBytes(100<<10, 5)
		go func() {
			peer.SetWriteDeadline(time.Now().Add(timeout))
			peer.Write(msg)
			peer.CloseWrite()
		}()
		got, err := readAll(peer)
		if err != nil || string(got) != string(msg) {
			t.Fatalf("%s: echoed %d bytes, %v; want the %d sent", or.name, len(got), err, len(msg))
		}
		if err := <-done; err != nil {
			t.Fatalf("%s: Copy: %v", or.name, err)
		}
		b.Close()
		peer.Close()
	}
}

// TestRecordsReadAheadInALink: in a Link (nonblock), Records reads its
// socket ahead, as much as has come, yet still returns no byte past the
// end of the current record, says errNothingYet at a
// boundary only once what it read ahead is spent and the socket has
// nothing, and then holds no buffer. The stream arrives in pieces cut
// inside headers and bodies.
func TestRecordsReadAheadInALink(t *testing.T) {
	stream, ends := recordStream(40, 3, true)
	boundary := map[int]bool{0: true}
	for _, e := range ends {
		boundary[e] = true
	}
	for _, size := range []int{1, 5, 4096, 1 << 20} {
		w, sock := tcpPair(t)
		r := NewRecords(sock)
		r.nonblock.Store(true)
		sent, pos, piece := 0, 0, 0
		buf := make([]byte, size)
		var aheadSeen bool
		for pos < len(stream) {
			if pos == sent {
				if r.hn == 0 && pos > 0 {
					// At a boundary with everything read: nothing yet.
					if n, err := r.Read(buf); n != 0 || !errors.Is(err, errNothingYet) || r.ahead != nil {
						t.Fatalf("reads of %d at the boundary %d, the socket empty: %d bytes, %v, holding %v read ahead; want errNothingYet", size, pos, n, err, r.ahead != nil)
					}
				}
				// The next piece: some 5000 bytes, cut at a record's end,
				// or 7 bytes past it, inside the next record's header or
				// body.
				k := len(stream)
				for _, e := range ends {
					if e > sent+5000 {
						k = min(e+7*(piece%2), len(stream))
						break
					}
				}
				if _, err := w.Write(stream[sent:k]); err != nil {
					t.Fatal(err)
				}
				sent, piece = k, piece+1
			}
			sock.SetReadDeadline(time.Now().Add(timeout))
			n, err := r.Read(buf)
			aheadSeen = aheadSeen || r.ahead != nil
			if errors.Is(err, errNothingYet) {
				// The piece was written, but may not all have come yet.
				if !boundary[pos] || r.ahead != nil || r.hn != 0 {
					t.Fatalf("reads of %d: errNothingYet at offset %d (a boundary: %v), holding %v read ahead", size, pos, boundary[pos], r.ahead != nil)
				}
				time.Sleep(time.Millisecond)
				continue
			}
			if err != nil {
				t.Fatalf("reads of %d at offset %d: %v", size, pos, err)
			}
			if !bytes.Equal(buf[:n], stream[pos:pos+n]) {
				t.Fatalf("reads of %d: wrong bytes at offset %d", size, pos)
			}
			for o := pos + 1; o < pos+n; o++ {
				if boundary[o] {
					t.Fatalf("reads of %d: a read at %d of %d bytes crosses the end of a record at %d", size, pos, n, o)
				}
			}
			pos += n
		}
		if r.ahead != nil || r.hn != 0 {
			t.Errorf("reads of %d: at the end, %v read ahead, %d bytes into a header", size, r.ahead != nil, r.hn)
		}
		if !aheadSeen && size > 1 {
			t.Errorf("reads of %d: Records never read ahead", size)
		}
		w.Close()
		sock.Close()
	}
}

// TestIdleTLSLinksHoldNoBuffer: after 4 MiB each way through TLS links
// (read ahead and gathered writes at work), the links, once idle, hold
// neither a read-ahead buffer nor gathered writes in their Records.
func TestIdleTLSLinksHoldNoBuffer(t *testing.T) {
	for _, or := range orientations {
		t.Run(or.name, func(t *testing.T) {
			check.Leaks(t)
			r := startTLSRelay(t, or.o)
			data := randomBytes(4<<20, 5)
			done := make(chan error, 2)
			for _, p := range [][2]net.Conn{{r.clientA, r.peer}, {r.peer, r.clientA}} {
				go func() {
					p[0].SetWriteDeadline(time.Now().Add(timeout))
					_, err := p[0].Write(data)
					done <- err
				}()
				got := make([]byte, len(data))
				p[1].SetReadDeadline(time.Now().Add(timeout))
				if _, err := io.ReadFull(p[1], got); err != nil || !bytes.Equal(got, data) {
					t.Fatalf("4 MiB through the link: %v, intact: %v", err, bytes.Equal(got, data))
				}
				if err := <-done; err != nil {
					t.Fatal(err)
				}
			}
			check.Eventually(t, timeout, func() error {
				if r.l.Idle() == 0 {
					return errors.New("the link's directions are not both parked")
				}
				return nil
			})
			// Close and wait for the end: its done runs after both
			// directions' last touch of the Records.
			r.l.Close()
			r.result(t)
			if r.b.rec.ahead != nil || r.b.rec.w != nil {
				t.Errorf("an idle TLS link holds a read-ahead buffer (%v) or gathered writes (%v)", r.b.rec.ahead != nil, r.b.rec.w != nil)
			}
		})
	}
}
