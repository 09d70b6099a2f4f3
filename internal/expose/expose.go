// Package expose forwards relayed connections to an existing, unmodified
// server: the heart of ./expose.
package expose

import (
	"fmt"
	"log/slog"
	"net"
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

	// OnDialError, if set, is called when Target could not be reached, so
	// that the agent can stop taking clients at once instead of at its next
	// health check. It must not block.
	OnDialError func()
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
		log.Warn("closed client: target unreachable", "client", c.RemoteAddr().String(), "target", f.Target, "err", err)
		if f.OnDialError != nil {
			f.OnDialError()
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
		log.Debug("connection closed", "client", c.RemoteAddr().String(), "bytes_in", res.AToB, "bytes_out", res.BToA, "err", res.Err)
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
