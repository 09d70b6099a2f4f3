// Package check holds the test helpers that every package shares and that
// depend on nothing but the standard library, so that even the lowest
// packages (copier, proto) can use them: the leak check and Eventually.
package check

import (
	"bytes"
	"fmt"
	"os"
	"runtime"
	"runtime/pprof"
	"testing"
	"time"
)

// Leaks records the goroutine and open-fd counts now and, when the test
// ends (after cleanups registered later have run), fails the test if they
// do not come back to that baseline within a few seconds. Call it first in
// a test, before anything is started; tests using it must not run in
// parallel.
func Leaks(tb testing.TB) {
	tb.Helper()
	g0, fd0 := runtime.NumGoroutine(), FDs()
	tb.Cleanup(func() {
		if msg := Baseline(g0, fd0, 5*time.Second); msg != "" {
			tb.Error("leak: " + msg)
		}
	})
}

// Baseline waits up to within for the goroutine count to fall to g0 and
// the open-fd count to fd0. It returns "" if they did, else a description
// with every open fd and a goroutine dump.
//
// Each round runs the collector: splice pipes wait in a sync.Pool and are
// closed by a finalizer once the collector drops them, so they are not
// leaks.
func Baseline(g0, fd0 int, within time.Duration) string {
	var g, fd int
	err := poll(within, func() error {
		runtime.GC()
		if g, fd = runtime.NumGoroutine(), FDs(); g > g0 || fd > fd0 {
			return fmt.Errorf("goroutines %d (baseline %d), open fds %d (baseline %d)", g, g0, fd, fd0)
		}
		return nil
	})
	if err == nil {
		return ""
	}
	var buf bytes.Buffer
	fmt.Fprintln(&buf, err)
	if ents, err := os.ReadDir("/proc/self/fd"); err == nil {
		for _, e := range ents {
			target, _ := os.Readlink("/proc/self/fd/" + e.Name())
			fmt.Fprintf(&buf, "  fd %s -> %s\n", e.Name(), target)
		}
	}
	pprof.Lookup("goroutine").WriteTo(&buf, 1)
	return buf.String()
}

// FDs counts this process's open file descriptors, or returns -1 where
// /proc/self/fd does not exist.
func FDs() int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	return len(ents) - 1 // the directory being read
}

// Eventually calls cond every few milliseconds until it returns nil, and
// fails the test with cond's last error if within passes first. Use it for
// what happens on another socket or goroutine with nothing to wait on.
func Eventually(tb testing.TB, within time.Duration, cond func() error) {
	tb.Helper()
	if err := poll(within, cond); err != nil {
		tb.Fatalf("after %v: %v", within, err)
	}
}

func poll(within time.Duration, cond func() error) error {
	deadline := time.Now().Add(within)
	for {
		err := cond()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(5 * time.Millisecond) // a polling interval, not synchronisation
	}
}
