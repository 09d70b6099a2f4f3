package server

import (
	"testing"
	"time"
)

// TestFrameBucket: a session may send frameBurst frames at once, then
// frameRate a second; the frame past either is refused.
func TestFrameBucket(t *testing.T) {
	now := time.Now()
	b := frameBucket{tokens: frameBurst, last: now}
	for i := range frameBurst {
		if !b.take(now) {
			t.Fatalf("frame %d of a burst of %d refused", i+1, frameBurst)
		}
	}
	if b.take(now) {
		t.Fatalf("frame %d at once admitted, want the burst bounded to %d", frameBurst+1, frameBurst)
	}
	now = now.Add(time.Second)
	for i := range frameRate {
		if !b.take(now) {
			t.Fatalf("frame %d of the %d a second refused", i+1, frameRate)
		}
	}
	if b.take(now) {
		t.Fatalf("frame %d in a second admitted after the burst, want %d", frameRate+1, frameRate)
	}
	// An honest agent's pace (a frame every few seconds) never runs out.
	for range 10 * frameBurst {
		now = now.Add(time.Second)
		if !b.take(now) {
			t.Fatal("a frame a second refused")
		}
	}
}
