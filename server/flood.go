package server

import (
	"fmt"
	"io"
	"net"
	"time"

	"tcprelay/internal/proto"
)

// An agent session may send frameBurst control frames at once, then
// frameRate a second. An honest agent sends a Listen and a Close per
// tunnel (16 tunnels by default), a Ready when its readiness changes, a
// Ping per heartbeat and a Pong per Ping of the relay's: a few frames a
// minute once its tunnels are open. The one End per client that answers
// the relay's (feature reuse) is not counted. A session past the bound is
// sent an Error (limit) and closed.
const (
	frameBurst = 1000
	frameRate  = 100
)

// frameBucket is a token bucket of frames.
type frameBucket struct {
	tokens float64
	last   time.Time
}

// take takes a token at now, if there is one.
func (b *frameBucket) take(now time.Time) bool {
	b.tokens = min(frameBurst, b.tokens+now.Sub(b.last).Seconds()*frameRate)
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// serve serves the agent's requests until the control connection ends
// (see proto.Conn.Serve), and returns why. The log lines of its requests
// go through its own quietLog, so a flood of requests writes a line a
// second per kind, with a true count; past the bound on frames the session
// is told why and cut off.
func (ss *session) serve() error {
	s := ss.s
	ss.quiet = &quietLog{log: ss.log, wg: &s.wg}
	defer ss.quiet.flush()
	b := frameBucket{tokens: frameBurst, last: time.Now()}
	ss.ctl.Admit = func(m proto.Message) error {
		if e, ok := m.(*proto.End); ok && ss.awaitsEnd(e.Seq) {
			return nil // one per client served, like the client's bytes
		}
		if b.take(time.Now()) {
			return nil
		}
		err := fmt.Errorf("too many control frames: the agent sent more than %d at once, or %d a second after; no honest agent does, so the relay closed its session", frameBurst, frameRate)
		ss.ctl.SendWithin(&proto.Error{Code: proto.CodeLimit, Message: err.Error()}, time.Second)
		lingerClose(ss.ctl.NetConn(), time.Second)
		return err
	}
	return ss.ctl.Serve(s.set.heartbeat, ss.handle)
}

// lingerClose ends c's output (its peer reads what was sent, then EOF) and
// discards its input for up to d or until the peer closes: closing a
// socket with input unread would reset the connection, and the peer would
// lose what it was last told. The caller closes c.
func lingerClose(c net.Conn, d time.Duration) {
	cw, ok := c.(interface{ CloseWrite() error })
	if !ok || cw.CloseWrite() != nil {
		return
	}
	c.SetReadDeadline(time.Now().Add(d))
	io.Copy(io.Discard, c)
}
