package e2e

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/child"
)

// Files that come back wrong (a state file corrupt, from another version
// or with a reservation far in the future; an agents file caught
// mid-write; a symbolic link planted in the state directory) do not stop
// the relay, revoke its tenants, or make it write elsewhere.

// relayWithStateFile starts a relay with -state-dir dir and flags, after write
// put content in the state file it will read (named after its port), and
// returns the relay and the state file's path.
func (e *env) relayWithStateFile(dir string, write func(path string, port int), flags ...string) (*relay, string) {
	t := e.t
	t.Helper()
	var path string
	r := e.startRelayWith(func() int {
		port := freePort(t)
		path = filepath.Join(dir, "relay-127.0.0.1-"+strconv.Itoa(port)+".json")
		write(path, port)
		return port
	}, nil, append([]string{"-state-dir", dir}, flags...)...)
	return r, path
}

// opsGet GETs path from the relay's -metrics-addr address, waiting for its
// listener, which opens a moment after the control port.
func opsGet(t *testing.T, addr, path string) string {
	t.Helper()
	hc := &http.Client{Timeout: 10 * time.Second}
	var body []byte
	check.Eventually(t, readyTimeout, func() error {
		resp, err := hc.Get("http://" + addr + path)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		if body, err = io.ReadAll(resp.Body); err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: %s, %v", path, resp.Status, err)
		}
		return nil
	})
	return string(body)
}

// setAside returns the files the relay set path aside as.
func setAside(t *testing.T, path string) []string {
	t.Helper()
	m, err := filepath.Glob(path + ".corrupt-*")
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestCorruptStateFileSetAside: a state file of garbage, or of a version
// the relay does not know, does not stop the relay from starting: it logs
// it, renames the file to NAME.corrupt-<unix time> (never deletes it), and
// starts with no reservation.
func TestCorruptStateFileSetAside(t *testing.T) {
	for _, tc := range []struct {
		name, content, log string
	}{
		{"garbage", "\x00\x9f garbage {{{ not json", "not a state file"},
		{"unknown version", `{"version": 99, "endpoints": [{"port": 1, "owner": "x"}]}`, "version 99"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			dir := t.TempDir()
			r, path := e.relayWithStateFile(dir, func(path string, _ int) {
				if err := os.WriteFile(path, []byte(tc.content), 0o600); err != nil {
					t.Fatal(err)
				}
			})
			aside := setAside(t, path)
			if len(aside) != 1 {
				t.Fatalf("state file set aside as %q, want one %s.corrupt-<unix time>; relay stderr:\n%s", aside, path, r.Stderr)
			}
			if b, err := os.ReadFile(aside[0]); err != nil || string(b) != tc.content {
				t.Errorf("%s holds %q (%v), want the file as it was", aside[0], b, err)
			}
			unix, err := strconv.ParseInt(strings.TrimPrefix(aside[0], path+".corrupt-"), 10, 64)
			if err != nil || time.Since(time.Unix(unix, 0)).Abs() > time.Minute {
				t.Errorf("set aside as %s: want the unix time of now after .corrupt-", aside[0])
			}
			logged := func() bool {
				s := r.Stderr.String()
				return strings.Contains(s, tc.log) && strings.Contains(s, aside[0])
			}
			if !child.WaitFor(5*time.Second, logged) {
				t.Errorf("relay did not log why (%q) and where it set the file aside (%s); stderr:\n%s", tc.log, aside[0], r.Stderr)
			}
			t.Logf("relay: %s", regexp.MustCompile(`.*state file.*set aside.*`).FindString(r.Stderr.String()))
			// It works: an agent registers.
			e.startEcho("127.0.0.1", r.port)
		})
	}
}

// TestFarFutureReservationCutToGrace: a state file that reserves a port
// for ten years holds it no longer than -port-grace from the start.
func TestFarFutureReservationCutToGrace(t *testing.T) {
	e := newEnv(t)
	ops := "127.0.0.1:" + strconv.Itoa(freePort(t))
	reserved := freePort(t)
	r, _ := e.relayWithStateFile(t.TempDir(), func(path string, _ int) {
		st := fmt.Sprintf(`{"version": 1, "endpoints": [{"port": %d, "owner": "ed25519:someone", "until": %q}]}`,
			reserved, time.Now().AddDate(10, 0, 0).UTC().Format(time.RFC3339))
		if err := os.WriteFile(path, []byte(st), 0o600); err != nil {
			t.Fatal(err)
		}
	}, "-port-grace", "30s", "-metrics-addr", ops)
	b := opsGet(t, ops, "/status")
	m := regexp.MustCompile(fmt.Sprintf(`endpoint on port %d: reserved for its owner for another (\S+)`, reserved)).FindStringSubmatch(b)
	if m == nil {
		t.Fatalf("/status does not show port %d reserved:\n%s\nrelay stderr:\n%s", reserved, b, r.Stderr)
	}
	left, err := time.ParseDuration(string(m[1]))
	t.Logf("port %d reserved for another %s (-port-grace 30s)", reserved, m[1])
	if err != nil || left > 30*time.Second {
		t.Errorf("port %d reserved for another %s, want at most the grace, 30s", reserved, m[1])
	}
}

