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
	if wait := quietEvery - time.Since(k.last); wait > 0 {
		if k.timer == nil {
			q.wg.Add(1)
			k.timer = time.AfterFunc(wait, func() {
				defer q.wg.Done()
				q.mu.Lock()
				defer q.mu.Unlock()
				k.timer = nil
				q.writeLocked(msg, k)
			})
		}
		return
	}
	q.writeLocked(msg, k)
}

func (q *quietLog) writeLocked(msg string, k *quietKind) {
	if k.n == 0 {
		return
	}
	q.log.Log(context.Background(), k.level, msg, append(k.args, "count", k.n)...)
	k.n, k.last = 0, time.Now()
}

// flush writes every count left and stops.
func (q *quietLog) flush() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.done = true
	for msg, k := range q.kinds {
		if k.timer != nil && k.timer.Stop() {
			k.timer = nil
			q.wg.Done()
		}
		q.writeLocked(msg, k)
	}
}
