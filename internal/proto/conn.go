package proto

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"
)

// Conn is a control connection, seen from either end: the relay's session
// and the agent's control loop are the same state machine. It writes whole
// frames, one writer at a time, each under a write deadline that bounds
// the wait for its turn and the write together, so that a peer that stops
// reading cannot block a writer for long, nor one writer another for
// longer than the second one's own bound. It reads frames
// through a buffer: after the first frame a control connection carries
// nothing else.
type Conn struct {
	nc           net.Conn
	br           *bufio.Reader
	writeTimeout time.Duration
	rbuf         []byte

	// MaxPayload bounds the payload of each frame Read accepts.
	MaxPayload int
	// Admit, if not nil, is called by Serve for every frame it reads
	// (pings, pongs and frames of unknown types included, as nil) before
	// acting on it; an error ends Serve with that error. The relay bounds
	// an agent's rate of frames with it.
	Admit func(m Message) error

	// wturn is the writers' turn: a one-slot semaphore rather than a
	// mutex, so that waiting for it can time out (see write).
	wturn chan struct{}
	wbuf  []byte
}

// NewConn wraps nc. Writes time out after writeTimeout; reads accept
// payloads up to maxPayload bytes.
func NewConn(nc net.Conn, writeTimeout time.Duration, maxPayload int) *Conn {
	return &Conn{nc: nc, br: bufio.NewReader(nc), writeTimeout: writeTimeout, MaxPayload: maxPayload,
		wturn: make(chan struct{}, 1)}
}

// NetConn returns the underlying connection.
func (c *Conn) NetConn() net.Conn { return c.nc }

// Close closes the underlying connection; a blocked Read or Serve returns.
func (c *Conn) Close() error { return c.nc.Close() }

// Peek returns the next n bytes the peer sent without consuming them,
// waiting for them as Read would.
func (c *Conn) Peek(n int) ([]byte, error) { return c.br.Peek(n) }

// Buffered returns the bytes already received and not yet read, without
// waiting for more.
func (c *Conn) Buffered() []byte {
	b, _ := c.br.Peek(c.br.Buffered())
	return b
}

// Open sends the preamble and m (the agent's Hello) in one write, so they
// leave in one segment.
func (c *Conn) Open(m Message) error { return c.write(Preamble(), m, c.writeTimeout, nil) }

// Send writes m as one frame.
func (c *Conn) Send(m Message) error { return c.write(nil, m, c.writeTimeout, nil) }

// SendWithin writes m as one frame, giving up after d rather than the
// connection's write timeout: for a goodbye that must not hold up a close.
// d bounds the whole call, including the wait for another write (a Pong
// stuck on a peer that reads nothing) to finish or time out.
func (c *Conn) SendWithin(m Message, d time.Duration) error { return c.write(nil, m, d, nil) }

// errStopped: a ping was not sent because Serve is returning.
var errStopped = errors.New("stopped")

// errTurnTimeout: a write gave up waiting for another write to end.
var errTurnTimeout = fmt.Errorf("control write: another write held the connection past the deadline: %w", os.ErrDeadlineExceeded)

// write sends prefix and m, giving up after timeout: the wait for its turn
// and the write share that one deadline. If stop is closed once the
// deadline is set, it sends nothing: Serve, returning, closes stop and
// then moves the deadline into the past, so a ping is either cut short by
// that or not sent at all.
func (c *Conn) write(prefix []byte, m Message, timeout time.Duration, stop <-chan struct{}) error {
	deadline := time.Now().Add(timeout)
	select {
	case c.wturn <- struct{}{}:
	default:
		t := time.NewTimer(timeout)
		select {
		case c.wturn <- struct{}{}:
			t.Stop()
		case <-t.C:
			return errTurnTimeout
		case <-stop:
			t.Stop()
			return errStopped
		}
	}
	defer func() { <-c.wturn }()
	c.wbuf = Append(append(c.wbuf[:0], prefix...), m)
	c.nc.SetWriteDeadline(deadline)
	select {
	case <-stop:
		return errStopped
	default:
	}
	_, err := c.nc.Write(c.wbuf)
	return err
}

// Read reads and decodes the next frame. A frame of a type this version
// does not know is consumed and reported with ErrUnknownType, so the
// caller can skip it.
func (c *Conn) Read() (Message, error) {
	t, payload, err := ReadFrame(c.br, c.rbuf, c.MaxPayload)
	if err != nil {
		return nil, err
	}
	if cap(payload) > cap(c.rbuf) && cap(payload) <= 4096 {
		c.rbuf = payload[:0] // keep a grown buffer, within reason
	}
	return Parse(t, payload)
}

// Serve reads frames until the connection fails or handle returns an
// error, and returns why. With a heartbeat hb > 0 it sends a Ping every hb
// and gives the peer 3·hb to send any frame at all. It answers every Ping
// with a Pong, and skips Pongs and frames of unknown types (so a newer
// peer may send messages this side does not know); every other message
// goes to handle. A malformed payload ends Serve with an error that wraps
// ErrShortPayload.
func (c *Conn) Serve(hb time.Duration, handle func(Message) error) error {
	stop := make(chan struct{})
	var wg sync.WaitGroup
	defer func() {
		// A Ping blocked on a peer that reads nothing must not hold
		// Serve's return for a whole write timeout. Each Send sets its own
		// deadline, so the caller can still write afterwards.
		close(stop)
		c.nc.SetWriteDeadline(time.Unix(1, 0))
		wg.Wait()
	}()
	if hb > 0 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.pingLoop(hb, stop)
		}()
	}
	for {
		if hb > 0 {
			c.nc.SetReadDeadline(time.Now().Add(3 * hb))
		}
		m, err := c.Read()
		if c.Admit != nil && (err == nil || errors.Is(err, ErrUnknownType)) {
			if err := c.Admit(m); err != nil {
				return err
			}
		}
		if errors.Is(err, ErrUnknownType) {
			continue
		}
		if err != nil {
			return err
		}
		switch m := m.(type) {
		case *Ping:
			if err := c.Send(&Pong{Data: m.Data}); err != nil {
				return err
			}
		case *Pong:
			// Its arrival already renewed the read deadline.
		default:
			if err := handle(m); err != nil {
				return err
			}
		}
	}
}

// pingLoop sends a Ping every hb until stop is closed. A Ping that cannot
// be sent closes the connection, which ends Serve's read.
func (c *Conn) pingLoop(hb time.Duration, stop <-chan struct{}) {
	tick := time.NewTicker(hb)
	defer tick.Stop()
	for seq := uint64(1); ; seq++ {
		select {
		case <-stop:
			return
		case <-tick.C:
			if c.write(nil, &Ping{Data: seq}, c.writeTimeout, stop) != nil {
				select {
				case <-stop: // Serve is returning and cut the write short
				default:
					c.nc.Close()
				}
				return
			}
		}
	}
}
