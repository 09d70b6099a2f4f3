package server

import (
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
)

// TestQuietLogSaysNoNil: an event logged with a nil error (dropConn's
// "data connection with an unknown token", which has none) writes no
// err=<nil>; one with an error writes it.
func TestQuietLogSaysNoNil(t *testing.T) {
	var out lockedBuffer
	var wg sync.WaitGroup
	q := &quietLog{log: slog.New(slog.NewTextHandler(&out, nil)), wg: &wg}
	q.Warn("dropped connection on control port: no token", "remote", "192.0.2.1:1", "err", nil)
	q.Warn("dropped connection on control port: bad preamble", "remote", "192.0.2.1:2", "err", errors.New("EOF"))
	q.flush()
	wg.Wait()
	got := out.String()
	if strings.Contains(got, "<nil>") || !strings.Contains(got, `msg="dropped connection on control port: no token" remote=192.0.2.1:1 count=1`) {
		t.Errorf("a nil err is logged:\n%s", got)
	}
	if !strings.Contains(got, "err=EOF") {
		t.Errorf("a real err is not logged:\n%s", got)
	}
}
