package cli

import (
	"os"
	"runtime"
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
	// /proc/self/exe is this very binary even if its file was replaced.
	err := syscall.Exec("/proc/self/exe", os.Args, append(os.Environ(), slackEnv+"=1"))
	return "could not execute itself again with a timer slack of " + d.String() + ": " + err.Error()
}
