package server

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// quietLog writes at most one line per second for each kind of event (a
// flood of garbage, of refused clients, an agent's requests), and every
// line says how many events it stands for, so the counts in the log add up
// to the metrics. The relay has one for the events of strangers, and each
// agent session one for the events of its requests.
// Events that come in between are counted and written one second after
// the line before, even if no event follows them.
type quietLog struct {
	log *slog.Logger
	wg  *sync.WaitGroup // the Server's: a pending line is a goroutine of its

	mu    sync.Mutex
	kinds map[string]*quietKind
	done  bool
}

type quietKind struct {
	level slog.Level
	last  time.Time   // when the last line was written
	n     int         // events since
	args  []any       // the last of them
	timer *time.Timer // writes the count that is left
}

const quietEvery = time.Second

// Warn logs msg at level WARN for one event of its kind (msg itself), or
// counts it for the next line.
func (q *quietLog) Warn(msg string, args ...any) { q.event(slog.LevelWarn, msg, args) }

// Info is Warn at level INFO.
func (q *quietLog) Info(msg string, args ...any) { q.event(slog.LevelInfo, msg, args) }

// event counts one event of kind msg. It never writes itself: a line is
// written by a timer's goroutine, at once for the first event of a kind
// and then at most once every quietEvery, so a caller on the accept loop
// is never held up by the log's output, even a stuck one.
func (q *quietLog) event(level slog.Level, msg string, args []any) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.done {
		return
	}
	if q.kinds == nil {
		q.kinds = make(map[string]*quietKind)
	}
	k := q.kinds[msg]
	if k == nil {
		k = &quietKind{level: level}
		q.kinds[msg] = k
	}
	k.n++
	k.args = args
	q.armLocked(msg, k)
}

// armLocked has k's count written when its turn comes, unless that is
// arranged already: one timer per kind, held from arming until its line is
// written.
func (q *quietLog) armLocked(msg string, k *quietKind) {
	if k.timer != nil {
		return
	}
	q.wg.Add(1)
	k.timer = time.AfterFunc(max(quietEvery-time.Since(k.last), 0), func() {
		defer q.wg.Done()
		q.write(msg, k)
	})
}

// write writes k's count, outside q.mu, and arms the next line if events
// came while it wrote; once the log is flushed, it writes them too.
func (q *quietLog) write(msg string, k *quietKind) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for k.n > 0 {
		n, args := k.n, k.args
		k.n, k.last = 0, time.Now()
		q.mu.Unlock()
		q.log.Log(context.Background(), k.level, msg, append(withoutNil(args), "count", n)...)
		q.mu.Lock()
		if !q.done {
			break
		}
	}
	k.timer = nil
	if k.n > 0 {
		q.armLocked(msg, k)
	}
}

// flush writes every count left and stops. A line being written by a
// timer's goroutine is left to it.
func (q *quietLog) flush() {
	q.mu.Lock()
	q.done = true
	var left []string
	for msg, k := range q.kinds {
		if k.timer != nil && k.timer.Stop() {
			k.timer = nil
			q.wg.Done()
		}
		if k.timer == nil && k.n > 0 {
			left = append(left, msg)
		}
	}
	q.mu.Unlock()
	for _, msg := range left {
		q.write(msg, q.kinds[msg])
	}
}

// withoutNil is a log line's key-value pairs without those whose value is
// nil, such as an "err" that no error filled: a line never says
// err=<nil>. It returns a new slice.
func withoutNil(args []any) []any {
	out := make([]any, 0, len(args)+2)
	for i := 0; i < len(args); i++ {
		if _, isKey := args[i].(string); isKey && i+1 < len(args) {
			if args[i+1] == nil {
				i++
				continue
			}
			out = append(out, args[i], args[i+1])
			i++
			continue
		}
		out = append(out, args[i])
	}
	return out
}
