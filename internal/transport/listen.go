package transport

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"syscall"
	"time"

	"github.com/coder/websocket"

	"tcprelay/internal/copier"
)

// Listen returns the listener of a relay's control port: it accepts
// agents that speak the native protocol, and agents that speak it over
// WebSocket (see WebSocket), each over TLS first if tlsCfg is not nil.
//
// Accept returns at once, without reading: a stranger that sends nothing
// cannot hold the accept loop. Each conn decides what it carries on its
// first Read, in the caller's goroutine and under the deadline the caller
// set, TLS handshake and HTTP upgrade included: the 4 bytes "GET " start
// a WebSocket upgrade (an HTTP/1.1 GET with Upgrade: websocket, answered
// 101, then binary messages); anything else is the native protocol, every
// byte passed on. Before that Read, a Write goes out as the native
// protocol (the relay writes first only to turn an agent away).
//
// A conn is a *Conn: plain, or *TLSConn if tlsCfg is set.
func Listen(ln net.Listener, tlsCfg *tls.Config) net.Listener {
	return &listener{Listener: ln, tls: tlsCfg}
}

type listener struct {
	net.Listener
	tls *tls.Config
}

func (l *listener) Accept() (net.Conn, error) {
	raw, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	c := &Conn{raw: raw, base: raw}
	if l.tls == nil {
		return c, nil
	}
	// Over Records, a relayed connection's copier can park the direction
	// that reads the agent, as it does over plain TCP.
	c.rec = copier.NewRecords(raw)
	c.tc = tls.Server(c.rec, l.tls)
	c.base = c.tc
	return &TLSConn{c}, nil
}

// maxUpgradeRequest bounds the HTTP request of a WebSocket upgrade.
const maxUpgradeRequest = 8 << 10

// sniffLen is how many bytes tell a WebSocket upgrade from the native
// protocol, whose magic is 4 bytes too.
const sniffLen = 4

// Conn is an agent's connection to the control port, accepted by Listen.
type Conn struct {
	raw  net.Conn        // the accepted socket
	tc   *tls.Conn       // TLS over raw, if the listener has it
	rec  *copier.Records // under tc: raw, read a TLS record at a time
	base net.Conn        // tc, else raw: what the protocol runs on

	decide sync.Mutex // held while deciding; decided is set under it

	mu      sync.Mutex
	decided bool
	err     error   // why deciding failed: every Read returns it
	ws      *wsConn // the WebSocket, if that is what it carries
	head    []byte  // native: bytes read while deciding, not yet returned
	closed  bool
	rd, wd  time.Time // the deadlines set, for the WebSocket once there is one
}

// TLSConn is a Conn over TLS.
type TLSConn struct{ *Conn }

// ConnectionState is the TLS state of a native connection, by which the
// relay binds a session to its TLS channel. Over WebSocket it is the zero
// value once the upgrade is done: the agent's TLS may end at a reverse
// proxy in front of the relay, so there is no channel the two ends share.
func (c *TLSConn) ConnectionState() tls.ConnectionState {
	c.mu.Lock()
	ws := c.ws != nil
	c.mu.Unlock()
	if ws {
		return tls.ConnectionState{}
	}
	return c.tc.ConnectionState()
}

// WebSocket reports whether c carries a WebSocket (false until its first
// Read has decided).
func (c *Conn) WebSocket() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ws != nil
}

// stream is what reads and writes go to now.
func (c *Conn) stream() net.Conn {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ws != nil {
		return c.ws
	}
	return c.base
}

func (c *Conn) Read(p []byte) (int, error) {
	c.mu.Lock()
	decided := c.decided
	c.mu.Unlock()
	if !decided {
		if err := c.sniff(); err != nil {
			return 0, err
		}
	}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return 0, err
	}
	if len(p) == 0 {
		c.mu.Unlock()
		return 0, nil // a WebSocket's reader would wait for a message
	}
	if len(c.head) > 0 {
		n := copy(p, c.head)
		c.head = c.head[n:]
		c.mu.Unlock()
		return n, nil
	}
	c.mu.Unlock()
	return c.stream().Read(p)
}

