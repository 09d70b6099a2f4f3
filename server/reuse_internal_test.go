package server

import (
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/proto"
)

// TestCountedEndOutlivesItsSession: a client's stream that ends as its
// agent's session ends still ends at the agent, with a FIN, whichever of
// the two the relay sees first. The End it would have sent may never be
// read: the agent has left its control connection. Found in CI, where a
// test's agent hung for ten minutes on a client that had closed: the
// session's end had looked for a sent End just before CloseWrite sent it.
func TestCountedEndOutlivesItsSession(t *testing.T) {
	check.Leaks(t)
	for _, tc := range []struct {
		name string
		// end plays the session's end (lost) around a CloseWrite that
		// is under way: its End half written to ctl (the agent's end of
		// the control connection, synchronous), blocked there until
		// drain is called.
		end func(c *counted, ctl net.Conn, drain func())
	}{
		{"lost before the End is sent", nil},
		{"lost while the End is sent", func(c *counted, ctl net.Conn, drain func()) {
			if _, err := io.ReadFull(ctl, make([]byte, 1)); err != nil {
				t.Errorf("reading the start of the End: %v", err)
			}
			c.lost()
			drain()
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			relayData, agentData := tcpPair(t)
			relayCtl, agentCtl := net.Pipe()
			defer relayCtl.Close()
			defer agentCtl.Close()

			ss := &session{ctl: proto.NewConn(relayCtl, 5*time.Second, proto.DefaultMaxPayload)}
			c := &counted{Conn: relayData, ss: ss, seq: 7}
			drained := make(chan struct{})
			drain := func() {
				go func() {
					defer close(drained)
					io.Copy(io.Discard, agentCtl)
				}()
			}
			if tc.end == nil {
				c.lost()
				drain()
				if err := c.CloseWrite(); err != nil {
					t.Fatalf("CloseWrite: %v", err)
				}
			} else {
				wrote := make(chan error, 1)
				go func() { wrote <- c.CloseWrite() }()
				tc.end(c, agentCtl, drain)
				if err := <-wrote; err != nil {
					t.Fatalf("CloseWrite: %v", err)
				}
			}

			agentData.SetReadDeadline(time.Now().Add(5 * time.Second))
			n, err := agentData.Read(make([]byte, 1))
			if errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatal("the agent's data connection got no FIN: its client's end is lost with the session")
			}
			if n != 0 || err != io.EOF {
				t.Fatalf("agent's data connection: read %d, %v; want EOF", n, err)
			}
			relayCtl.Close()
			<-drained
		})
	}
}
