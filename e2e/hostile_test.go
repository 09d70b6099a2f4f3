package e2e

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/proto"
	"tcprelay/internal/testutil"
)

// Attacks by one authenticated agent on what the operator relies on: the
// relay's shutdown, its log and its status view.

// TestAgentThatStopsReadingCannotHoldShutdown plays an agent that stops
// reading while the relay answers it: it joins a pool whose name is 16 KB
// long, asks to join it again and again, and reads none of the refusals,
// each of which quotes the name. Once the socket buffers are full, the
// relay's write of a refusal blocks for its 10s write timeout. SIGTERM
// with -drain-timeout 1s must still end the relay within the drain timeout
// plus one second (and a little for the process to exit): the GoAway it
// sends on the way out does not wait for the blocked write. (A flood of
// Pings, whose Pongs block the same way, is cut off by the bound on
// frames before it fills the buffers: 1,000 Pongs are 13 KB.)
func TestAgentThatStopsReadingCannotHoldShutdown(t *testing.T) {
	e := newEnv(t)
	r := e.startRelayWith(nil, nil, "-drain-timeout", "1s")
	a := testutil.NewRawAgentWith(t, net.JoinHostPort("127.0.0.1", strconv.Itoa(r.port)), "", proto.FeaturePool|proto.FeaturePools)
	pool := strings.Repeat("p", proto.DefaultMaxPayload-100)
	a.Send(t, proto.Append(nil, &proto.Listen{ID: 1, Pool: pool}))
	a.Expect(t, proto.TypeListenOK)

	// Requests until the relay stops reading them for a second: its answer
	// is stuck (a pause of the relay's reader alone is shorter).
	again := proto.Append(nil, &proto.Listen{ID: 2, Pool: pool})
	sent, stuck := 0, false
	for start, rest := time.Now(), again; time.Since(start) < 30*time.Second; {
		if len(rest) == 0 {
			rest = again
		}
		a.Conn.SetWriteDeadline(time.Now().Add(time.Second))
		n, err := a.Conn.Write(rest)
		sent, rest = sent+n, rest[n:] // whole frames only: the rest is sent next
		if errors.Is(err, os.ErrDeadlineExceeded) && n == 0 {
			stuck = true // the relay read nothing for a second
			break
		}
		if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("requests: %v after %d bytes; relay stderr:\n%s", err, sent, r.Stderr)
		}
	}
	if !stuck {
		t.Fatalf("the relay kept reading %d bytes of requests for 30s with nobody reading its answers", sent)
	}
	t.Logf("the relay stopped reading after %d requests of %d bytes: its answer is blocked", sent/len(again), len(again))

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

// TestLogFloodByReadyAndListenFrames plays an agent that floods the relay
// with 200,000 control frames that each used to write a log line: Ready
// frames that flip its tunnel's readiness (an INFO line each) and Listen
// requests the relay refuses (a WARN line each). The relay's whole log
// stays under 200 lines, the refusals' lines count every refusal, and the
// session is cut off with an Error that says why.
func TestLogFloodByReadyAndListenFrames(t *testing.T) {
	e := newEnv(t)
	r := e.startRelay(nil)
	a := testutil.NewRawAgent(t, net.JoinHostPort("127.0.0.1", strconv.Itoa(r.port)), "")
	a.Listen(t, 0)
	const tunnel = 1 // the relay numbers a session's tunnels from 1
	const frames = 200000
	var flood []byte
	for i := range frames {
		switch i % 3 {
		case 0, 1:
			flood = proto.Append(flood, &proto.Ready{Tunnel: tunnel, Ready: i%3 == 1})
		default: // refused: a flag no relay knows
			flood = proto.Append(flood, &proto.Listen{ID: uint32(i), Flags: 1 << 31})
		}
	}

	// The agent reads everything the relay answers while it writes.
	a.Conn.SetDeadline(time.Now().Add(60 * time.Second))
	wrote := make(chan error, 1)
	go func() {
		_, err := a.Conn.Write(flood)
		wrote <- err
	}()
	refusals := 0
	var cut *proto.Error
	var readErr error
	for {
		typ, payload, err := proto.ReadFrame(a.Conn, nil, proto.DefaultMaxPayload)
		if err != nil {
			readErr = err
			break
		}
		m, err := proto.Parse(typ, payload)
		if err != nil {
			t.Fatalf("relay sent a bad %s frame: %v", typ, err)
		}
		if m, ok := m.(*proto.Error); ok {
			if m.ID != 0 {
				refusals++
			} else {
				cut = m
			}
		}
	}
	writeErr := <-wrote
	a.Conn.Close()
	t.Logf("agent: %d refusals answered, then %+v and %v; its write of %d frames: %v", refusals, cut, readErr, frames, writeErr)
	if cut == nil || cut.Code != proto.CodeLimit || !strings.Contains(cut.Message, "frames") {
		t.Errorf("session ended with %+v (read: %v), want an Error with code %d (limit) that says the agent sent too many frames", cut, readErr, proto.CodeLimit)
	}
	if !errors.Is(readErr, io.EOF) && !errors.Is(readErr, syscall.ECONNRESET) {
		t.Errorf("after the flood the agent read %v, want the relay to have closed the session", readErr)
	}

	// Every line the relay wrote, including its start and its stop.
	check.Eventually(t, 5*time.Second, func() error {
		if !strings.Contains(r.Stderr.String(), "agent disconnected") {
			return errors.New("relay has not logged the session's end")
		}
		return nil
	})
	r.stop()
	log := r.Stderr.String()
	t.Logf("relay: %s", regexp.MustCompile(`.*msg="agent disconnected".*`).FindString(log))
	lines := strings.Count(log, "\n")
	t.Logf("relay log for %d frames: %d lines, %d bytes:\n%s", frames, lines, len(log), clip(log))
	if lines > 200 {
		t.Errorf("relay wrote %d log lines (%d bytes) for %d frames, want at most 200; first lines:\n%s", lines, len(log), frames, clip(log))
	}
	if n := counted(log, `msg="listen request refused"`); n != refusals {
		t.Errorf("the log counts %d refused listen requests, the agent got %d refusals", n, refusals)
	}
}

