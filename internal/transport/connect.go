package transport

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"
	"unicode"
)

// maxResponseHeader bounds what a proxy may send before its CONNECT answer
// ends: a status line and a few headers.
const maxResponseHeader = 16 << 10

// connect opens a stream to addr through an HTTP CONNECT proxy (RFC 9110
// 9.3.6): one request, one response, then the proxy carries raw bytes.
func (p *proxy) connect(ctx context.Context, addr string) (_ net.Conn, err error) {
	conn, err := p.dial(ctx)
	if err != nil {
		return nil, err
	}
	// Everything below ends at ctx's deadline, or when ctx is cancelled:
	// a silent proxy cannot hold the agent.
	if d, ok := ctx.Deadline(); ok {
		conn.SetDeadline(d)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer func() {
		if !stop() {
			err = fmt.Errorf("proxy %s: CONNECT %s: %w", p.name, addr, context.Cause(ctx))
		}
		if err != nil {
			conn.Close()
		}
	}()
	if p.url.Scheme == "https" {
		cfg := &tls.Config{}
		if p.tls != nil {
			cfg = p.tls.Clone()
		}
		cfg.ServerName = p.url.Hostname()
		tc := tls.Client(conn, cfg)
		if err := tc.HandshakeContext(ctx); err != nil {
			return nil, fmt.Errorf("proxy %s: TLS handshake: %w", p.name, err)
		}
		conn = tc
	}

	req := "CONNECT " + addr + " HTTP/1.1\r\nHost: " + addr + "\r\n"
	if u := p.url.User; u != nil {
		pass, _ := u.Password()
		req += "Proxy-Authorization: Basic " + base64.StdEncoding.EncodeToString([]byte(u.Username()+":"+pass)) + "\r\n"
	}
	req += "\r\n"
	if _, err := io.WriteString(conn, req); err != nil {
		return nil, fmt.Errorf("proxy %s: send CONNECT %s: %w", p.name, addr, err)
	}

	br := bufio.NewReader(conn)
	status, err := readResponse(br)
	if err != nil {
		return nil, fmt.Errorf("proxy %s: CONNECT %s: %w", p.name, addr, err)
	}
	n, _ := strconv.Atoi(status[9:12]) // checked by readResponse
	if n < 200 || n > 299 {
		err := fmt.Errorf("proxy %s refused CONNECT %s: %s", p.name, addr, printable(status[9:]))
		if n == 407 || n == 401 { // tinyproxy answers 401 to a wrong password, 407 to none
			err = fmt.Errorf("%w (%w)", err, ErrProxyAuth)
		}
		return nil, err
	}
	conn.SetDeadline(time.Time{})
	if br.Buffered() > 0 {
		// The proxy sent bytes of the stream with its answer: they are
		// read first.
		return &buffered{Conn: conn, r: br, remote: target(addr)}, nil
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		return &tunneled{tc, target(addr)}, nil
	}
	return &buffered{Conn: conn, r: conn, remote: target(addr)}, nil
}

// readResponse reads a CONNECT response's status line and headers off br,
// at most maxResponseHeader bytes of them, and returns the status line
// once it checked it is HTTP's. It reads nothing past the blank line.
func readResponse(br *bufio.Reader) (string, error) {
	var status string
	total := 0
	for i := 0; ; i++ {
		line, err := br.ReadSlice('\n')
		total += len(line)
		if total > maxResponseHeader {
			return "", fmt.Errorf("answer longer than %d bytes", maxResponseHeader)
		}
		if err != nil && err != bufio.ErrBufferFull {
			if i == 0 && len(line) == 0 {
				return "", fmt.Errorf("no answer: %w", err)
			}
			return "", fmt.Errorf("answer cut short after %q: %w", sample(status, line), err)
		}
		s := strings.TrimRight(string(line), "\r\n")
		if i == 0 {
			if !strings.HasPrefix(s, "HTTP/1.") || len(s) < len("HTTP/1.1 200") || s[8] != ' ' {
				return "", fmt.Errorf("answered %q: not an HTTP proxy", sample("", line))
			}
			if _, err := strconv.Atoi(s[9:12]); err != nil {
				return "", fmt.Errorf("answered %q: not an HTTP proxy", sample("", line))
			}
			status = s
			continue
		}
		if s == "" {
			return status, nil
		}
	}
}

// sample is the start of what a proxy said, for an error message.
func sample(status string, line []byte) string {
	s := status + string(line)
	if len(s) > 64 {
		s = s[:64] + "..."
	}
	return s
}

// printable is what a proxy said, quoted if it holds anything that does
// not print (a newline could forge lines of the agent's log).
func printable(s string) string {
	if strings.ContainsFunc(s, func(r rune) bool { return !unicode.IsPrint(r) }) {
		return strconv.Quote(s)
	}
	return s
}

// buffered is a stream through a proxy whose first bytes came with the
// proxy's answer (r holds them, then reads on), or that runs over TLS to
// the proxy.
type buffered struct {
	net.Conn
	r      io.Reader
	remote net.Addr
}

func (c *buffered) Read(b []byte) (int, error) { return c.r.Read(b) }
func (c *buffered) RemoteAddr() net.Addr       { return c.remote }

// CloseWrite half-closes the stream to the proxy, if the connection to it
// can.
func (c *buffered) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}
