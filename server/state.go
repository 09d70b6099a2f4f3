package server

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"tcprelay/internal/atomicfile"
	"tcprelay/internal/proto"
)

// The state file keeps who owns which public port, so that a relay
// restarted with the same command line, even after kill -9, honours the
// reservations: every port open or reserved when it stopped is reserved
// for its owner for Config.PortGrace from the restart (or until its
// earlier reservation ends). It holds no credential: owners are public
// keys or hashes of resume tokens.

type stateEntry struct {
	Port  int       `json:"port"`           // 0 for a name
	Host  string    `json:"host,omitempty"` // a name on the shared port (see ServeNames)
	Owner string    `json:"owner"`
	Until time.Time `json:"until,omitzero"` // zero: the port was open
}

type stateFile struct {
	Version   int          `json:"version"`
	Endpoints []stateEntry `json:"endpoints"`
}

// stateDelay coalesces the writes of a burst of changes into one.
const stateDelay = 100 * time.Millisecond

// stateVersion is the version of the state file this relay writes and
// reads.
const stateVersion = 1

// loadState reserves, for their owners, the ports the state file lists,
// for no longer than the grace from now. A missing file is an empty one. A
// file the relay cannot use (not JSON, another version, a symbolic link)
// does not stop it: it is logged and set aside, renamed to
// NAME.corrupt-<unix time> and never deleted, and the relay starts with no
// reservation. It fails only if the file cannot be read or set aside.
func (s *Server) loadState() error {
	path := s.cfg.StateFile
	if path == "" {
		return nil
	}
	b, err := readRegular(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if errors.Is(err, errNotRegular) {
		return s.setStateAside(err.Error())
	}
	if err != nil {
		return err
	}
	var st stateFile
	if err := json.Unmarshal(b, &st); err != nil {
		return s.setStateAside("not a state file: " + err.Error())
	}
	if st.Version != stateVersion {
		return s.setStateAside(fmt.Sprintf("version %d, which this relay does not know (it reads and writes version %d)", st.Version, stateVersion))
	}
	now := time.Now()
	latest := now.Add(s.set.portGrace)
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range st.Endpoints {
		until := e.Until
		if until.IsZero() || until.After(latest) {
			until = latest // open when the relay stopped, or a clock gone wrong
		}
		ep := &endpoint{s: s, port: e.Port, host: e.Host, owner: e.Owner}
		if e.Owner == "" || !until.After(now) || !s.validEntryLocked(e) || !s.scopeAllowsLocked(e.Owner, ep) {
			continue
		}
		if pool, ok := strings.CutPrefix(e.Owner, "pool:"); ok {
			// Without an agents file, every agent is the secret's.
			ep.pool, ep.secret = pool, s.cfg.Agents == nil
		} else if pool, ok := strings.CutPrefix(e.Owner, "secret-pool:"); ok {
			ep.pool, ep.secret = pool, true
		}
		if ep.host != "" {
			ep.port = s.namesPort // zero until ServeNames, without Config.NamesPort
			s.names[ep.host] = ep
		} else {
			s.endpoints[e.Port] = ep
			s.ports.hold(e.Port)
		}
		ep.reserveLocked(until)
	}
	if n := len(s.endpoints) + len(s.names); n > 0 {
		s.log.Info("ports and names reserved for their owners from the state file", "ports", len(s.endpoints), "names", len(s.names),
			"file", path, "grace", s.set.portGrace)
	}
	return nil
}

// validEntryLocked reports whether e is a port, or a name under the relay's
// Config.NamesDomain, that no endpoint has yet. s.mu must be held.
func (s *Server) validEntryLocked(e stateEntry) bool {
	if e.Host == "" {
		return e.Port >= 1 && e.Port <= 65535 && s.endpoints[e.Port] == nil
	}
	full, err := proto.FullHostname(e.Host, s.cfg.NamesDomain)
	return e.Port == 0 && s.cfg.NamesDomain != "" && err == nil && full == e.Host && s.names[e.Host] == nil
}

// setStateAside renames the state file, which the relay cannot use for
// why, to NAME.corrupt-<unix time>, and logs it.
func (s *Server) setStateAside(why string) error {
	path := s.cfg.StateFile
	aside := path + ".corrupt-" + strconv.FormatInt(time.Now().Unix(), 10)
	if err := os.Rename(path, aside); err != nil { // a link is renamed, not followed
		return fmt.Errorf("state file %s is unusable (%s) and could not be set aside: %w", path, why, err)
	}
	s.log.Error("state file unusable: set aside, starting with no port reservation", "file", path, "why", why, "set_aside_as", aside)
	return nil
}

// errNotRegular: the state file is a symbolic link, a directory, a device...
var errNotRegular = errors.New("not a regular file (a symbolic link is not followed)")

// readRegular reads the regular file at path, without following a
// symbolic link there.
func readRegular(path string) ([]byte, error) {
	fi, err := os.Lstat(path)
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, errNotRegular
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if opened, err := f.Stat(); err != nil || !os.SameFile(fi, opened) {
		return nil, errNotRegular // replaced between the two looks
	}
	return io.ReadAll(f)
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
	st := stateFile{Version: stateVersion, Endpoints: []stateEntry{}}
	for ep := range s.allEndpointsLocked() {
		e := stateEntry{Port: ep.port, Host: ep.host, Owner: ep.owner, Until: ep.until}
		if e.Host != "" {
			e.Port = 0 // the shared port is the command line's
		}
		st.Endpoints = append(st.Endpoints, e)
	}
	s.mu.Unlock()
	slices.SortFunc(st.Endpoints, func(a, b stateEntry) int { return cmp.Or(a.Port-b.Port, strings.Compare(a.Host, b.Host)) })
	if err := writeFileAtomic(s.cfg.StateFile, st); err != nil {
		s.log.Error("could not save port reservations", "file", s.cfg.StateFile, "err", err)
	}
}

// writeFileAtomic writes v as JSON to path through a new file (created
// with O_EXCL, mode 0600) renamed over it: a symbolic link planted at path
// is replaced, never followed.
func writeFileAtomic(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	return atomicfile.Write(path, append(b, '\n'))
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