// forged is what an agent that wants to mislead the operator calls its
// software and its pool: whole lines of the status view, a fake agent and
// a fake endpoint on port 22.
const forged = "x\nagent evil from 127.0.0.1:1 (evil/1.0), connected 1s ago, 0 parked data connections\n" +
	"endpoint on port 22: 0 connections, 0 waiting\n  member: agent evil tunnel 1, 0 clients"

// TestStatusLinesForgedBySoftwareAndPoolName plays an agent whose Hello
// names its software, and whose Listen names its pool, with line breaks
// and lines of the relay's text view. The operator's views (/status, the
// page at /, /metrics) and the relay's log show them quoted: no line of
// theirs starts with a forged one, and the agent's real entry is there.
func TestStatusLinesForgedBySoftwareAndPoolName(t *testing.T) {
	e := newEnv(t)
	ops := net.JoinHostPort("127.0.0.1", strconv.Itoa(freePort(t)))
	r := e.startRelayWith(nil, nil, "-metrics-addr", ops)

	// The handshake of testutil.NewRawAgent, with a Hello of our own.
	c := testutil.Dial(t, net.JoinHostPort("127.0.0.1", strconv.Itoa(r.port)))
	c.SetDeadline(time.Now().Add(10 * time.Second))
	next := func() proto.Message {
		t.Helper()
		for {
			typ, payload, err := proto.ReadFrame(c, nil, proto.DefaultMaxPayload)
			if err != nil {
				t.Fatalf("read: %v; relay stderr:\n%s", err, r.Stderr)
			}
			m, err := proto.Parse(typ, payload)
			if err != nil {
				t.Fatal(err)
			}
			if _, ok := m.(*proto.PoolKey); !ok {
				return m
			}
		}
	}
	c.Write(append(proto.Preamble(), proto.Append(nil, &proto.Hello{Agent: forged, Features: proto.FeaturePools})...))
	ch, ok := next().(*proto.Challenge)
	if !ok {
		t.Fatal("no challenge")
	}
	c.Write(proto.Append(nil, &proto.Auth{MAC: proto.AuthMAC("", ch.Nonce)}))
	if m := next(); m.Type() != proto.TypeWelcome {
		t.Fatalf("got %s %+v, want Welcome", m.Type(), m)
	}
	c.Write(proto.Append(nil, &proto.Listen{ID: 1, Pool: forged}))
	okm, ok := next().(*proto.ListenOK)
	if !ok {
		t.Fatalf("pool listen refused; relay stderr:\n%s", r.Stderr)
	}

	get := func(path string) string { return opsGet(t, ops, path) }
	forgedLine := regexp.MustCompile(`(?m)^\s*(agent evil|endpoint on port 22|member: agent evil)`)
	for _, view := range []struct{ name, text string }{
		{"/status", get("/status")},
		{"/", get("/")},
		{"/metrics", get("/metrics")},
	} {
		if m := forgedLine.FindString(view.text); m != "" {
			t.Errorf("%s shows a line forged by the agent, %q:\n%s", view.name, m, view.text)
		}
	}
	status := get("/status")
	t.Logf("/status:\n%s", status)
	// Quoted, and cut to 64 bytes.
	if want := "(software " + strconv.Quote(forged[:64]+"...") + ")"; !strings.Contains(status, want) {
		t.Errorf("/status does not show the agent's software quoted, %s; it says:\n%s", want, status)
	}
	if want := fmt.Sprintf("endpoint on port %d", okm.Port); !strings.Contains(status, want) {
		t.Errorf("/status does not show the agent's endpoint (%q):\n%s", want, status)
	}
	r.stop()
	if m := forgedLine.FindString(r.Stderr.String()); m != "" {
		t.Errorf("the relay's log has a line forged by the agent, %q:\n%s", m, r.Stderr)
	}
}
