package cli

import (
	"runtime"
	"runtime/metrics"
	"testing"
)

// After a burst, the first quiet tick gives the burst's memory back, and
// the next one has nothing to do.
func TestTrimmerReturnsABurstsMemory(t *testing.T) {
	released := func() uint64 {
		s := []metrics.Sample{{Name: "/memory/classes/heap/released:bytes"}}
		metrics.Read(s)
		return s[0].Value.Uint64()
	}
	keep := make([][]byte, 0, 1<<14)
	for range 1 << 14 { // 16 MiB live, in 1 KiB pieces
		keep = append(keep, make([]byte, 1024))
	}
	tr := newTrimmer(256 << 10)
	var sink []byte
	for range 1 << 16 { // a burst: 64 MiB of garbage
		sink = make([]byte, 1024)
	}
	_ = sink
	if tr.tick() {
		t.Fatal("trimmed right after a burst of 64 MiB: that tick was not quiet")
	}
	before := released()
	if !tr.tick() {
		t.Fatal("a quiet tick after the burst did not trim")
	}
	if got := released() - before; got < 8<<20 {
		t.Errorf("the trim gave back %d MiB; want at least 8 (a collection keeps up to 16 MiB of the burst's for the next)", got>>20)
	}
	if tr.tick() {
		t.Error("trimmed again with nothing spare")
	}
	runtime.KeepAlive(keep)
}
