package copier

import (
	"net"
	"sync"
	"time"
)

// A Bucket bounds the bytes per second that the directions sharing it
// deliver, together: a token bucket, filled at the rate up to its burst.
// A direction that takes more than the bucket holds runs into debt and
// waits until the debt is paid, so waiters are served in the order they
// asked and the rate holds however many directions share the bucket.
//
// A Bucket is safe for concurrent use; SetRate applies at once to every
// direction that uses it, including those waiting.
//
// It is a dozen lines rather than golang.org/x/time/rate's Limiter: the
// copier needs a wait that a Link's Close ends (a channel, not a context
// per link) and nothing else of that package.
type Bucket struct {
	mu     sync.Mutex
	rate   float64 // bytes per second; 0: unlimited
	burst  float64 // most tokens the bucket holds
	tokens float64 // below 0: a debt that waiters are paying
	last   time.Time
}

// Chunk is the most a limited direction takes from its bucket at once: it
// moves its bytes through a buffer of this size. Every burst is at least
// this large, so one chunk never waits for more than the bucket holds.
const Chunk = 32 << 10

// minBurst is the least burst a Bucket has: two chunks, so that a
// direction woken a little late by its timer still finds a chunk's tokens.
const minBurst = 2 * Chunk

// NewBucket returns a bucket of rate bytes per second (0: unlimited),
// full.
func NewBucket(rate int64) *Bucket {
	b := &Bucket{}
	b.SetRate(rate)
	b.tokens = b.burst
	return b
}

// SetRate changes the rate (0: unlimited). The burst is a tenth of a
// second's worth of bytes, and at least two chunks (64 KiB): a new link of
// an idle tenant starts that much ahead of the rate, and no more.
func (b *Bucket) SetRate(rate int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.refillLocked(time.Now())
	b.rate = max(float64(rate), 0)
	b.burst = max(b.rate/10, minBurst)
	if b.rate == 0 {
		b.tokens = b.burst // no debt survives the limit
	}
	b.tokens = min(b.tokens, b.burst)
}

// Rate returns the bucket's rate in bytes per second (0: unlimited).
func (b *Bucket) Rate() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return int64(b.rate)
}

func (b *Bucket) refillLocked(now time.Time) {
	if !b.last.IsZero() && b.rate > 0 {
		b.tokens = min(b.burst, b.tokens+now.Sub(b.last).Seconds()*b.rate)
	}
	b.last = now
}

// reserve takes n tokens and returns how long to wait before using them.
func (b *Bucket) reserve(n int64) time.Duration {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.rate == 0 {
		return 0
	}
	b.refillLocked(time.Now())
	b.tokens -= float64(n)
	if b.tokens >= 0 {
		return 0
	}
	return time.Duration(-b.tokens / b.rate * float64(time.Second))
}

// wait takes n tokens, waiting for them until they are there or stop is
// closed (net.ErrClosed: the Link has failed, and recorded why). A nil
// bucket never waits.
func (b *Bucket) wait(n int64, stop <-chan struct{}) error {
	if b == nil {
		return nil
	}
	d := b.reserve(n)
	if d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-stop:
		return net.ErrClosed
	}
}
