// Package expose forwards relayed connections to an existing, unmodified
// server: the heart of ./expose.
package expose

import (
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"tcprelay/internal/copier"
	"tcprelay/internal/proxyproto"
)

// Forwarder dials Target for each relayed connection and joins the two.
type Forwarder struct {
	// Target is the server's host:port.
	Target string

	// DialTimeout bounds each dial of Target; when it passes, the outside
	// client is closed. If zero, 5s.
	DialTimeout time.Duration

	// ProxyProtocol, if 1 or 2, sends a PROXY protocol header of that version
	// with the outside client's address before the first byte. If zero, none.
	ProxyProtocol int

	// Logger receives one line per failed connection. If nil, slog.Default().
	Logger *slog.Logger

	// OnDialError, if set, is called with the error when Target could not
	// be reached, so that the agent can stop taking clients at once instead
	// of at its next health check. It must not block.
	OnDialError func(err error)

	// The clients closed because Target was unreachable are logged at most
	// once per unreachableEvery, with the count since the last line.
	mu              sync.Mutex
	unreachableLast time.Time
	unreachableMore int
}

// unreachableEvery bounds the "target unreachable" lines: one line per
// client while a target is down would flood the log.
const unreachableEvery = 10 * time.Second

// Probe dials Target once, within timeout, and closes the connection: nil
// if Target accepts connections, else the dial error, which names Target.
func (f *Forwarder) Probe(timeout time.Duration) error {
	c, err := net.DialTimeout("tcp", f.Target, timeout)
	if err != nil {
		return err
	}
	return c.Close()
}

// logUnreachable logs a client closed because Target could not be reached,
// rate-limited: the first one, then at most one line per unreachableEvery,
// which counts the others.
func (f *Forwarder) logUnreachable(log *slog.Logger, c net.Conn, err error) {
	f.mu.Lock()
	now := time.Now()
	more := f.unreachableMore
	if !f.unreachableLast.IsZero() && now.Sub(f.unreachableLast) < unreachableEvery {
		f.unreachableMore++
		f.mu.Unlock()
		return
	}
	f.unreachableLast, f.unreachableMore = now, 0
	f.mu.Unlock()
	args := []any{"client", c.RemoteAddr().String(), "target", f.Target, "err", err}
	if more > 0 {
		args = append(args, "also_closed_since_last_line", more)
	}
	log.Warn("closed client: target unreachable", args...)
}

// Handle forwards one relayed connection to Target and returns when both
// directions are done. If Target cannot be reached, the outside client is
// closed at once and the reason logged.
func (f *Forwarder) Handle(c net.Conn) {
	ch := make(chan struct{})
	f.Start(c, func() { close(ch) })
	<-ch
}

// Start dials Target for one relayed connection and returns once the two
// are joined, or c is closed because Target could not be reached. The
// forwarding goes on in the background, with no goroutine while the
// connection is idle; done is called when it has ended.
func (f *Forwarder) Start(c net.Conn, done func()) {
	log := f.Logger
	if log == nil {
		log = slog.Default()
	}
	timeout := f.DialTimeout
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	target, err := net.DialTimeout("tcp", f.Target, timeout)
	if err != nil {
		f.logUnreachable(log, c, err)
		if f.OnDialError != nil {
			f.OnDialError(err)
		}
		c.Close()
		done()
		return
	}
	if f.ProxyProtocol != 0 {
		if err := f.sendProxyHeader(target, c); err != nil {
			log.Warn("closed client: PROXY header not sent", "client", c.RemoteAddr().String(), "target", f.Target, "err", err)
			c.Close()
			target.Close()
			done()
			return
		}
	}
	copier.Start(c, target, func(_ *copier.Link, res copier.Result) {
		args := []any{"client", c.RemoteAddr().String(), "bytes_in", res.AToB, "bytes_out", res.BToA}
		if res.Err != nil {
			args = append(args, "err", res.Err)
		}
		log.Debug("connection closed", args...)
		done()
	})
}

func (f *Forwarder) sendProxyHeader(target, c net.Conn) error {
	h, err := proxyproto.Header(f.ProxyProtocol, c.RemoteAddr(), c.LocalAddr())
	if err != nil {
		return err
	}
	target.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := target.Write(h); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	return target.SetWriteDeadline(time.Time{})
}
