//go:build unix

package main

import "syscall"

// raiseFDLimit raises the soft limit on open files to the hard one, and
// returns the limit in force.
func raiseFDLimit() (int, error) {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return 0, err
	}
	if l.Cur < l.Max {
		l.Cur = l.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
			return 0, err
		}
	}
	return int(min(l.Cur, 1<<30)), nil
}
