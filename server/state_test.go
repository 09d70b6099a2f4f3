package server_test

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/testutil"
	"tcprelay/server"
)

// TestUnusableStateFileSetAside: a state file the relay cannot use (not
// JSON, a version it does not know, a symbolic link) does not stop it:
// the relay starts with no reservation and the file is renamed to
// NAME.corrupt-<unix time>, as it was.
func TestUnusableStateFileSetAside(t *testing.T) {
	check.Leaks(t)
	for _, tc := range []struct {
		name  string
		plant func(path string) error
	}{
		{"garbage", func(path string) error { return os.WriteFile(path, []byte("\x00garbage"), 0o600) }},
		{"version 2", func(path string) error {
			return os.WriteFile(path, []byte(`{"version": 2, "endpoints": [{"port": 1, "owner": "x"}]}`), 0o600)
		}},
		{"symbolic link", func(path string) error {
			good := filepath.Join(t.TempDir(), "elsewhere.json")
			if err := os.WriteFile(good, []byte(`{"version": 1, "endpoints": [{"port": 1, "owner": "x"}]}`), 0o600); err != nil {
				return err
			}
			return os.Symlink(good, path)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "state.json")
			if err := tc.plant(path); err != nil {
				t.Fatal(err)
			}
			before, _ := os.Lstat(path)
			relay := testutil.StartRelay(t, server.Config{StateFile: path})
			if n := relay.Stats().Reserved; n != 0 {
				t.Errorf("%d ports reserved from an unusable state file, want 0", n)
			}
			aside, _ := filepath.Glob(path + ".corrupt-*")
			if len(aside) != 1 {
				t.Fatalf("set aside as %q, want one %s.corrupt-<unix time>", aside, path)
			}
			if after, err := os.Lstat(aside[0]); err != nil || !os.SameFile(before, after) {
				t.Errorf("%s is not the file that was there (%v)", aside[0], err)
			}
		})
	}
}

// TestStateReservationCutToGrace: a reservation that ends past the grace
// from now (a clock gone wrong, a hand-edited file) holds for the grace.
func TestStateReservationCutToGrace(t *testing.T) {
	check.Leaks(t)
	path := filepath.Join(t.TempDir(), "state.json")
	st := fmt.Sprintf(`{"version": 1, "endpoints": [{"port": 40001, "owner": "x", "until": %q}, {"port": 40002, "owner": "y"}]}`,
		time.Now().AddDate(10, 0, 0).Format(time.RFC3339))
	if err := os.WriteFile(path, []byte(st), 0o600); err != nil {
		t.Fatal(err)
	}
	relay := testutil.StartRelay(t, server.Config{StateFile: path, PortGrace: 5 * time.Second})
	var b bytes.Buffer
	relay.WriteStatus(&b)
	m := regexp.MustCompile(`endpoint on port (\d+): reserved for its owner for another (\S+)`).FindAllStringSubmatch(b.String(), -1)
	if len(m) != 2 {
		t.Fatalf("status shows %d reserved ports, want 2:\n%s", len(m), &b)
	}
	for _, r := range m {
		if left, err := time.ParseDuration(r[2]); err != nil || left > 5*time.Second {
			t.Errorf("port %s reserved for another %s, want at most the grace (5s)", r[1], r[2])
		}
	}
	if strings.Contains(b.String(), "h0m") {
		t.Errorf("a reservation in hours:\n%s", &b)
	}
}
