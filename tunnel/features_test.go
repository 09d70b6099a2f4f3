package tunnel

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/proto"
)

// olderRelay is a relay of this protocol version that announces features
// in its Challenge and then waits for Auth. It returns its address and, on
// got, the Hello each agent sent.
func olderRelay(t *testing.T, features proto.Features) (string, <-chan *proto.Hello) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan *proto.Hello, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		pre := make([]byte, proto.PreambleLen)
		if _, err := c.Read(pre); err != nil || proto.CheckPreamble(pre) != nil {
			return
		}
		m, err := proto.ReadMessage(c, proto.MaxPreAuthPayload)
		if err != nil {
			return
		}
		got <- m.(*proto.Hello)
		c.Write(proto.Append(nil, &proto.Challenge{Features: features}))
		proto.ReadMessage(c, proto.MaxPreAuthPayload) // the agent should not answer
	}()
	t.Cleanup(func() { ln.Close(); <-done })
	return ln.Addr().String(), got
}

// TestRelayWithoutNeededFeature: an agent that needs a feature the relay
// does not announce stops at the Challenge with an error that names the
// feature and says to upgrade the relay, instead of a timeout or a
// silent misbehaviour.
func TestRelayWithoutNeededFeature(t *testing.T) {
	check.Leaks(t)
	addr, hellos := olderRelay(t, 0)
	cfg := Config{require: proto.FeaturePool, DialTimeout: 5 * time.Second}
	start := time.Now()
	_, err := cfg.Listen(context.Background(), addr)
	if !errors.Is(err, ErrUnsupported) || !strings.Contains(err.Error(), "relay does not support pool: upgrade the relay") {
		t.Fatalf("Listen: %v; want ErrUnsupported naming the feature", err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("the error took %v: it should come with the Challenge, not a timeout", took)
	}
	if h := <-hellos; h.Features&proto.FeaturePool == 0 {
		t.Errorf("Hello announced features %v, want pool among them", h.Features)
	}
}

// TestRelayWordsCannotForgeLogLines: what a relay says goes into the
// agent's errors and log lines; a newline in it could forge a line, so it
// is quoted, and a long message is cut.
func TestRelayWordsCannotForgeLogLines(t *testing.T) {
	forged := "port 8081 is in use\ntime=2026-01-01 level=INFO msg=\"registered with the relay\" public=evil:22"
	err := relayError(&proto.Error{Code: proto.CodePortUnavailable, Message: forged})
	if strings.Contains(err.Error(), "\n") || !strings.Contains(err.Error(), `\n`) {
		t.Errorf("a relay's message with a newline: %q, want it quoted", err)
	}
	if got := relayError(&proto.Error{Code: proto.CodeLimit, Message: "relay busy"}).Error(); !strings.HasSuffix(got, ": relay says: relay busy") {
		t.Errorf("a plain message: %q, want it as it is", got)
	}
	if got := relayWords(strings.Repeat("x", 10000)); len(got) > 300 {
		t.Errorf("a 10,000-byte message became %d bytes, want it cut", len(got))
	}
}
