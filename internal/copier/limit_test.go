package copier

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"runtime"
	"testing"
	"time"

	"tcprelay/internal/check"
)

// limitRate is the rate of the tests' buckets: 4 MB/s, so that two seconds'
// worth (8 MB) is bounded and long enough to measure within 10%.
const limitRate = 4_000_000

// startLimited is startLink with NewLimited.
func startLimited(tb testing.TB, aToB, bToA *Bucket) (*relay, *Link) {
	tb.Helper()
	r := &relay{res: make(chan Result, 1)}
	r.clientA, r.a = tcpPair(tb)
	r.b, r.clientB = tcpPair(tb)
	l := NewLimited(r.a, r.b, aToB, bToA, func(_ *Link, res Result) { r.res <- res })
	l.Start()
	tb.Cleanup(func() {
		l.Close()
		select {
		case <-r.res:
		case <-time.After(timeout):
			tb.Error("link did not end after Close")
		}
	})
	return r, l
}

// send writes n bytes to from, half-closes it, and reports on the channel
// how long the bytes took to reach to (read to EOF) and whether they
// arrived whole, measured from the call.
type sent struct {
	took time.Duration
	err  error
}

func send(from, to *net.TCPConn, n int, seed uint64) <-chan sent {
	data := randomBytes(n, seed)
	start := time.Now()
	done := make(chan sent, 2) // the writer's error, if any, and the reader's result
	go func() {
		_, err := from.Write(data)
		if err == nil {
			err = from.CloseWrite()
		}
		if err != nil {
			done <- sent{err: err}
		}
	}()
	go func() {
		// Checked as it comes, into a small buffer: io.ReadAll's growing
		// slice costs, under -race, a tenth of a second that is not the
		// link's.
		to.SetReadDeadline(time.Now().Add(3 * timeout))
		buf := make([]byte, 64<<10)
		var got int
		for {
			k, err := to.Read(buf)
			if k > 0 && (got+k > len(data) || !bytes.Equal(buf[:k], data[got:got+k])) {
				done <- sent{err: fmt.Errorf("bytes %d-%d differ from those sent, or are too many", got, got+k)}
				return
			}
			got += k
			if err == io.EOF && got == len(data) {
				done <- sent{took: time.Since(start)}
				return
			}
			if err != nil {
				done <- sent{err: fmt.Errorf("after %d of %d bytes: %w", got, len(data), err)}
				return
			}
		}
	}()
	return done
}

// wantRate checks that n bytes through a fresh bucket of rate took what
// the bucket allows: its burst at once, the rest at the rate, within 10%.
func wantRate(t *testing.T, what string, n int, rate int64, took time.Duration) {
	t.Helper()
	burst := NewBucket(rate).burst
	want := time.Duration((float64(n) - burst) / float64(rate) * float64(time.Second))
	got := (float64(n) - burst) / took.Seconds()
	t.Logf("%s: %d bytes in %v, %.2f MB/s after the burst of %.0f bytes (limit %.2f MB/s)",
		what, n, took.Round(time.Millisecond), got/1e6, burst, float64(rate)/1e6)
	if took < want*9/10 || took > want*11/10 {
		t.Errorf("%s: %d bytes took %v, want %v within 10%% (%.2f MB/s, limit %.2f MB/s)",
			what, n, took.Round(time.Millisecond), want.Round(time.Millisecond), got/1e6, float64(rate)/1e6)
	}
}

// TestLimitedDirectionMovesAtRate: a direction with a Bucket delivers at
// its rate, and the other direction, at the same time, is not held back
// by it: unlimited, it still splices and finishes long before; with its
// own bucket, it keeps its own rate.
func TestLimitedDirectionMovesAtRate(t *testing.T) {
	check.Leaks(t)
	const n = 2 * limitRate
	t.Run("other direction unlimited", func(t *testing.T) {
		r, l := startLimited(t, NewBucket(limitRate), nil)
		if ab, ba := l.Spliced(); ab || (runtime.GOOS == "linux" && !ba) {
			t.Errorf("Spliced() = %v, %v; want false for the limited direction, true for the other", ab, ba)
		}
		limited := send(r.clientA, r.clientB, n, 1)
		free := send(r.clientB, r.clientA, n, 2)
		f := <-free
		if f.err != nil {
			t.Fatalf("unlimited direction: %v", f.err)
		}
		s := <-limited
		if s.err != nil {
			t.Fatalf("limited direction: %v", s.err)
		}
		wantRate(t, "a→b limited", n, limitRate, s.took)
		t.Logf("b→a unlimited, at the same time: %d bytes in %v", n, f.took.Round(time.Millisecond))
		if f.took > s.took/4 {
			t.Errorf("the unlimited direction took %v, the limited one %v: want it at least 4 times as fast", f.took, s.took)
		}
		if res := r.result(t); res.Err != nil || res.AToB != n || res.BToA != n {
			t.Errorf("Result %+v, want %d bytes each way and no error", res, n)
		}
	})
	t.Run("each direction its own bucket", func(t *testing.T) {
		r, _ := startLimited(t, NewBucket(limitRate), NewBucket(limitRate/2))
		ab := send(r.clientA, r.clientB, n, 3)
		ba := send(r.clientB, r.clientA, n/2, 4)
		for _, d := range []struct {
			name string
			ch   <-chan sent
			n    int
			rate int64
		}{{"a→b", ab, n, limitRate}, {"b→a", ba, n / 2, limitRate / 2}} {
			s := <-d.ch
			if s.err != nil {
				t.Fatalf("%s: %v", d.name, s.err)
			}
			wantRate(t, d.name, d.n, d.rate, s.took)
		}
	})
}

