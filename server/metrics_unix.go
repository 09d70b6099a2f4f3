//go:build unix

package server

import "syscall"

// cpuSeconds is the user and system CPU time the process has used.
func cpuSeconds() (float64, bool) {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0, false
	}
	sec := func(tv syscall.Timeval) float64 { return float64(tv.Sec) + float64(tv.Usec)/1e6 }
	return sec(ru.Utime) + sec(ru.Stime), true
}

// maxFDs is the soft limit on open files (RLIMIT_NOFILE); false if
// unlimited.
func maxFDs() (float64, bool) {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil || uint64(l.Cur) >= 1<<62 { // RLIM_INFINITY: unlimited
		return 0, false
	}
	return float64(l.Cur), true
}
