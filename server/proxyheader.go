package server

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net"
	"time"

	proxyproto "github.com/pires/go-proxyproto"
)

// A relay behind a load balancer (haproxy, a cloud L4 balancer) sees the
// balancer's address on every outside connection. With
// Config.ProxyProtocolFrom, a connection from one of those peers starts
// with a PROXY protocol header (v1 or v2) that names the real client: the
// relay reads it, exactly, and from then on the connection's address is
// the client's, for the access lists, the per-source limits, the access
// log and what the agent is told. Anyone else's header is just data.

// proxied is an outside client's connection that came through a trusted
// proxy: its socket, with the address the PROXY header gave.
type proxied struct {
	*net.TCPConn // embedded, so the copier still splices and parks it
	remote       net.Addr
	// head is what the relay read of the client past the header to route
	// it (a ClientHello on the shared port): link sends it to the agent
	// first.
	head []byte
}

func (c *proxied) RemoteAddr() net.Addr { return c.remote }

// NetConn returns the socket, for the tuning of relayed sockets.
func (c *proxied) NetConn() net.Conn { return c.TCPConn }

const (
	proxyV2Sig   = "\r\n\r\n\x00\r\nQUIT\n"
	maxProxyV1   = 107 // the longest v1 line, CRLF included
	maxProxyV2TL = 1024
)

// readProxyHeader reads the PROXY header a trusted proxy sends first on c,
// and nothing after it, by d at the latest, and returns c with the client's
// address. A LOCAL (v2) or UNKNOWN (v1) header, a proxy's own health check,
// keeps the proxy's address.
func readProxyHeader(c *net.TCPConn, d time.Duration) (net.Conn, error) {
	c.SetReadDeadline(time.Now().Add(d))
	defer c.SetReadDeadline(time.Time{})
	hdr := make([]byte, 6, 16)
	if _, err := readFull(c, hdr); err != nil {
		return nil, fmt.Errorf("no PROXY header: %w", err)
	}
	switch {
	case string(hdr) == "PROXY ":
		// v1: a text line; read byte by byte, so as not to take the
		// client's first bytes.
		b := make([]byte, 1)
		for hdr[len(hdr)-1] != '\n' {
			if len(hdr) >= maxProxyV1 {
				return nil, errors.New("PROXY v1 header longer than 107 bytes")
			}
			if _, err := readFull(c, b); err != nil {
				return nil, fmt.Errorf("PROXY v1 header cut short: %w", err)
			}
			hdr = append(hdr, b[0])
		}
	case string(hdr) == proxyV2Sig[:6]:
		hdr = hdr[:16]
		if _, err := readFull(c, hdr[6:]); err != nil {
			return nil, fmt.Errorf("PROXY v2 header cut short: %w", err)
		}
		if string(hdr[:12]) != proxyV2Sig {
			return nil, errors.New("not a PROXY v2 signature")
		}
		n := int(hdr[14])<<8 | int(hdr[15])
		if n > maxProxyV2TL {
			return nil, fmt.Errorf("PROXY v2 header of %d bytes, more than the %d allowed", n, maxProxyV2TL)
		}
		hdr = append(hdr, make([]byte, n)...)
		if _, err := readFull(c, hdr[16:]); err != nil {
			return nil, fmt.Errorf("PROXY v2 header cut short: %w", err)
		}
	default:
		return nil, fmt.Errorf("no PROXY header: the connection starts with %q", hdr)
	}
	h, err := proxyproto.Read(bufio.NewReader(bytes.NewReader(hdr)))
	if err != nil {
		return nil, fmt.Errorf("bad PROXY header: %w", err)
	}
	src, ok := h.SourceAddr.(*net.TCPAddr)
	if h.Command.IsLocal() || !ok || src.IP == nil {
		return &proxied{TCPConn: c, remote: c.RemoteAddr()}, nil
	}
	return &proxied{TCPConn: c, remote: src}, nil
}

// socketOf is the socket under c: a TLS conn's, a proxied one's, a
// transport's (see transport.Listen), or c. It unwraps every layer that
// says what is under it (NetConn), as a transport's conn over TLS has two.
func socketOf(c net.Conn) net.Conn {
	for {
		u, ok := c.(interface{ NetConn() net.Conn })
		if !ok {
			return c
		}
		c = u.NetConn()
	}
}
