//go:build unix

package server

import "syscall"

// fdLimit is the process's limit on open files (the soft RLIMIT_NOFILE).
func fdLimit() int {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil || l.Cur > 1<<30 {
		return 1 << 20
	}
	return int(l.Cur)
}
