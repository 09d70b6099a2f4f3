//go:build unix

package main

import (
	"os"
	"os/signal"
	"syscall"
)

// notifyReopen relays SIGUSR1, logrotate's signal to reopen a log, to c.
func notifyReopen(c chan<- os.Signal) { signal.Notify(c, syscall.SIGUSR1) }
