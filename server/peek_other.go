//go:build !unix

package server

// peek cannot look at a socket here: every parked connection is assumed
// idle, and a dead one costs its client a failed connection.
func peek(fd uintptr) error { return nil }
