package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"tcprelay/internal/child"
)

// keyLine is the line an agent with -key prints on stderr at start.
var keyLine = regexp.MustCompile(`(?m)^agent public key: (ed25519:[A-Za-z0-9+/=]+)$`)

// agentKey makes an agent key file by running echoserver -key against
// nothing (-fail-fast, an unused port): it creates the file, prints the
// public key and exits. It returns the file and the key.
func (e *env) agentKey(name string) (file, key string) {
	t := e.t
	t.Helper()
	file = filepath.Join(t.TempDir(), name+".key")
	p := e.run(echoBin, []string{"-key", file, "-fail-fast", "127.0.0.1", strconv.Itoa(freePort(t))}, nil)
	m := keyLine.FindStringSubmatch(p.Stderr.String())
	if m == nil {
		t.Fatalf("%s printed no 'agent public key: KEY' line on stderr:\n%s", p, p.Stderr)
	}
	fi, err := os.Stat(file)
	if err != nil {
		t.Fatalf("-key %s: %v", file, err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("-key created %s with mode %v, want 0600", file, fi.Mode().Perm())
	}
	return file, m[1]
}

// writeAgents writes an agents file and returns its path.
func writeAgents(t *testing.T, path, content string) string {
	t.Helper()
	if path == "" {
		path = filepath.Join(t.TempDir(), "agents")
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestAgentKeys: an agent with -key creates its key file and prints its
// public key; a relay with -agents admits that key, refuses a key it does
// not list (the agent exits non-zero saying authentication failed), and on
// SIGHUP drops an agent removed from the file: its port closes within a
// second and the agent exits non-zero.
func TestAgentKeys(t *testing.T) {
	requireNC(t)
	e := newEnv(t)
	webFile, webKey := e.agentKey("web")
	strangerFile, _ := e.agentKey("stranger")
	// The same file again: the same key, not a new one.
	p := e.run(echoBin, []string{"-key", webFile, "-fail-fast", "127.0.0.1", strconv.Itoa(freePort(t))}, nil)
	if m := keyLine.FindStringSubmatch(p.Stderr.String()); m == nil || m[1] != webKey {
		t.Fatalf("reusing %s printed %q, want the same key %s", webFile, p.Stderr, webKey)
	}

	agents := writeAgents(t, "", "# the test's agents\nweb "+webKey+" tunnels=2\n")
	r := e.startRelayWith(nil, nil, "-agents", agents)
	web, pub := e.startAgent(echoBin, []string{"-key", webFile, "127.0.0.1", strconv.Itoa(r.port)}, "127.0.0.1")
	e.ncEcho("127.0.0.1", pub, []byte("admitted by key\n"))

	stranger := e.start(echoBin, []string{"-key", strangerFile, "127.0.0.1", strconv.Itoa(r.port)}, procOpts{})
	stranger.mustExit(10 * time.Second)
	if stranger.ExitCode() == 0 || !strings.Contains(stranger.Stderr.String(), "authentication failed") || stranger.Out() != "" {
		t.Fatalf("unlisted key: %s, stdout %q, stderr:\n%s\nwant a non-zero exit saying authentication failed", stranger.Status(), stranger.Out(), stranger.Stderr)
	}
	t.Logf("unlisted key: %s: %s", stranger.Status(), strings.TrimSpace(lastLine(stranger.Stderr.String())))

	// Revoke web: rewrite the file without it and send SIGHUP.
	writeAgents(t, agents, "# web removed\n")
	web.ended()
	hupAt := time.Now()
	r.signal(syscall.SIGHUP)
	took, ok := waitRefused(pub, hupAt, time.Second)
	if !ok {
		t.Fatalf("revoked agent's port %d still accepts %v after SIGHUP; relay stderr:\n%s", pub, took.Round(time.Millisecond), r.Stderr)
	}
	t.Logf("revoked agent's port %d refuses connections %v after SIGHUP", pub, took.Round(time.Millisecond))
	web.mustExit(10 * time.Second)
	if web.ExitCode() == 0 || !strings.Contains(web.Stderr.String(), "authentication failed") {
		t.Errorf("revoked agent: %s, want a non-zero exit saying authentication failed; stderr:\n%s", web.Status(), web.Stderr)
	}

	// A file with an error keeps the agents in force.
	writeAgents(t, agents, "web "+webKey+" colour=blue\n")
	r.signal(syscall.SIGHUP)
	if !child.WaitFor(5*time.Second, func() bool { return strings.Contains(r.Stderr.String(), "agents file not reloaded") }) {
		t.Errorf("relay did not log the bad agents file; stderr:\n%s", r.Stderr)
	}
	again := e.start(echoBin, []string{"-key", webFile, "-fail-fast", "127.0.0.1", strconv.Itoa(r.port)}, procOpts{})
	again.mustExit(10 * time.Second)
	if again.ExitCode() == 0 {
		t.Errorf("web admitted after a bad reload: the old file (without web) should still be in force")
	}
}

// lastLine is the last non-empty line of s.
func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// TestTakeoverAfterRelayKill9 plays the attack on a relay restart: the
// relay is killed with SIGKILL and restarted, and another agent asks for
// the victim's port before the victim is back. It is refused, the port is
// kept for its owner, and the owner gets it back. Both with keys and with
// the shared secret (where the owner is the registration's resume token).
func TestTakeoverAfterRelayKill9(t *testing.T) {
	requireNC(t)
	for _, mode := range []string{"keys", "secret"} {
		t.Run(mode, func(t *testing.T) {
			e := newEnv(t)
			var flags, ownerArgs, thiefArgs, env []string
			if mode == "keys" {
				ownerFile, ownerKey := e.agentKey("owner")
				thiefFile, thiefKey := e.agentKey("thief")
				flags = []string{"-agents", writeAgents(t, "", "owner "+ownerKey+"\nthief "+thiefKey+"\n")}
				ownerArgs, thiefArgs = []string{"-key", ownerFile}, []string{"-key", thiefFile}
			} else {
				env = []string{"RELAY_SECRET=one team"}
			}
			r := e.startRelayWith(nil, env, flags...)
			rp := strconv.Itoa(r.port)
			owner, pub := e.startAgentWith(echoBin, append(ownerArgs, "127.0.0.1", rp), "127.0.0.1", env)
			e.ncEcho("127.0.0.1", pub, []byte("before\n"))

			// The owner is stopped so that the thief is sure to ask first.
			owner.signal(syscall.SIGSTOP)
			t.Cleanup(func() { owner.Cmd.Process.Signal(syscall.SIGCONT) })
			r.kill()
			e.restartRelay(r)
			thief := e.start(echoBin, append(thiefArgs, "-port", strconv.Itoa(pub), "127.0.0.1", rp), procOpts{env: env})
			thief.mustExit(10 * time.Second)
			// Another tenant hears what it would of a port outside its
			// scope; a holder of the same secret, that it is reserved.
			want := fmt.Sprintf("port %d is not allowed for this agent", pub)
			if mode == "secret" {
				want = fmt.Sprintf("port %d is reserved for its previous owner", pub)
			}
			if thief.ExitCode() == 0 || thief.Out() != "" || !strings.Contains(thief.Stderr.String(), want) {
				t.Fatalf("thief asking for port %d after the restart: %s, stdout %q, stderr:\n%s\nwant a non-zero exit saying %q",
					pub, thief.Status(), thief.Out(), thief.Stderr, want)
			}
			t.Logf("thief: %s: %s", thief.Status(), lastLine(thief.Stderr.String()))

			owner.signal(syscall.SIGCONT)
			if got := owner.reannounced(15 * time.Second); got != pub {
				t.Fatalf("owner came back on port %d, want port %d", got, pub)
			}
			e.ncEcho("127.0.0.1", pub, []byte("the owner's, after the restart\n"))
		})
	}
}
