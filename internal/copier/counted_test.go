//go:build linux

package copier

import (
	"io"
	"net"
	"testing"
	"time"
)

// heldWake is a Counted source whose count's wake (a read deadline in the
// past) is held up until the test has cleared the deadline after Copy
// returned, as an agent does before it waits on the connection for its
// next client: the wake of a control-connection reader that was
// descheduled between storing the count and setting the deadline.
type heldWake struct {
	*net.TCPConn
	watching chan func(int64) // WatchEnd's end, once
	held     chan struct{}    // closed when the wake reaches SetReadDeadline
	cleared  chan struct{}    // closed by the test once it cleared the deadline
	woke     chan struct{}    // closed once the held wake has set its deadline
}

func (h *heldWake) WatchEnd(end func(int64)) { h.watching <- end }
func (h *heldWake) ReadEnded()               {}
func (h *heldWake) Wrote(int64)              {}

func (h *heldWake) SetReadDeadline(t time.Time) error {
	if t.IsZero() || t.After(time.Now()) {
		return h.TCPConn.SetReadDeadline(t)
	}
	close(h.held)
	// Copy cannot return while its wake is under way (the fix): the
	// wait is bounded so that the test ends either way.
	select {
	case <-h.cleared:
	case <-time.After(time.Second):
	}
	defer close(h.woke)
	return h.TCPConn.SetReadDeadline(t)
}

// newHeldWake returns a heldWake over one end of a loopback pair, the
// other end (its peer), and a second pair to copy to.
func newHeldWake(t *testing.T) (src *heldWake, srcPeer, dstSock, dstPeer *net.TCPConn) {
	srcPeer, srcSock := tcpPair(t)
	dstSock, dstPeer = tcpPair(t)
	src = &heldWake{TCPConn: srcSock, watching: make(chan func(int64), 1),
		held: make(chan struct{}), cleared: make(chan struct{}), woke: make(chan struct{})}
	return src, srcPeer, dstSock, dstPeer
}

// countThenBytes gives the count of a 4-byte stream before its bytes,
// holding its wake, and checks that the bytes are copied all the same.
func (h *heldWake) countThenBytes(t *testing.T, srcPeer, dstPeer *net.TCPConn) {
	t.Helper()
	end := <-h.watching
	go end(4)
	<-h.held
	if _, err := srcPeer.Write([]byte("abcd")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4)
	dstPeer.SetReadDeadline(time.Now().Add(timeout))
	if _, err := io.ReadFull(dstPeer, got); err != nil || string(got) != "abcd" {
		t.Fatalf("copied %q, %v; want abcd", got, err)
	}
}

// nextReadWorks clears the deadline, as an agent does before it waits
// for its next client, lets the held wake go on, and checks that the next
// byte from the peer can still be read.
func (h *heldWake) nextReadWorks(t *testing.T, srcPeer *net.TCPConn, after string) {
	t.Helper()
	h.TCPConn.SetReadDeadline(time.Time{})
	close(h.cleared)
	<-h.woke
	if _, err := srcPeer.Write([]byte("B")); err != nil {
		t.Fatal(err)
	}
	if _, err := h.TCPConn.Read(make([]byte, 1)); err != nil {
		t.Fatalf("reading the connection after %s: %v (a late wake left a deadline in the past)", after, err)
	}
}

// TestCopyWakesNothingOnceReturned: a count's wake that comes after Copy
// has returned (it moved the stream to its count as soon as the count was
// stored) sets no deadline: the connection may by then wait for its next
// client, and a deadline in the past would end that wait. This is how an
// agent's pre-opened TLS connection, parked again, came to fail reading
// its next Bind, and the client bound to it got an empty reply.
func TestCopyWakesNothingOnceReturned(t *testing.T) {
	src, srcPeer, dstSock, dstPeer := newHeldWake(t)
	copied := make(chan error, 1)
	go func() {
		_, err := Copy(dstSock, src)
		copied <- err
	}()
	src.countThenBytes(t, srcPeer, dstPeer)
	if err := <-copied; err != nil {
		t.Fatalf("Copy: %v", err)
	}
	src.nextReadWorks(t, srcPeer, "Copy returned")
}

// Close leaves the connection open, as a Counted conn whose streams both
// ended at their counts does: it serves the next client.
func (h *heldWake) Close() error { return nil }

// TestLinkWakesNothingOnceStopped is TestCopyWakesNothingOnceReturned for
// a Link's direction (./expose at an agent, the relay's side of a reused
// data connection): the Link ends, its Counted conn is kept for the next
// client, and a late wake must not leave it a deadline in the past.
func TestLinkWakesNothingOnceStopped(t *testing.T) {
	defer func(q time.Duration) { firstQuiet = q }(firstQuiet)
	firstQuiet = timeout // the direction waits, unparked, for the count's wake
	src, srcPeer, dstSock, dstPeer := newHeldWake(t)
	ended := make(chan Result, 1)
	l := New(src, dstSock, func(_ *Link, r Result) { ended <- r })
	l.Start()
	src.countThenBytes(t, srcPeer, dstPeer)
	dstPeer.CloseWrite() // the other direction ends too
	if r := <-ended; r.Err != nil || r.AToB != 4 {
		t.Fatalf("link ended with %+v, want 4 bytes a→b and no error", r)
	}
	src.nextReadWorks(t, srcPeer, "its Link ended")
}
