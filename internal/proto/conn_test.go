package proto

import (
	"errors"
	"net"
	"os"
	"testing"
	"time"

	"tcprelay/internal/check"
)

// TestConnServe: Serve answers pings, skips pongs and unknown frame types,
// hands every other message to its handler, and ends with the handler's
// error or a malformed frame's.
func TestConnServe(t *testing.T) {
	check.Leaks(t)
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	c := NewConn(a, 5*time.Second, DefaultMaxPayload)
	peer := NewConn(b, 5*time.Second, DefaultMaxPayload)
	b.SetDeadline(time.Now().Add(10 * time.Second))

	stop := errors.New("stop")
	got := make(chan Message, 4)
	res := make(chan error, 1)
	go func() {
		res <- c.Serve(0, func(m Message) error {
			got <- m
			if _, ok := m.(*GoAway); ok {
				return stop
			}
			return nil
		})
	}()
	peer.Send(&Ping{Data: 7})
	if m, err := peer.Read(); err != nil || *m.(*Pong) != (Pong{Data: 7}) {
		t.Fatalf("answer to Ping 7: %v, %v", m, err)
	}
	b.Write(AppendFrame(nil, Type(0x7e), []byte("from a newer peer")))
	peer.Send(&Pong{Data: 1})
	peer.Send(&Close{Tunnel: 3})
	if m := <-got; *m.(*Close) != (Close{Tunnel: 3}) {
		t.Fatalf("handler got %#v, want Close{3} (the unknown frame and the Pong skipped)", m)
	}
	peer.Send(&GoAway{})
	if err := <-res; err != stop {
		t.Fatalf("Serve = %v, want the handler's error", err)
	}

	// A malformed payload of a known type ends Serve with ErrShortPayload.
	go func() { res <- c.Serve(0, func(Message) error { return nil }) }()
	b.Write(AppendFrame(nil, TypeClose, []byte{1}))
	if err := <-res; !errors.Is(err, ErrShortPayload) {
		t.Fatalf("Serve after a 1-byte Close = %v, want ErrShortPayload", err)
	}
}

// TestConnHeartbeat: with a heartbeat, Serve pings the peer every
// interval, and gives up on a peer silent for three.
func TestConnHeartbeat(t *testing.T) {
	check.Leaks(t)
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	c := NewConn(a, 5*time.Second, DefaultMaxPayload)
	peer := NewConn(b, 5*time.Second, DefaultMaxPayload)
	const hb = 100 * time.Millisecond
	res := make(chan error, 1)
	start := time.Now()
	go func() { res <- c.Serve(hb, func(Message) error { return nil }) }()
	// Read the pings, answer none.
	pings := 0
	b.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		m, err := peer.Read()
		if err != nil {
			break // Serve gave up and closed nothing: the pipe ends below
		}
		if _, ok := m.(*Ping); !ok {
			t.Fatalf("got %#v, want only pings", m)
		}
		if pings++; pings == 2 {
			break
		}
	}
	// The third ping is stuck in the pipe (nobody reads it): Serve must
	// still return soon after the read deadline, not after the 5s write
	// timeout.
	var err error
	select {
	case err = <-res:
	case <-time.After(2 * time.Second):
		t.Fatal("Serve did not return 2s after three silent heartbeats")
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Serve = %v, want a read deadline after three silent heartbeats", err)
	}
	if took := time.Since(start); took < 2*hb {
		t.Errorf("gave up after %v, before three heartbeats of %v", took, hb)
	}
}

// TestConnSendWithinWaitsNoLongerThanItsBound: a write blocked on a peer
// that reads nothing holds the connection for its whole write timeout, yet
// a SendWithin(d) behind it gives up after d in all, the wait for its turn
// included: a goodbye never waits on another write.
func TestConnSendWithinWaitsNoLongerThanItsBound(t *testing.T) {
	check.Leaks(t)
	a, b := net.Pipe() // a write blocks until the peer reads: b never does
	defer b.Close()
	w := &writeSignal{Conn: a, writing: make(chan struct{}, 1)}
	c := NewConn(w, 5*time.Second, DefaultMaxPayload)
	blocked := make(chan error, 1)
	go func() { blocked <- c.Send(&Pong{Data: 1}) }()
	<-w.writing // the Pong holds the connection, for up to 5s

	const d = 200 * time.Millisecond
	start := time.Now()
	err := c.SendWithin(&GoAway{}, d)
	took := time.Since(start)
	t.Logf("SendWithin(%v) behind a blocked write: %v after %v", d, err, took.Round(time.Millisecond))
	if took > d+500*time.Millisecond {
		t.Errorf("SendWithin(%v) behind a blocked write took %v, want at most %v", d, took.Round(time.Millisecond), d)
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("SendWithin behind a blocked write = %v, want a deadline error", err)
	}
	a.Close()
	if err := <-blocked; err == nil {
		t.Error("the blocked Send succeeded with nobody reading")
	}
}

// writeSignal tells, on writing, each time a Write starts.
type writeSignal struct {
	net.Conn
	writing chan struct{}
}

func (w *writeSignal) Write(b []byte) (int, error) {
	select {
	case w.writing <- struct{}{}:
	default:
	}
	return w.Conn.Write(b)
}
