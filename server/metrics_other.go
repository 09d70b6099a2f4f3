//go:build !unix

package server

// cpuSeconds and maxFDs have nothing to read outside Unix: their metrics
// are left out.
func cpuSeconds() (float64, bool) { return 0, false }

func maxFDs() (float64, bool) { return 0, false }
