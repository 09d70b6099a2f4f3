package e2e

import (
	"fmt"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/child"
)

// TestExposeHealthCheckPassive: ./expose's health check is passive by
// default. Over 10 s idle a passive agent dials its target not once, an
// active one (-health-check active, every 3 s) about 3 times. When the
// passive agent's target dies, the first client sent to it fails and makes
// the agent unready at once (the relay's /ready/PORT says 503), its log
// names the target and the dial error, and it is ready again, serving
// clients, soon after the target is back.
func TestExposeHealthCheckPassive(t *testing.T) {
	e := newEnv(t)
	maddr := child.Addr(freePort(t))
	r := e.startRelayWith(nil, nil, "-metrics-addr", maddr)
	passive, active := newCountingTarget(t, 0), newCountingTarget(t, 0)
	pa, pubP := e.startExpose("127.0.0.1", r.port, passive.addr)
	_, pubA := e.startExpose("127.0.0.1", r.port, active.addr, "-health-check", "active")
	opsGet(t, maddr, "/status") // the metrics listener is up
	if got := readyCheck(maddr, pubP); got != http.StatusOK {
		t.Fatalf("GET /ready/%d with the target up: %d, want 200", pubP, got)
	}

	// Idle: the window is what is measured, so it is a plain wait.
	p0, a0 := passive.n.Load(), active.n.Load()
	const idle = 10 * time.Second
	time.Sleep(idle)
	p1, a1 := passive.n.Load(), active.n.Load()
	t.Logf("over %v idle: passive agent dialled its target %d times, active agent %d", idle, p1-p0, a1-a0)
	if p1 != p0 {
		t.Errorf("passive health check: %d dials of the target over %v idle, want 0", p1-p0, idle)
	}
	if d := a1 - a0; d < 2 || d > 4 {
		t.Errorf("active health check every 3s: %d dials of the target over %v idle, want about 3", d, idle)
	}

	// The passive agent's target dies: the first client fails, and the
	// agent is unready at once.
	passive.down()
	if err := echoOnce(pubP, []byte("ping"), 5*time.Second); err == nil {
		t.Fatal("a client got an echo from a target that is down")
	}
	downAt := time.Now()
	check.Eventually(t, time.Second, func() error {
		if got := readyCheck(maddr, pubP); got != http.StatusServiceUnavailable {
			return fmt.Errorf("GET /ready/%d after a failed dial of the target: %d, want 503", pubP, got)
		}
		return nil
	})
	t.Logf("unready %v after the first client's failed dial", time.Since(downAt).Round(time.Millisecond))
	if got := readyCheck(maddr, pubA); got != http.StatusOK {
		t.Errorf("GET /ready/%d (the other agent, its target up): %d, want 200", pubA, got)
	}
	msg := regexp.MustCompile(`target down.*target=` + regexp.QuoteMeta(passive.addr) + `.*connection refused`)
	check.Eventually(t, time.Second, func() error {
		if !msg.MatchString(pa.Stderr.String()) {
			return fmt.Errorf("the agent's log does not name the target %s and the dial error:\n%s", passive.addr, pa.Stderr)
		}
		return nil
	})
	// More clients while it is down: the relay refuses them, and the
	// agent's log does not get a line for each.
	for range 10 {
		echoOnce(pubP, []byte("ping"), 5*time.Second)
	}

	// Back: within the probe interval (3 s) and slack, ready and serving.
	passive.up()
	check.Eventually(t, 6*time.Second, func() error {
		if got := readyCheck(maddr, pubP); got != http.StatusOK {
			return fmt.Errorf("GET /ready/%d after the target came back: %d, want 200", pubP, got)
		}
		return nil
	})
	if err := echoOnce(pubP, []byte("ping"), 5*time.Second); err != nil {
		t.Errorf("a client after the target came back: %v", err)
	}
	log := pa.Stderr.String()
	if n := strings.Count(log, "target unreachable"); n != 1 {
		t.Errorf("%d \"target unreachable\" lines for 1 client that reached the agent, want 1:\n%s", n, log)
	}
	if !strings.Contains(log, "target up") {
		t.Errorf("the agent's log does not say the target is up again:\n%s", log)
	}
}

// TestExposeTargetDownAtStart: an agent whose target is down at start says
// so, naming the target and the error, registers unready (the relay's
// /ready/PORT is 503), and is ready once the target answers.
func TestExposeTargetDownAtStart(t *testing.T) {
	e := newEnv(t)
	maddr := child.Addr(freePort(t))
	r := e.startRelayWith(nil, nil, "-metrics-addr", maddr)
	target := newCountingTarget(t, 0)
	target.down()
	p, pub := e.startExpose("127.0.0.1", r.port, target.addr, "-health-interval", "200ms")
	opsGet(t, maddr, "/status")
	if got := readyCheck(maddr, pub); got != http.StatusServiceUnavailable {
		t.Errorf("GET /ready/%d with the target down: %d, want 503", pub, got)
	}
	msg := regexp.MustCompile(`target down at start.*target=` + regexp.QuoteMeta(target.addr) + `.*connection refused`)
	if !msg.MatchString(p.Stderr.String()) {
		t.Errorf("the agent's log does not name the target %s and the dial error at start:\n%s", target.addr, p.Stderr)
	}
	target.up()
	check.Eventually(t, 3*time.Second, func() error {
		if got := readyCheck(maddr, pub); got != http.StatusOK {
			return fmt.Errorf("GET /ready/%d after the target came up: %d, want 200", pub, got)
		}
		return nil
	})
	if err := echoOnce(pub, []byte("ping"), 5*time.Second); err != nil {
		t.Errorf("a client once the target is up: %v", err)
	}
}
