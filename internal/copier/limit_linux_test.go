//go:build linux

package copier

import (
	"testing"
	"time"

	"tcprelay/internal/check"
)

// TestIdleLimitedLinkHoldsNoGoroutine: a limited link parks like any other
// when it has nothing to read: no goroutine, no buffer; and it wakes for
// new bytes.
func TestIdleLimitedLinkHoldsNoGoroutine(t *testing.T) {
	check.Leaks(t)
	r, l := startLimited(t, NewBucket(limitRate), NewBucket(limitRate))
	for round := range 2 {
		exchange1(t, r.clientA, r.clientB, []byte{'a', byte(round)})
		exchange1(t, r.clientB, r.clientA, []byte{'b', byte(round)})
		check.Eventually(t, 5*time.Second, func() error { return idleAndEmpty(l) })
	}
}