// TestEmptyAgentsFileOnSIGHUPKeepsTenants: an agents file emptied (as one
// caught mid-write is) and a SIGHUP keep every tenant: the relay warns and
// keeps the agents in force, as for a file with errors. A file that holds
// only a comment removes everyone, on purpose.
func TestEmptyAgentsFileOnSIGHUPKeepsTenants(t *testing.T) {
	requireNC(t)
	e := newEnv(t)
	webFile, webKey := e.agentKey("web")
	agents := writeAgents(t, "", "web "+webKey+"\n")
	r := e.startRelayWith(nil, nil, "-agents", agents)
	web, pub := e.startAgent(echoBin, []string{"-key", webFile, "127.0.0.1", strconv.Itoa(r.port)}, "127.0.0.1")
	e.ncEcho("127.0.0.1", pub, []byte("before\n"))

	for i, content := range []string{"", " \n\t\n"} {
		writeAgents(t, agents, content)
		r.signal(syscall.SIGHUP)
		handled := func() int {
			log := r.Stderr.String()
			return strings.Count(log, "agents file reloaded") + strings.Count(log, "agents file is empty")
		}
		if !child.WaitFor(5*time.Second, func() bool { return handled() > i }) {
			t.Fatalf("SIGHUP with the agents file %q: the relay logged nothing of it; stderr:\n%s", content, r.Stderr)
		}
		if took, ok := waitRefused(pub, time.Now(), 500*time.Millisecond); ok {
			t.Fatalf("SIGHUP with the agents file %q revoked web: its port %d refuses connections %v after; relay stderr:\n%s", content, pub, took.Round(time.Millisecond), r.Stderr)
		}
		e.ncEcho("127.0.0.1", pub, []byte(fmt.Sprintf("after SIGHUP with the agents file %q\n", content)))
		if web.Exited() {
			t.Fatalf("web exited after a SIGHUP with an empty agents file; stderr:\n%s", web.Stderr)
		}
		if n := strings.Count(r.Stderr.String(), "agents file is empty"); n != i+1 {
			t.Errorf("SIGHUP with the agents file %q: the relay warned %d times that the file is empty, want %d; stderr:\n%s", content, n, i+1, r.Stderr)
		}
	}
	t.Logf("relay: %s", regexp.MustCompile(`.*agents file is empty.*`).FindString(r.Stderr.String()))

	// Only a comment: on purpose.
	writeAgents(t, agents, "# nobody\n")
	web.ended()
	hupAt := time.Now()
	r.signal(syscall.SIGHUP)
	if took, ok := waitRefused(pub, hupAt, 5*time.Second); !ok {
		t.Fatalf("a file with only a comment did not remove web: port %d still accepts %v after SIGHUP", pub, took)
	}
	web.mustExit(10 * time.Second)
}

// TestSymlinksInStateDirNotFollowed plants symbolic links in the state
// directory at the paths of the state file and of the self-signed TLS
// certificate, pointing outside it. The relay starts, writes both, and
// creates nothing where the links point.
func TestSymlinksInStateDirNotFollowed(t *testing.T) {
	e := newEnv(t)
	dir, outside := t.TempDir(), t.TempDir()
	var targets []string
	r, statePath := e.relayWithStateFile(dir, func(path string, port int) {
		for _, p := range []string{path, strings.TrimSuffix(path, ".json") + "-tls.pem"} {
			target := filepath.Join(outside, filepath.Base(p))
			os.Remove(p)
			if err := os.Symlink(target, p); err != nil {
				t.Fatal(err)
			}
			targets = append(targets, target)
		}
	}, "-tls-self-signed")
	e.startEchoWith("127.0.0.1", r.port, nil, "-tls-fingerprint", fingerprint(t, r)) // the state file is written
	r.stop()
	for _, target := range targets {
		if _, err := os.Lstat(target); err == nil {
			t.Errorf("the relay wrote %s, outside its state directory, through a link", target)
		}
	}
	for _, p := range []string{statePath, strings.TrimSuffix(statePath, ".json") + "-tls.pem"} {
		if fi, err := os.Lstat(p); err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v; want a regular file of mode 0600 in place of the link", p, describe(fi, err))
		}
	}
}

// describe says what Lstat found.
func describe(fi os.FileInfo, err error) string {
	if err != nil {
		return err.Error()
	}
	return fi.Mode().String()
}
