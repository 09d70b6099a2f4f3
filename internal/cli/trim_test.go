package cli

import (
	"runtime"
	"runtime/metrics"
	"testing"
)

// After a burst, the first quiet tick gives the burst's memory back, and
// the next one has nothing to do: after a big burst over a big live heap,
// and after a small one over a small heap (a relay holding a few thousand
// idle plain connections: some 10 MiB live, a few MiB spare).
func TestTrimmerReturnsABurstsMemory(t *testing.T) {
	for _, tc := range []struct {
		name                 string
		live, garbage, least int // MiB
	}{
		{"small", 2, 8, 1},
		{"big", 16, 64, 8},
	} {
		t.Run(tc.name, func(t *testing.T) {
			runtime.GC()
			released := func() uint64 {
				s := []metrics.Sample{{Name: "/memory/classes/heap/released:bytes"}}
				metrics.Read(s)
				return s[0].Value.Uint64()
			}
			keep := make([][]byte, 0, tc.live<<10)
			for range tc.live << 10 { // live, in 1 KiB pieces
				keep = append(keep, make([]byte, 1024))
			}
			tr := newTrimmer(256 << 10)
			var sink []byte
			for range tc.garbage << 10 { // the burst
				sink = make([]byte, 1024)
			}
			_ = sink
			if tr.tick() {
				t.Fatalf("trimmed right after a burst of %d MiB: that tick was not quiet", tc.garbage)
			}
			before := released()
			if !tr.tick() {
				t.Fatal("a quiet tick after the burst did not trim")
			}
			if got := released() - before; got < uint64(tc.least)<<20 {
				t.Errorf("the trim gave back %d KiB; want at least %d MiB", got>>10, tc.least)
			}
			if tr.tick() {
				t.Error("trimmed again with nothing spare")
			}
			runtime.KeepAlive(keep)
		})
	}
}
