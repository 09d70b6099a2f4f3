package cli

import (
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// A trimmer gives the heap's spare memory back to the kernel once the
// process goes quiet after a burst of work.
//
// Go's collector lets garbage grow to the live heap's size before it
// collects (GOGC=100), and keeps what it freed for the next burst: after a
// burst of new connections, a process holding thousands of idle ones
// stays at about twice its live heap (over TLS, most of an idle
// connection's resident memory). A process that allocates next to nothing
// for a tick (quiet: idle connections, or bytes moved by splice) and holds
// a quarter of its live heap or more (at least 1 MiB) spare, in garbage
// or free pages, collects once and returns every free page. It costs one
// collection per quiet spell that follows a burst, when the CPU has
// nothing else to do. (A floor of 8 MiB left a relay and ./expose holding
// 5,000 idle plain connections some 1.3 KiB each of spare heap: 7.7 KiB
// per connection against 6.4.)
type trimmer struct {
	quiet  uint64 // at most this many bytes allocated in a tick is quiet
	s      []metrics.Sample
	allocs uint64 // allocated in all, at the last tick
}

// trimTick and trimQuiet are the programs' trimmer's: a burst's memory
// goes back within about a second of its end.
const (
	trimTick  = 500 * time.Millisecond
	trimQuiet = 256 << 10
)

func newTrimmer(quiet uint64) *trimmer {
	t := &trimmer{quiet: quiet, s: []metrics.Sample{
		{Name: "/gc/heap/allocs:bytes"},
		{Name: "/gc/heap/live:bytes"},
		{Name: "/memory/classes/heap/objects:bytes"},
		{Name: "/memory/classes/heap/free:bytes"},
	}}
	t.tick()
	return t
}

// tick trims if the process has been quiet since the last tick, and says
// whether it did.
func (t *trimmer) tick() bool {
	metrics.Read(t.s)
	allocs, live, objects, free := t.s[0].Value.Uint64(), t.s[1].Value.Uint64(), t.s[2].Value.Uint64(), t.s[3].Value.Uint64()
	busy := allocs-t.allocs > t.quiet
	t.allocs = allocs
	if busy || objects-min(live, objects)+free < max(1<<20, live/4) {
		return false
	}
	debug.FreeOSMemory()
	metrics.Read(t.s[:1]) // its own allocations are not a burst
	t.allocs = t.s[0].Value.Uint64()
	return true
}

// trimForever ticks every d.
func (t *trimmer) trimForever(d time.Duration) {
	for range time.Tick(d) {
		t.tick()
	}
}
