package e2e

import (
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// threadSlacks returns the timer slack of each of pid's threads, in ns.
func threadSlacks(t *testing.T, pid int) []int {
	t.Helper()
	tasks, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/task")
	if err != nil {
		t.Fatal(err)
	}
	var slacks []int
	for _, task := range tasks {
		b, err := os.ReadFile("/proc/" + task.Name() + "/timerslack_ns")
		if os.IsNotExist(err) {
			continue // the thread ended
		}
		if err != nil {
			t.Fatal(err)
		}
		n, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil {
			t.Fatal(err)
		}
		slacks = append(slacks, n)
	}
	return slacks
}

// TestTimerSlack: the relay and the agents run every thread with a timer
// slack of 1 ms by default (they execute themselves again to get it), with
// the same pid and name, working as before; -timer-slack 0 leaves the slack they
// were started with; a negative one is a usage error.
func TestTimerSlack(t *testing.T) {
	if _, err := os.Stat("/proc/self/timerslack_ns"); err != nil {
		t.Skipf("no timerslack_ns here: %v", err)
	}
	own := threadSlacks(t, os.Getpid())[0]
	if own == int(time.Millisecond) {
		t.Skip("this test process already runs with a 1 ms slack: nothing to tell apart")
	}
	e := newEnv(t)
	r := e.startRelay(nil)
	a, pub := e.startEcho("127.0.0.1", r.port)
	x, _ := e.startExpose("127.0.0.1", r.port, "127.0.0.1:"+strconv.Itoa(pub))
	for i, p := range []*proc{r.proc, a, x} {
		// Executed again by its own path, it keeps its name: pidof relay,
		// pkill expose and top know it (through /proc/self/exe it was "exe").
		name := []string{"relay", "echoserver", "expose"}[i]
		if comm, err := os.ReadFile("/proc/" + strconv.Itoa(p.Pid()) + "/comm"); err != nil || strings.TrimSpace(string(comm)) != name {
			t.Errorf("%s: /proc/%d/comm is %q (%v), want %q", p, p.Pid(), comm, err, name)
		}
		s := threadSlacks(t, p.Pid())
		t.Logf("%s (pid %d): %d threads, slacks %v ns", p, p.Pid(), len(s), s)
		for _, v := range s {
			if v != int(time.Millisecond) {
				t.Errorf("%s: a thread has a timer slack of %d ns, want 1 ms on every thread", p, v)
			}
		}
		if strings.Contains(p.Stderr.String(), "timer slack") {
			t.Errorf("%s logged about its timer slack:\n%s", p, p.Stderr)
		}
	}
	e.ncEcho("127.0.0.1", pub, []byte("through a relay with a 1 ms timer slack\n"))

	r0 := e.startRelayWith(nil, nil, "-timer-slack", "0")
	for _, v := range threadSlacks(t, r0.Pid()) {
		if v != own {
			t.Errorf("relay -timer-slack 0: a thread has a slack of %d ns, want this test's own, %d", v, own)
		}
	}

	bad := e.run(relayBin, []string{"-timer-slack", "-1ms", "8080"}, nil)
	if bad.ExitCode() != 2 || !strings.Contains(bad.Stderr.String(), "bad -timer-slack -1ms") {
		t.Errorf("relay -timer-slack -1ms: %s, stderr %q; want exit 2 naming the flag", bad.Status(), bad.Stderr)
	}
}
