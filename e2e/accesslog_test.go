package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"tcprelay/internal/child"
)

// readAccessLog decodes the JSON lines of an access log file.
func readAccessLog(t *testing.T, path string) []map[string]any {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var recs []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if line == "" {
			continue
		}
		var rec map[string]any
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("%s: line %q: %v", path, line, err)
		}
		recs = append(recs, rec)
	}
	return recs
}

// TestAccessLogRotated: relay -access-log writes one JSON line per
// outside connection (nc, with its address, the bytes each way and why it
// ended) and per agent session (with its ports), and the real logrotate
// rotates it: SIGUSR1 in its postrotate makes the relay write on in the
// new file, and nothing is lost across the rotation.
func TestAccessLogRotated(t *testing.T) {
	requireNC(t)
	logrotate := requireProgram(t, "logrotate", "logrotate")
	e := newEnv(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "access.log")
	r := e.startRelayWith(nil, nil, "-access-log", path)
	agent, pub := e.startEcho("127.0.0.1", r.port)
	e.ncEcho("127.0.0.1", pub, []byte("before the rotation\n"))

	conf := filepath.Join(dir, "logrotate.conf")
	os.WriteFile(conf, []byte(fmt.Sprintf("%s {\n  rotate 2\n  nocompress\n  postrotate\n    kill -USR1 %d\n  endscript\n}\n", path, r.Pid())), 0o644)
	if out, err := exec.Command(logrotate, "-f", "-s", filepath.Join(dir, "state"), conf).CombinedOutput(); err != nil {
		t.Fatalf("logrotate: %v\n%s", err, out)
	}
	if !child.WaitFor(5*time.Second, func() bool { return strings.Contains(r.Stderr.String(), "access log reopened") }) {
		t.Fatalf("the relay did not reopen its access log on SIGUSR1:\n%s", r.Stderr)
	}
	e.ncEcho("127.0.0.1", pub, []byte("after the rotation\n"))
	agent.stop()
	r.stop()

	old := readAccessLog(t, path+".1")
	if len(old) != 1 || old[0]["event"] != "connection" || old[0]["bytes_in"] != float64(len("before the rotation\n")) ||
		old[0]["bytes_out"] != old[0]["bytes_in"] || old[0]["port"] != float64(pub) || old[0]["reason"] != "client closed" {
		t.Errorf("the rotated file: %v, want the first client's line: its bytes each way, port %d, closed by the client", old, pub)
	}
	cur := readAccessLog(t, path)
	if len(cur) != 2 || cur[0]["event"] != "connection" || cur[0]["bytes_in"] != float64(len("after the rotation\n")) ||
		cur[1]["event"] != "session" {
		t.Fatalf("the new file: %v, want the second client's line, then the agent's session", cur)
	}
	if ports := cur[1]["ports"].([]any); len(ports) != 1 || ports[0] != float64(pub) || cur[1]["reason"] != "agent closed" {
		t.Errorf("the session's line: %v, want port %d, ended by the agent (stopped first)", cur[1], pub)
	}
	for _, rec := range append(old, cur...) {
		for _, f := range []string{"start", "end"} {
			if _, err := time.Parse(time.RFC3339Nano, rec[f].(string)); err != nil {
				t.Errorf("%s of %v: %v", f, rec, err)
			}
		}
	}
}

// TestAccessLogFail2banFilter: the fail2ban filter shipped in
// deploy/fail2ban matches, with the real fail2ban-regex, exactly the lines
// of the relay's access log for clients it refused at a limit, and finds
// their address.
func TestAccessLogFail2banFilter(t *testing.T) {
	requireNC(t)
	regex := requireProgram(t, "fail2ban-regex", "fail2ban")
	e := newEnv(t)
	path := filepath.Join(t.TempDir(), "access.log")
	r := e.startRelayWith(nil, nil, "-access-log", path, "-max-clients-per-source", "1")
	agent, pub := e.startEcho("127.0.0.1", r.port)
	held := openLive(t, pub) // the address's one client
	for range 3 {
		e.nc("127.0.0.1", pub, nil).mustExit(clientTimeout) // refused
	}
	held.c.Close()
	agent.stop()
	r.stop()

	out, err := exec.Command(regex, path, filepath.Join("..", "deploy", "fail2ban", "tcprelay-refused.conf")).CombinedOutput()
	if err != nil {
		t.Fatalf("fail2ban-regex: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "Lines: 5 lines, 0 ignored, 3 matched, 2 missed") {
		t.Errorf("fail2ban-regex on the access log (3 refused clients, 1 served, 1 session): want 3 matched, 2 missed:\n%s", out)
	}
	if !strings.Contains(string(out), "[5] \"end\":\"Year-Month-DayT24hour:Minute:Second") {
		t.Errorf("fail2ban-regex did not read the time of every line:\n%s", out)
	}
}
