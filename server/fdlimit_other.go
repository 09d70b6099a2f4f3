//go:build !unix

package server

// fdLimit has no process limit to read here: a budget for a large server.
func fdLimit() int { return 1 << 16 }
