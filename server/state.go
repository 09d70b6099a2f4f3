package server

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// The state file keeps who owns which public port, so that a relay
// restarted with the same command line, even after kill -9, honours the
// reservations: every port open or reserved when it stopped is reserved
// for its owner for Config.PortGrace from the restart (or until its
// earlier reservation ends). It holds no credential: owners are public
// keys or hashes of resume tokens.

type stateEntry struct {
	Port  int       `json:"port"`
	Owner string    `json:"owner"`
	Until time.Time `json:"until,omitzero"` // zero: the port was open
}

type stateFile struct {
	Version   int          `json:"version"`
	Endpoints []stateEntry `json:"endpoints"`
}

// stateDelay coalesces the writes of a burst of changes into one.
const stateDelay = 100 * time.Millisecond

// loadState reserves, for their owners, the ports the state file lists.
// A missing file is an empty one.
func (s *Server) loadState() error {
	if s.cfg.StateFile == "" {
		return nil
	}
	b, err := os.ReadFile(s.cfg.StateFile)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var st stateFile
	if err := json.Unmarshal(b, &st); err != nil {
		return fmt.Errorf("state file %s: %w", s.cfg.StateFile, err)
	}
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range st.Endpoints {
		until := e.Until
		if until.IsZero() {
			until = now.Add(s.set.portGrace)
		}
		if e.Port < 1 || e.Port > 65535 || e.Owner == "" || !until.After(now) || s.endpoints[e.Port] != nil ||
			!s.scopeAllowsLocked(e.Owner, e.Port) {
			continue
		}
		ep := &endpoint{s: s, port: e.Port, owner: e.Owner}
		if pool, ok := strings.CutPrefix(e.Owner, "pool:"); ok {
			// Without an agents file, every agent is the secret's.
			ep.pool, ep.secret = pool, s.cfg.Agents == nil
		} else if pool, ok := strings.CutPrefix(e.Owner, "secret-pool:"); ok {
			ep.pool, ep.secret = pool, true
		}
		s.endpoints[e.Port] = ep
		s.ports.hold(e.Port)
		ep.reserveLocked(until)
	}
	if n := len(s.endpoints); n > 0 {
		s.log.Info("ports reserved for their owners from the state file", "ports", n, "file", s.cfg.StateFile, "grace", s.set.portGrace)
	}
	return nil
}

// saveStateSoonLocked schedules a write of the state file. s.mu must be
// held.
func (s *Server) saveStateSoonLocked() {
	if s.cfg.StateFile == "" || s.saveTimer != nil || s.stateFrozen {
		return
	}
	s.wg.Add(1)
	s.saveTimer = time.AfterFunc(stateDelay, func() {
		defer s.wg.Done()
		s.saveState(false)
	})
}

// saveState writes the state file now: atomically (a new file renamed over
// the old), so a crash leaves the old one or the new one. Once the state is
// frozen, only the final write (final set) goes through.
func (s *Server) saveState(final bool) {
	if s.cfg.StateFile == "" {
		return
	}
	s.stateMu.Lock()
	defer s.stateMu.Unlock()
	s.mu.Lock()
	s.saveTimer = nil
	if s.stateFrozen && !final {
		s.mu.Unlock()
		return
	}
	st := stateFile{Version: 1, Endpoints: []stateEntry{}}
	for _, ep := range s.endpoints {
		st.Endpoints = append(st.Endpoints, stateEntry{Port: ep.port, Owner: ep.owner, Until: ep.until})
	}
	s.mu.Unlock()
	sort.Slice(st.Endpoints, func(i, j int) bool { return st.Endpoints[i].Port < st.Endpoints[j].Port })
	if err := writeFileAtomic(s.cfg.StateFile, st); err != nil {
		s.log.Error("could not save port reservations", "file", s.cfg.StateFile, "err", err)
	}
}

func writeFileAtomic(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, ".state-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name()) // a no-op once renamed
	if _, err := f.Write(append(b, '\n')); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}

// freezeState writes the state file as it is when the relay stops, and
// keeps it so: the endpoints its sessions leave while it shuts down are
// still open as far as a restart is concerned.
func (s *Server) freezeState() {
	if s.cfg.StateFile == "" {
		return
	}
	s.mu.Lock()
	frozen := s.stateFrozen
	s.stateFrozen = true
	if t := s.saveTimer; t != nil && t.Stop() {
		s.saveTimer = nil
		s.wg.Done()
	}
	s.mu.Unlock()
	if !frozen {
		s.saveState(true)
	}
}
