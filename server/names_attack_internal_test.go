//go:build linux

package server

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"math/big"
	"net"
	"testing"
	"time"

	"tcprelay/internal/proto"
	"tcprelay/internal/transport"
)

// sharedPortPair returns the two ends of a data connection that an agent
// opened on the shared TLS port, as the relay holds it: the socket,
// wrapped by the shared port's handoff (replayed, with the ClientHello it
// read), under the control listener's TLS (transport.Listen), and the
// agent's TLS end.
func sharedPortPair(t *testing.T) (relaySide, agentSide net.Conn) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	raw, agent := tcpPair(t)
	h := &handoff{conns: make(chan net.Conn, 1), done: make(chan struct{}), addr: raw.LocalAddr()}
	h.conns <- &replayed{Conn: raw} // its ClientHello already replayed: head is empty
	tln := transport.Listen(h, &tls.Config{Certificates: []tls.Certificate{cert}})
	rc, err := tln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	ac := tls.Client(agent, &tls.Config{InsecureSkipVerify: true}) // the test's own certificate
	errc := make(chan error, 1)
	go func() {
		rc.SetDeadline(time.Now().Add(5 * time.Second))
		_, err := readFull(rc, make([]byte, proto.PreambleLen)) // the handshake, and the agent's preamble
		rc.SetDeadline(time.Time{})
		errc <- err
	}()
	ac.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := ac.Write(proto.Preamble()); err != nil { // what an agent sends first
		t.Fatal(err)
	}
	ac.SetDeadline(time.Time{})
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rc.Close(); ac.Close() })
	return rc, ac
}

// TestIdleSeesDeadParkedConnsOnSharedPort: TestIdleSeesDeadParkedConns for
// a data connection that came in on the shared TLS port. idle() cannot
// reach the socket under the handoff's replayed wrapper (it has no
// NetConn), so it takes every such parked connection for idle, dead or not,
// and the relay binds clients to parked connections whose agent (or a NAT
// on the way) closed them. It failed before the fix.
func TestIdleSeesDeadParkedConnsOnSharedPort(t *testing.T) {
	r, a := sharedPortPair(t)
	if !idle(r) {
		t.Fatal("an open, silent parked connection was taken for dead")
	}
	a.Close()
	deadline := time.Now().Add(3 * time.Second)
	for idle(r) {
		if time.Now().After(deadline) {
			t.Fatal("a parked connection of the shared port whose agent closed it is still taken for idle after 3s")
		}
		time.Sleep(time.Millisecond)
	}
}

// TestQueuedSeesSharedPortDataConns: the watch of stalled links' kernel
// memory (queued) and the handshake eviction's view of what a peer sent
// (received) read the socket under a conn. Under the shared port's
// handoff they read nothing: a stalled link whose data connection came in
// on 443 is counted at half its memory at most, and an agent's handshake
// on 443 always looks silent, the first to be evicted. It failed before the fix.
func TestQueuedSeesSharedPortDataConns(t *testing.T) {
	r, a := sharedPortPair(t)
	a.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := a.Write(make([]byte, 64<<10)); err != nil { // never read by r
		t.Fatal(err)
	}
	deadline := time.Now().Add(3 * time.Second)
	for queued(r) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("64 KiB unread in a shared-port data connection's socket: queued() still says 0 after 3s")
		}
		time.Sleep(time.Millisecond)
	}
	if n, _, ok := received(r); !ok || n == 0 {
		t.Errorf("received() = %d, ok %v: want the bytes the agent sent", n, ok)
	}
}
