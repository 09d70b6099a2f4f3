//go:build !linux

package cli

import "time"

// applySlack does nothing here: timer slack is Linux's.
func applySlack(time.Duration) string { return "" }
