package cli

import (
	"os"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// slackEnv marks the process that applySlack started, so that a kernel
// which did not keep the slack across execve cannot make it loop.
const slackEnv = "TCPRELAY_TIMER_SLACK_SET"

// applySlack gives every thread of the process a timer slack of d: the
// kernel may fire their timers up to d late, to batch wakeups. Go's
// runtime has a monitor thread (sysmon) that, while any goroutine runs,
// sleeps 20 µs at a time; on a busy relay that is tens of thousands of
// wakeups a second, each a context switch. A thread's slack can only be
// set by the thread itself, and the runtime starts that monitor before any
// of our code, so the process sets the slack on the thread it is on and
// executes itself again: threads inherit the slack of the thread that
// made them, and execve keeps it. It returns what it did, for the log.
// It changes nothing if d is 0, if the slack is already d, or if prctl or
// execve fail.
func applySlack(d time.Duration) string {
	if d <= 0 {
		return ""
	}
	if os.Getenv(slackEnv) != "" {
		os.Unsetenv(slackEnv)
		if cur, err := unix.PrctlRetInt(unix.PR_GET_TIMERSLACK, 0, 0, 0, 0); err == nil && time.Duration(cur) != d {
			return "the timer slack did not survive execve: it is " + time.Duration(cur).String()
		}
		return ""
	}
	if cur, err := unix.PrctlRetInt(unix.PR_GET_TIMERSLACK, 0, 0, 0, 0); err != nil || time.Duration(cur) == d {
		return ""
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := unix.Prctl(unix.PR_SET_TIMERSLACK, uintptr(d.Nanoseconds()), 0, 0, 0); err != nil {
		return "could not set the timer slack: " + err.Error()
	}
	err := syscall.Exec(selfPath(), os.Args, append(os.Environ(), slackEnv+"=1"))
	return "could not execute itself again with a timer slack of " + d.String() + ": " + err.Error()
}

// selfPath is the path to execute this binary again by: the one it was
// started by, if that is still this binary, so that the process keeps its
// name (the kernel names a process after the last element of the path it
// executes: through /proc/self/exe every one would be "exe", and pidof
// relay, pkill relay, top would not know it). Else the path of the file
// it was loaded from; and if that file was replaced or removed since,
// /proc/self/exe, which is this very binary still. (A file swapped in
// between the check and execve would run instead: whoever may write
// there could have replaced the binary before it started.)
func selfPath() string {
	const self = "/proc/self/exe"
	me, err := os.Stat(self)
	if err != nil {
		return self
	}
	var paths []string
	if arg0 := os.Args[0]; strings.Contains(arg0, "/") {
		paths = append(paths, arg0)
	} else if p, err := exec.LookPath(arg0); err == nil {
		paths = append(paths, p)
	}
	if p, err := os.Executable(); err == nil {
		paths = append(paths, p)
	}
	for _, p := range paths {
		if fi, err := os.Stat(p); err == nil && os.SameFile(fi, me) {
			return p
		}
	}
	return self
}