// sniff reads the first bytes and decides what c carries.
func (c *Conn) sniff() error {
	c.decide.Lock()
	defer c.decide.Unlock()
	c.mu.Lock()
	decided := c.decided
	c.mu.Unlock()
	if decided {
		return nil
	}
	var head [sniffLen]byte
	n, err := readFull(c.base, head[:])
	var ws *wsConn
	if n == sniffLen && string(head[:]) == "GET " {
		ws, err = c.upgrade(head[:])
	} else if n > 0 {
		err = nil // the bytes first; the error, if any, on the next Read
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.decided = true
	switch {
	case err != nil:
		c.err = err
		return err
	case ws != nil:
		c.base.SetDeadline(time.Time{}) // the WebSocket's own deadlines from now on
		ws.SetReadDeadline(c.rd)
		ws.SetWriteDeadline(c.wd)
		c.ws = ws
		if c.closed {
			ws.Close()
		}
	default:
		c.head = append([]byte(nil), head[:n]...)
	}
	return nil
}

// readFull is io.ReadFull, with the stream's own error (a TLS record
// header error, a timeout) as it is.
func readFull(r io.Reader, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		m, err := r.Read(b[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// upgrade reads the rest of an HTTP upgrade request and answers it.
func (c *Conn) upgrade(head []byte) (*wsConn, error) {
	limited := &io.LimitedReader{R: c.base, N: maxUpgradeRequest}
	br := bufio.NewReaderSize(io.MultiReader(bytes.NewReader(head), limited), 4<<10)
	req, err := http.ReadRequest(br)
	if err != nil {
		if limited.N <= 0 {
			err = fmt.Errorf("longer than %d bytes", maxUpgradeRequest)
		}
		return nil, fmt.Errorf("WebSocket upgrade: bad HTTP request: %w", err)
	}
	w := &upgradeResponse{conn: c.base, brw: bufio.NewReadWriter(br, bufio.NewWriterSize(c.base, 4<<10)), h: http.Header{}}
	// Agents send no Origin, so the browser's same-origin check has
	// nothing to protect here; authentication is the native protocol's.
	ws, err := websocket.Accept(w, req, &websocket.AcceptOptions{InsecureSkipVerify: true, CompressionMode: websocket.CompressionDisabled})
	if err != nil {
		w.brw.Flush()
		return nil, fmt.Errorf("WebSocket upgrade: %s %s: %w", req.Method, req.URL.Path, err)
	}
	return newWSConn(ws, c.base), nil
}

// upgradeResponse is the http.ResponseWriter that websocket.Accept answers
// through: straight onto the connection, and hijackable.
type upgradeResponse struct {
	conn  net.Conn
	brw   *bufio.ReadWriter
	h     http.Header
	wrote bool
}

func (w *upgradeResponse) Header() http.Header { return w.h }

func (w *upgradeResponse) WriteHeader(code int) {
	if w.wrote {
		return
	}
	w.wrote = true
	if code != http.StatusSwitchingProtocols {
		w.h.Set("Connection", "close")
	}
	fmt.Fprintf(w.brw, "HTTP/1.1 %03d %s\r\n", code, http.StatusText(code))
	w.h.Write(w.brw)
	w.brw.WriteString("\r\n")
}

func (w *upgradeResponse) Write(b []byte) (int, error) {
	w.WriteHeader(http.StatusOK)
	return w.brw.Write(b)
}

func (w *upgradeResponse) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	return w.conn, w.brw, w.brw.Flush()
}

func (c *Conn) Write(p []byte) (int, error) { return c.stream().Write(p) }

func (c *Conn) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return net.ErrClosed
	}
	c.closed = true
	ws := c.ws
	c.mu.Unlock()
	if ws != nil {
		return ws.Close()
	}
	// Also ends a sniff in progress; it closes the WebSocket it may have
	// made meanwhile.
	return c.base.Close()
}

func (c *Conn) LocalAddr() net.Addr  { return c.raw.LocalAddr() }
func (c *Conn) RemoteAddr() net.Addr { return c.raw.RemoteAddr() }

func (c *Conn) SetDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.rd, c.wd = t, t
	if c.ws != nil {
		return c.ws.SetDeadline(t)
	}
	return c.base.SetDeadline(t)
}

func (c *Conn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.rd = t
	if c.ws != nil {
		return c.ws.SetReadDeadline(t)
	}
	return c.base.SetReadDeadline(t)
}

func (c *Conn) SetWriteDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.wd = t
	if c.ws != nil {
		return c.ws.SetWriteDeadline(t)
	}
	return c.base.SetWriteDeadline(t)
}

// ErrNoHalfClose is CloseWrite's answer over WebSocket, which cannot end
// one direction only.
var ErrNoHalfClose = errors.New("transport: WebSocket cannot half-close")

// CloseWrite half-closes a native connection; over WebSocket it is
// ErrNoHalfClose.
func (c *Conn) CloseWrite() error {
	s := c.stream()
	if cw, ok := s.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return ErrNoHalfClose
}

// NetConn is the connection under the protocol: the TLS conn if the
// listener has TLS, else the socket. The relay tunes and peeks the socket
// under it; it never reads or writes it.
func (c *Conn) NetConn() net.Conn { return c.base }

// errNotRaw is SyscallConn's answer when the socket does not carry the
// agent's bytes as they are.
var errNotRaw = errors.New("transport: not a plain native connection")

// SyscallConn gives the socket of a plain native connection whose first
// bytes have all been read, so the relay's copier can splice(2) it. Over
// TLS or WebSocket, before the first Read, or with sniffed bytes not yet
// read, it is an error: the socket does not carry the agent's bytes as
// they are, and the copier falls back to copying through a buffer.
func (c *Conn) SyscallConn() (syscall.RawConn, error) {
	c.mu.Lock()
	plain := c.decided && c.err == nil && c.ws == nil && c.tc == nil && len(c.head) == 0
	c.mu.Unlock()
	sc, ok := c.raw.(syscall.Conn)
	if !plain || !ok {
		return nil, errNotRaw
	}
	return sc.SyscallConn()
}

// TLSRecords gives the copier the socket under a native TLS connection
// whose first bytes have all been read (see copier.Records): reads of c
// then go straight to the TLS conn, which reads the socket through it.
// Plain, over WebSocket, before the first Read or with sniffed bytes not
// yet read, it is nil.
func (c *Conn) TLSRecords() *copier.Records {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.decided || c.err != nil || c.ws != nil || c.tc == nil || len(c.head) > 0 {
		return nil
	}
	return c.rec
}
