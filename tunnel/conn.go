package tunnel

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"tcprelay/internal/copier"
)

// Addr is a relayed public address. Host is the relay's advertised host, or
// the host the agent dialed when the relay advertises none; it may be a name.
type Addr struct {
	Host string
	Port int
}

func (a *Addr) Network() string { return "tcp" }
func (a *Addr) String() string  { return net.JoinHostPort(a.Host, strconv.Itoa(a.Port)) }

func parseAddr(s string) net.Addr {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return net.TCPAddrFromAddrPort(ap)
	}
	return stringAddr(s)
}

type stringAddr string

func (a stringAddr) Network() string { return "tcp" }
func (a stringAddr) String() string  { return string(a) }

// Conn is a relayed connection to one outside client: the agent's data
// connection to the relay, a raw TCP stream (a *net.TCPConn, or one through
// a proxy) or, with TLS, a *tls.Conn. ReadFrom and WriteTo hand over to the
// raw stream when there is one, so io.Copy between a Conn and another TCP
// connection still uses splice(2).
type Conn struct {
	net.Conn
	local, remote net.Addr
	d             *dataConn   // a pre-opened data connection that may serve another client after this one; nil: none
	ended         atomic.Bool // both streams ended with End: d serves other clients now
}

var (
	_ io.ReaderFrom = (*Conn)(nil)
	_ io.WriterTo   = (*Conn)(nil)
	_ syscall.Conn  = (*Conn)(nil)
)

// RemoteAddr is the outside client's address, as the relay saw it.
func (c *Conn) RemoteAddr() net.Addr { return c.remote }

// LocalAddr is the relay's address that the client connected to, as an IP
// address and port (Listener.Addr gives the advertised name, if any).
func (c *Conn) LocalAddr() net.Addr { return c.local }

// NetConn returns the data connection to the relay.
func (c *Conn) NetConn() net.Conn { return c.Conn }

// CloseWrite half-closes the connection: the outside client reads EOF after
// the bytes already written, and can keep sending.
func (c *Conn) CloseWrite() error {
	if c.d != nil {
		return c.d.endWrite(c)
	}
	return closeWrite(c.Conn)
}

// Read reads what the outside client sent; io.EOF once it has ended its
// half.
func (c *Conn) Read(b []byte) (int, error) {
	if c.d != nil {
		return c.d.readFor(c, b)
	}
	return c.Conn.Read(b)
}

// Write sends b to the outside client.
func (c *Conn) Write(b []byte) (int, error) {
	if c.d != nil {
		return c.d.writeFor(c, b)
	}
	return c.Conn.Write(b)
}

// Close ends the connection to the outside client. With feature reuse, the
// data connection under it may then serve the next client.
func (c *Conn) Close() error {
	if c.d != nil {
		return c.d.closeFor(c)
	}
	return c.Conn.Close()
}

// SetReadDeadline, SetWriteDeadline and SetDeadline are net.Conn's.
func (c *Conn) SetReadDeadline(t time.Time) error {
	if c.d != nil {
		return c.d.setReadDeadline(c, t)
	}
	return c.Conn.SetReadDeadline(t)
}

func (c *Conn) SetWriteDeadline(t time.Time) error {
	if c.d != nil {
		return c.d.setWriteDeadline(c, t)
	}
	return c.Conn.SetWriteDeadline(t)
}

func (c *Conn) SetDeadline(t time.Time) error {
	if err := c.SetReadDeadline(t); err != nil {
		return err
	}
	return c.SetWriteDeadline(t)
}

// rawStream is a data connection whose socket carries the client's bytes
// as they are: a *net.TCPConn, or a stream through a proxy over one (see
// transport.Dialer).
type rawStream interface {
	net.Conn
	syscall.Conn
	io.ReaderFrom
	io.WriterTo
}

// errNotRaw is SyscallConn's answer when the data connection is TLS: its
// descriptor carries ciphertext, not the client's bytes.
var errNotRaw = errors.New("tunnel: data connection is not raw TCP")

// SyscallConn gives access to the data connection's socket when it is plain
// TCP, so copiers can splice(2) the client's bytes without a user-space
// copy. With TLS it returns an error.
func (c *Conn) SyscallConn() (syscall.RawConn, error) {
	if c.ended.Load() {
		return nil, net.ErrClosed
	}
	if tc, ok := c.Conn.(rawStream); ok {
		return tc.SyscallConn()
	}
	return nil, errNotRaw
}

// ReadFrom copies r to the outside client: with sendfile(2) or splice(2)
// where the data connection is a socket and r a file or another socket.
func (c *Conn) ReadFrom(r io.Reader) (int64, error) {
	if c.d != nil {
		return c.d.readFromFor(c, r)
	}
	if tc, ok := c.Conn.(rawStream); ok {
		return tc.ReadFrom(r)
	}
	return io.Copy(struct{ io.Writer }{c}, r)
}

// WriteTo copies what the outside client sends to w: with splice(2)
// where both are sockets.
func (c *Conn) WriteTo(w io.Writer) (int64, error) {
	if c.d != nil {
		return c.d.writeToFor(c, w)
	}
	if tc, ok := c.Conn.(rawStream); ok {
		return tc.WriteTo(w)
	}
	return io.Copy(w, struct{ io.Reader }{c})
}

// TLSRecords gives a copier the socket under a TLS data connection (see
// copier.Records); nil over plain TCP. (The handshake is done before a
// data connection becomes a Conn.)
func (c *Conn) TLSRecords() *copier.Records {
	if c.ended.Load() {
		return nil
	}
	if tc, ok := c.Conn.(*tls.Conn); ok && tc.ConnectionState().HandshakeComplete {
		r, _ := tc.NetConn().(*copier.Records)
		return r
	}
	return nil
}
