package main

import (
	"log/slog"
	"os"
	"sync"
)

// accessFile is the access log's file: appended to, and opened again at
// its path by reopen, after logrotate has moved it away.
type accessFile struct {
	path string
	mu   sync.Mutex
	f    *os.File
}

func openAccessFile(path string) (*accessFile, error) {
	a := &accessFile{path: path}
	return a, a.reopen()
}

func (a *accessFile) open() (*os.File, error) {
	return os.OpenFile(a.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
}

// reopen opens the path again and writes there from now on; on an error
// it keeps the file it had.
func (a *accessFile) reopen() error {
	f, err := a.open()
	if err != nil {
		return err
	}
	a.mu.Lock()
	old := a.f
	a.f = f
	a.mu.Unlock()
	if old != nil {
		old.Close()
	}
	return nil
}

func (a *accessFile) Write(p []byte) (int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.f.Write(p)
}

func (a *accessFile) Close() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.f.Close()
}

// reopenOn reopens a on every signal from sig.
func reopenOn(sig <-chan os.Signal, a *accessFile, log *slog.Logger) {
	for range sig {
		if err := a.reopen(); err != nil {
			log.Error("access log not reopened: writing on to the file it had", "file", a.path, "err", err)
			continue
		}
		log.Info("access log reopened", "file", a.path)
	}
}
