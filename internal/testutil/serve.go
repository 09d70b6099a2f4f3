package testutil

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// Serve accepts on ln until it is closed, running handle for each conn in its
// own goroutine and closing the conn after it. When the test ends it closes
// ln and waits for every handler.
func Serve(t testing.TB, ln net.Listener, handle func(net.Conn)) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				handle(c)
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); wg.Wait() })
}

// Echo writes back everything it reads and half-closes after the peer does.
func Echo(c net.Conn) {
	if _, err := io.Copy(c, c); err == nil {
		c.(interface{ CloseWrite() error }).CloseWrite()
	}
}

// LockedBuffer is a bytes.Buffer that one goroutine may read while others
// write, e.g. to collect logs or a process's output.
type LockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *LockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *LockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Bytes returns a copy of the contents.
func (l *LockedBuffer) Bytes() []byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	return bytes.Clone(l.b.Bytes())
}

// EchoCheck sends data to the echo server at addr while reading the echo at
// the same time, half-closes, and checks that exactly data comes back before
// EOF, all within d.
func EchoCheck(addr string, data []byte, d time.Duration) error {
	c, err := net.DialTimeout("tcp", addr, d)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(d))
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		if err == nil {
			err = c.(*net.TCPConn).CloseWrite()
		}
		werr <- err
	}()
	got, rerr := io.ReadAll(c)
	if err := <-werr; err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if rerr != nil {
		return fmt.Errorf("read after %d bytes: %w", len(got), rerr)
	}
	if !bytes.Equal(got, data) {
		n := min(len(got), len(data))
		i := n
		for j := range n {
			if got[j] != data[j] {
				i = j
				break
			}
		}
		return fmt.Errorf("echoed %d bytes, sent %d; first difference at byte %d", len(got), len(data), i)
	}
	return nil
}
