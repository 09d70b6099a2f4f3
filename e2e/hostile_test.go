package e2e

import (
	"errors"
	"net"
	"os"
	"strconv"
	"testing"
	"time"

	"tcprelay/internal/proto"
	"tcprelay/internal/testutil"
)

// Attacks by one authenticated agent on what the operator relies on: the
// relay's shutdown, its log and its status view.

// TestAgentThatStopsReadingCannotHoldShutdown plays an agent that floods
// Pings and never reads the Pongs: once the socket buffers are full, the
// relay's Pong write blocks for its 10s write timeout. SIGTERM with
// -drain-timeout 1s must still end the relay within the drain timeout plus
// one second (and a little for the process to exit): the GoAway it sends on
// the way out does not wait for the blocked Pong.
func TestAgentThatStopsReadingCannotHoldShutdown(t *testing.T) {
	e := newEnv(t)
	r := e.startRelayWith(nil, nil, "-drain-timeout", "1s")
	a := testutil.NewRawAgent(t, net.JoinHostPort("127.0.0.1", strconv.Itoa(r.port)), "")

	// Pings until the relay stops reading them for a second: its Pong is stuck
	// (a pause of the relay's reader alone is shorter).
	var batch []byte
	for i := range 4096 {
		batch = proto.Append(batch, &proto.Ping{Data: uint64(i)})
	}
	sent, stuck := 0, false
	for start, rest := time.Now(), batch; time.Since(start) < 30*time.Second; {
		if len(rest) == 0 {
			rest = batch
		}
		a.Conn.SetWriteDeadline(time.Now().Add(time.Second))
		n, err := a.Conn.Write(rest)
		sent, rest = sent+n, rest[n:] // whole frames only: the rest is sent next
		if errors.Is(err, os.ErrDeadlineExceeded) && n == 0 {
			stuck = true // the relay read nothing for a second
			break
		}
		if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("ping flood: %v after %d bytes; relay stderr:\n%s", err, sent, r.Stderr)
		}
	}
	if !stuck {
		t.Fatalf("the relay kept reading %d bytes of Pings for 30s with nobody reading its Pongs", sent)
	}
	t.Logf("the relay stopped reading after %d bytes of Pings (%d Pings): its Pong write is blocked", sent, sent/len(proto.Append(nil, &proto.Ping{})))

	termAt := time.Now()
	r.sigterm()
	const bound = time.Second + time.Second + 500*time.Millisecond // drain + 1s + process exit
	if !r.Wait(15 * time.Second) {
		t.Fatalf("relay still running 15s after SIGTERM; stderr:\n%s", r.Stderr)
	}
	took := time.Since(termAt)
	t.Logf("relay exited %v after SIGTERM (-drain-timeout 1s), %s", took.Round(time.Millisecond), r.Status())
	if took > bound {
		t.Errorf("relay exited %v after SIGTERM, want within %v (drain timeout 1s + 1s); stderr:\n%s", took.Round(time.Millisecond), bound, r.Stderr)
	}
	if r.ExitCode() != 0 {
		t.Errorf("relay: %s after SIGTERM, want exit status 0; stderr:\n%s", r.Status(), r.Stderr)
	}
}
