package tunnel

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"tcprelay/internal/proto"
	"tcprelay/internal/transport"
)

// registration is the Listener's presence on one relay: its control
// connection, made again whenever it is lost, and the public address the
// relay gave. Its fields are guarded by the Listener's mu.
type registration struct {
	l          *Listener
	relayAddr  string // as given: host:port, or a ws:// or wss:// URL
	dialAddr   string // the host:port the control connection dials
	dialedHost string
	dialer     transport.Dialer // every connection to this relay: control and data
	tls        *tls.Config      // TLS on the dialer's stream; nil: none, or the dialer's own (wss://)
	tlsResume  *tls.Config      // TLS for a data connection that resumes a session; nil: tls (see relayTLS)

	addr   *Addr    // the public address; nil until first registered
	ctl    *control // the control connection; nil while reconnecting
	resume [proto.TokenLen]byte
	err    error // why it is not registered: the last failure; nil while registered
	final  error // gave up for good
}

type regState struct {
	registered bool
	err        error
	final      error
}

func (r *registration) state() regState {
	r.l.mu.Lock()
	defer r.l.mu.Unlock()
	return regState{r.ctl != nil, r.err, r.final}
}

// failed records why the last attempt to register failed.
func (r *registration) failed(err error) {
	r.l.mu.Lock()
	r.err = err
	r.l.mu.Unlock()
}

func (r *registration) setFinal(err error) {
	r.l.mu.Lock()
	r.final, r.err = err, err
	r.l.mu.Unlock()
}

// start keeps the registration alive in a goroutine of the Listener's,
// serving ctl first if it is not nil.
func (r *registration) start(ctl *control) {
	if ctl != nil && !r.registered(ctl) {
		return
	}
	r.l.wg.Add(1)
	go func() {
		defer r.l.wg.Done()
		r.run(ctl)
	}()
}

// registered records a new control connection and the address it got, and
// tells the caller (Config.OnAddr). It reports false, closing ctl, if the
// Listener closed meanwhile.
func (r *registration) registered(ctl *control) bool {
	l := r.l
	l.mu.Lock()
	if l.isClosed() {
		// Close ran after the dial: it could not see this conn.
		l.mu.Unlock()
		ctl.conn.Close()
		return false
	}
	old := r.addr
	r.ctl, r.addr, r.resume, r.err = ctl, ctl.addr, ctl.resume, nil
	ready := l.ready
	l.mu.Unlock()
	if ready != ctl.ready { // SetReady ran during the dial
		ctl.sendReady(ready)
	}
	l.granted(ctl.addr.Port)
	if old == nil {
		l.log.Info("registered with the relay", "relay", r.relayAddr, "public", ctl.addr.String())
	} else {
		l.log.Info("registered with the relay again", "relay", r.relayAddr, "public", ctl.addr.String(), "same_port", ctl.addr.Port == old.Port)
	}
	if l.cfg.OnAddr != nil {
		l.cfg.OnAddr(ctl.addr)
	}
	return true
}

// comeBackFor is how long an agent retries at the relay's short interval
// after a goodbye that asked it to come back soon (a restart).
const comeBackFor = time.Minute

// run serves the control connection and, each time it is lost, reconnects
// with capped exponential backoff and jitter, asking for the same port.
// After a graceful goodbye with a retry hint it retries at that interval
// for comeBackFor instead.
func (r *registration) run(ctl *control) {
	l := r.l
	var quick time.Duration
	var quickUntil time.Time
	for {
		if ctl != nil {
			err := ctl.serve()
			l.mu.Lock()
			r.ctl, r.err = nil, err
			l.mu.Unlock()
			if l.isClosed() {
				return
			}
			if l.cfg.DisableReconnect {
				l.giveUp(r, fmt.Errorf("%w: %w", ErrRelayLost, err))
				return
			}
			l.log.Warn("lost the relay; reconnecting", "relay", r.relayAddr, "err", err)
			var ga *goAwayError
			if errors.As(err, &ga) && ga.retry > 0 {
				quick, quickUntil = ga.retry, time.Now().Add(comeBackFor)
			}
		}
		if ctl = r.reconnect(quick, quickUntil); ctl == nil || !r.registered(ctl) {
			return
		}
	}
}

// reconnect dials until it registers again (a control connection), the
// Listener is closed (nil), or the relay refuses for good (nil, after
// giveUp). Until quickUntil it waits quick between attempts.
func (r *registration) reconnect(quick time.Duration, quickUntil time.Time) *control {
	l := r.l
	delay := l.cfg.minBackoff()
	for attempt := 1; ; attempt++ {
		wait := delay
		if time.Now().Before(quickUntil) {
			wait = quick
		}
		select {
		case <-l.done:
			return nil
		case <-time.After(jitter(wait)):
		}
		ctl, err := r.dial(l.ctx)
		if err == nil {
			return ctl
		}
		if l.isClosed() {
			return nil
		}
		r.failed(err)
		if final(err) {
			l.giveUp(r, err)
			return nil
		}
		if !time.Now().Before(quickUntil) {
			delay = min(2*delay, l.cfg.maxBackoff())
		}
		if refused(err) && !errors.Is(err, ErrShuttingDown) {
			// In the relay's own words: a port in use or a limit may
			// change, so it is asked again, but someone must look.
			l.log.Error("relay refused the agent; retrying", "relay", r.relayAddr, "attempt", attempt, "err", err)
		} else {
			l.log.Warn("reconnect failed", "relay", r.relayAddr, "attempt", attempt, "err", err)
		}
	}
}

// jitter spreads a wait over its upper half, so agents cut off together do
// not come back together.
func jitter(d time.Duration) time.Duration {
	return d/2 + time.Duration(rand.Int64N(int64(d/2)+1))
}

// dial registers with the relay: a new control connection, authenticated,
// with the public port open. It asks for the Listener's port, with the
// token that proves the port was this agent's.
func (r *registration) dial(ctx context.Context) (*control, error) {
	l := r.l
	port, required := l.wantPort()
	req := &proto.Listen{ID: 1, Port: uint16(port), Pool: l.cfg.Pool, Hostname: l.cfg.Hostname,
		Allow: proto.FormatPrefixes(l.cfg.Allow), Deny: proto.FormatPrefixes(l.cfg.Deny)}
	if required {
		req.Flags |= proto.ListenPortRequired
	}
	l.mu.Lock()
	if r.addr != nil && (r.addr.Port == port || l.cfg.Hostname != "") {
		req.Resume = r.resume
	}
	if !l.ready {
		req.Flags |= proto.ListenUnready
	}
	l.mu.Unlock()
	return dialControl(ctx, r, req)
}

// goAwayError is the relay's goodbye; retry, if not zero, is how soon it
// expects to be back.
type goAwayError struct {
	msg   string
	retry time.Duration
}

func (e *goAwayError) Error() string        { return ErrShuttingDown.Error() + " (" + relayWords(e.msg) + ")" }
func (e *goAwayError) Is(target error) bool { return target == ErrShuttingDown }
