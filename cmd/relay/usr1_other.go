//go:build !unix

package main

import "os"

// notifyReopen: there is no SIGUSR1 here; the access log is never
// reopened.
func notifyReopen(c chan<- os.Signal) {}