// notSocket hides a TCP conn's descriptor, as a TLS conn would: the
// Link copies it through a buffer, not the splicer.
type notSocket struct{ net.Conn }

func (c notSocket) CloseWrite() error { return c.Conn.(*net.TCPConn).CloseWrite() }

// TestLimitedWithoutSockets: a limited direction between conns that are not
// sockets (TLS) keeps its rate too.
func TestLimitedWithoutSockets(t *testing.T) {
	check.Leaks(t)
	const n = limitRate // a second's worth
	r := &relay{res: make(chan Result, 1)}
	r.clientA, r.a = tcpPair(t)
	r.b, r.clientB = tcpPair(t)
	l := NewLimited(notSocket{r.a}, notSocket{r.b}, NewBucket(limitRate), nil, func(_ *Link, res Result) { r.res <- res })
	if ab, ba := l.Spliced(); ab || ba {
		t.Errorf("Spliced() = %v, %v between conns that are not sockets; want false, false", ab, ba)
	}
	l.Start()
	t.Cleanup(func() { l.Close(); <-r.res })
	s := <-send(r.clientA, r.clientB, n, 8)
	if s.err != nil {
		t.Fatal(s.err)
	}
	wantRate(t, "a→b limited, through a buffer", n, limitRate, s.took)
}

// TestLinksShareTheirBucket: two links given the same Bucket move, together,
// at its rate: each at about half of it.
func TestLinksShareTheirBucket(t *testing.T) {
	check.Leaks(t)
	const n = limitRate // per link: two seconds' worth for both
	b := NewBucket(limitRate)
	r1, _ := startLimited(t, b, nil)
	r2, _ := startLimited(t, b, nil)
	start := time.Now()
	c1 := send(r1.clientA, r1.clientB, n, 5)
	c2 := send(r2.clientA, r2.clientB, n, 6)
	var last time.Duration
	for i, ch := range []<-chan sent{c1, c2} {
		s := <-ch
		if s.err != nil {
			t.Fatalf("link %d: %v", i+1, s.err)
		}
		t.Logf("link %d: %d bytes in %v", i+1, n, s.took.Round(time.Millisecond))
		if s.took < last*8/10 {
			t.Errorf("link %d took %v, the other %v: want them to share the rate evenly", i+1, s.took, last)
		}
		last = max(last, s.took)
	}
	wantRate(t, "both links together", 2*n, limitRate, time.Since(start))
}

// TestSetRateAppliesToLiveLinks: a rate changed while a link runs applies
// to it at once.
func TestSetRateAppliesToLiveLinks(t *testing.T) {
	check.Leaks(t)
	b := NewBucket(limitRate / 4) // 1 MB/s
	r, l := startLimited(t, b, nil)
	const n = 3 * limitRate
	ch := send(r.clientA, r.clientB, n, 7)
	// Raise it once a first share has gone at the old rate.
	check.Eventually(t, timeout, func() error {
		if ab, _ := l.Progress(); ab < limitRate/4 {
			return fmt.Errorf("%d bytes moved", ab)
		}
		return nil
	})
	raised := time.Now()
	b.SetRate(3 * limitRate)
	s := <-ch
	if s.err != nil {
		t.Fatal(s.err)
	}
	// The rest (less than n) at 12 MB/s: under a second and a half even
	// with the burst left out, against 11 s at the old rate.
	if took := time.Since(raised); took > 1500*time.Millisecond {
		t.Errorf("after SetRate(12 MB/s), the rest of %d bytes took %v: the new rate did not apply", n, took)
	}
}
