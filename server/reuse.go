package server

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"syscall"
	"time"

	"tcprelay/internal/copier"
	"tcprelay/internal/proto"
)

// parked is a pre-opened data connection waiting for a client; seq is the
// number of its PoolJoin when the session reuses data connections
// (feature reuse), else 0.
type parked struct {
	c   net.Conn
	seq uint64
}

// reusing reports whether ss's pre-opened data connections serve one client
// after another: the agent speaks reuse, and proof, whose PoolJoin numbers
// name the connections in End.
func (ss *session) reusing() bool {
	const need = proto.FeatureReuse | proto.FeatureProof | proto.FeaturePool
	return ss.features&need == need
}

// counted is a pre-opened data connection joined to a client on a session
// that reuses them (copier.Counted): the end of the client's stream is an
// End on the control connection instead of a FIN, and so is the end of the
// agent's. Once both ended that way, with nothing left over, the link
// leaves the connection open and countedDone parks it again for the next
// client. A relay counts only connections its copier reads itself (plain,
// or TLS over copier.Records: copier.CanCount); over WebSocket, or a TLS
// conn behind a wrapper (the shared port's replayed ClientHello), the
// streams end with FINs, as without reuse.
type counted struct {
	net.Conn // the socket (plain), or the TLS conn
	ss       *session
	seq      uint64
	head     int64 // bytes of the client written with Bind, before the link

	gotEnd bool // the agent's End came (under s.mu)

	mu        sync.Mutex
	written   int64       // bytes of the client's stream written by the link
	watch     func(int64) // the link's, once it watches
	agentEnd  int64       // the agent's End (+1), until the link watches; 0: none
	endSent   bool        // the client's end went to the agent as End
	gone      bool        // the session ended (lost): no End reaches the agent now
	readEnded bool        // the link read the agent's stream to its End
	keep      bool        // Close left the connection open, to park again
	closed    bool        // Close closed it: never parked again
}

var (
	_ copier.Counted = (*counted)(nil)
	_ syscall.Conn   = (*counted)(nil)
)

var errNotSocket = errors.New("not a plain socket")

// SyscallConn and TLSRecords hand the copier what is under c, as for any
// data connection.
func (c *counted) SyscallConn() (syscall.RawConn, error) {
	if sc, ok := c.Conn.(syscall.Conn); ok {
		return sc.SyscallConn()
	}
	return nil, errNotSocket
}

func (c *counted) TLSRecords() *copier.Records {
	if t, ok := c.Conn.(interface{ TLSRecords() *copier.Records }); ok {
		return t.TLSRecords()
	}
	return nil
}

func (c *counted) WatchEnd(end func(int64)) {
	c.mu.Lock()
	c.watch = end
	n := c.agentEnd
	c.mu.Unlock()
	if n != 0 {
		end(n - 1)
	}
}

// ended is the agent's End for c.
func (c *counted) ended(n int64) {
	c.mu.Lock()
	end := c.watch
	if end == nil && c.agentEnd == 0 {
		c.agentEnd = n + 1
	}
	c.mu.Unlock()
	if end != nil {
		end(n)
	}
}

func (c *counted) ReadEnded() {
	c.mu.Lock()
	c.readEnded = true
	c.mu.Unlock()
}

// Write counts what the copier writes through c (over TLS).
func (c *counted) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.mu.Lock()
	c.written += int64(n)
	c.mu.Unlock()
	return n, err
}

// Wrote counts what the copier wrote to the socket itself.
func (c *counted) Wrote(n int64) {
	c.mu.Lock()
	c.written += n
	c.mu.Unlock()
}

// CloseWrite tells the agent where the client's stream ends, with End. If
// the session has ended (lost), or ends while End is on its way, a FIN
// tells it instead: the agent may never read that End.
func (c *counted) CloseWrite() error {
	c.mu.Lock()
	n := c.head + c.written
	gone := c.gone
	c.mu.Unlock()
	if gone {
		return c.fin()
	}
	err := c.ss.ctl.Send(&proto.End{Seq: c.seq, Bytes: uint64(n)})
	c.mu.Lock()
	c.endSent = err == nil
	gone = c.gone
	c.mu.Unlock()
	if err != nil || gone {
		return c.fin()
	}
	return nil
}

// fin half-closes the connection itself.
func (c *counted) fin() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}

// Close leaves the connection open when both streams ended by End: it is
// parked again (linkDone). Otherwise it closes it.
func (c *counted) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.keep = c.endSent && c.readEnded
	c.closed = !c.keep
	keep := c.keep
	c.mu.Unlock()
	if keep {
		return nil
	}
	return c.Conn.Close()
}

// lost runs when c's session ends while c is linked: an End the agent may
// not have read becomes a FIN, so the agent's side of the link still ends.
// An End being sent meanwhile is CloseWrite's to follow with a FIN: either
// CloseWrite sees gone once its Send returns, or lost sees endSent.
func (c *counted) lost() {
	c.mu.Lock()
	c.gone = true
	sent := c.endSent
	c.mu.Unlock()
	if sent {
		c.fin()
	}
}

// agentEnd routes the agent's End to the link of the connection it names;
// an End for a connection no longer linked is late, and ignored.
func (ss *session) agentEnd(m *proto.End) error {
	if !ss.reusing() {
		return fmt.Errorf("%w: End without feature reuse", errBadRequest)
	}
	ss.s.mu.Lock()
	c := ss.counted[m.Seq]
	first := c != nil && !c.gotEnd
	if first {
		c.gotEnd = true
	}
	ss.s.mu.Unlock()
	if first {
		c.ended(int64(min(m.Bytes, 1<<62)))
	}
	return nil
}

// awaitsEnd reports whether the agent's End for seq is the first for a
// linked connection: the answer to one the relay sent, which the bound on
// the agent's frames does not count.
func (ss *session) awaitsEnd(seq uint64) bool {
	ss.s.mu.Lock()
	defer ss.s.mu.Unlock()
	c := ss.counted[seq]
	return c != nil && !c.gotEnd
}

// countedDone runs when c's link has ended: a connection whose streams both
// ended by End is parked again for the next client, if the session is
// still there and has room; any other is closed (Close did).
func (s *Server) countedDone(c *counted) {
	ss := c.ss
	s.mu.Lock()
	if ss.counted[c.seq] == c {
		delete(ss.counted, c.seq)
	}
	c.mu.Lock()
	keep := c.keep
	c.mu.Unlock()
	again := keep && !ss.closed && !s.draining && ss.roomToParkLocked()
	if again {
		c.Conn.SetDeadline(time.Time{}) // the link may have left one, to wake a wait
		ss.pool = append(ss.pool, parked{c.Conn, c.seq})
		s.conns[c.Conn] = struct{}{}
	}
	s.mu.Unlock()
	if again {
		s.count.reused.Add(1)
	} else if keep {
		c.Conn.Close()
	}
}
