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
// ln and waits for every handler. A handler still running after
// handlerGrace fails the test: its conn's peer never ended it (a lost FIN,
// a lost End), which would otherwise hang the test binary until its
// timeout; its conn is then closed, to end it.
func Serve(t testing.TB, ln net.Listener, handle func(net.Conn)) {
	var wg sync.WaitGroup
	var mu sync.Mutex
	open := make(map[net.Conn]struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			open[c] = struct{}{}
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() {
					mu.Lock()
					delete(open, c)
					mu.Unlock()
					c.Close()
				}()
				handle(c)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
			return
		case <-time.After(handlerGrace):
		}
		mu.Lock()
		var stuck []string
		for c := range open {
			stuck = append(stuck, fmt.Sprintf("%v from %v", c.LocalAddr(), c.RemoteAddr()))
			c.Close()
		}
		mu.Unlock()
		t.Errorf("%d handler(s) still running %v after the test ended, on conns whose peer never ended them: %v", len(stuck), handlerGrace, stuck)
		<-done
	})
}

// handlerGrace is how long Serve waits for its handlers once the test has
// ended.
const handlerGrace = 30 * time.Second

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
