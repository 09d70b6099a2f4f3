package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"tcprelay/internal/check"
	"testing"
	"time"
)

// TestDeployFilesUseRealFlags: the flags in deploy/relay.service and
// deploy/Dockerfile are flags the relay accepts, with values it parses.
func TestDeployFilesUseRealFlags(t *testing.T) {
	unit, err := os.ReadFile("../deploy/relay.service")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^ExecStart=/usr/local/bin/relay (.*)$`).FindSubmatch(unit)
	if m == nil {
		t.Fatal("deploy/relay.service: no ExecStart=/usr/local/bin/relay line")
	}
	docker, err := os.ReadFile("../deploy/Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	c := regexp.MustCompile(`(?m)^CMD (\[.*\])$`).FindSubmatch(docker)
	if c == nil {
		t.Fatal("deploy/Dockerfile: no CMD [...] line")
	}
	var cmd []string
	if err := json.Unmarshal(c[1], &cmd); err != nil {
		t.Fatalf("deploy/Dockerfile CMD: %v", err)
	}
	for name, args := range map[string][]string{
		"relay.service ExecStart": strings.Fields(string(m[1])),
		"Dockerfile CMD":          cmd,
	} {
		// Flags are parsed before -version acts, so an unknown flag or a
		// bad value fails here; the positional PORT is dropped.
		flags := append(args[:len(args)-1:len(args)-1], "-version")
		e := newEnv(t)
		p := e.start(relayBin, flags, procOpts{})
		p.mustExit(10 * time.Second)
		if p.ExitCode() != 0 {
			t.Errorf("%s: relay %s: %s; stderr:\n%s", name, strings.Join(flags, " "), p.Status(), p.Stderr)
		}
	}

	// The agent unit: its flags before the environment's.
	agent, err := os.ReadFile("../deploy/expose@.service")
	if err != nil {
		t.Fatal(err)
	}
	a := regexp.MustCompile(`(?m)^ExecStart=/usr/local/bin/expose (.*)$`).FindSubmatch(agent)
	if a == nil {
		t.Fatal("deploy/expose@.service: no ExecStart=/usr/local/bin/expose line")
	}
	var flags []string
	for _, f := range strings.Fields(string(a[1])) {
		if strings.HasPrefix(f, "$") {
			break
		}
		flags = append(flags, strings.ReplaceAll(f, "%S", t.TempDir()))
	}
	e := newEnv(t)
	p := e.start(exposeBin, append(flags, "-version"), procOpts{})
	p.mustExit(10 * time.Second)
	if p.ExitCode() != 0 {
		t.Errorf("expose@.service ExecStart: expose %s: %s; stderr:\n%s", strings.Join(flags, " "), p.Status(), p.Stderr)
	}
	// The load balancer example is a valid haproxy configuration.
	if haproxy, err := exec.LookPath("haproxy"); err == nil {
		if out, err := exec.Command(haproxy, "-c", "-f", "../deploy/haproxy.cfg").CombinedOutput(); err != nil {
			t.Errorf("haproxy -c -f deploy/haproxy.cfg: %v\n%s", err, out)
		}
	}
}

// TestDeployDocsHoldTogether: what the walkthrough tripped on in deploy/
// stays fixed. The image sets STATE_DIRECTORY to its volume, so a `docker
// run` with arguments of its own (which replace CMD) still keeps port
// reservations there; expose@.service's install steps create /etc/tcprelay
// before a file in it, and its example port is in relay.service's range.
func TestDeployDocsHoldTogether(t *testing.T) {
	docker := readDeploy(t, "Dockerfile")
	env := regexp.MustCompile(`(?m)^ENV STATE_DIRECTORY=(\S+)$`).FindStringSubmatch(docker)
	vol := regexp.MustCompile(`(?m)^VOLUME (\S+)$`).FindStringSubmatch(docker)
	switch {
	case env == nil:
		t.Error("deploy/Dockerfile: no ENV STATE_DIRECTORY=...: a docker run with its own arguments keeps no state")
	case vol == nil || vol[1] != env[1]:
		t.Errorf("deploy/Dockerfile: STATE_DIRECTORY=%s is not the VOLUME (%v)", env[1], vol)
	}
	if run := regexp.MustCompile(`(?m)^#\s+docker run .*\\\n#\s+(.*)$`).FindStringSubmatch(docker); env != nil && (run == nil || !strings.Contains(run[0], "-v tcprelay-state:"+env[1])) {
		t.Errorf("deploy/Dockerfile: the documented docker run does not mount a volume on %s: %q", env[1], run)
	}

	agent := readDeploy(t, "expose@.service")
	mkdir := strings.Index(agent, "install -d -m 755 /etc/tcprelay\n")
	envFile := strings.Index(agent, "/etc/tcprelay/expose-redis.env")
	if mkdir < 0 || envFile < mkdir {
		t.Errorf("deploy/expose@.service: its install steps put a file in /etc/tcprelay before creating it")
	}
	unit := readDeploy(t, "relay.service")
	exec := regexp.MustCompile(`(?m)^ExecStart=/usr/local/bin/relay (.*)$`).FindStringSubmatch(unit)
	args := strings.Fields(exec[1])
	lo, hi := 0, 65535
	if lo, _ = strconv.Atoi(args[len(args)-1]); lo > 0 {
		lo++ // PORT+1 and up, without -ports
	}
	for i, a := range args {
		if a == "-ports" && i+1 < len(args) {
			fmt.Sscanf(args[i+1], "%d-%d", &lo, &hi)
		}
	}
	port := regexp.MustCompile(`EXPOSE_FLAGS=.*-port (\d+)`).FindStringSubmatch(agent)
	if port == nil {
		t.Fatal("deploy/expose@.service: no example EXPOSE_FLAGS=-port N")
	}
	if p, _ := strconv.Atoi(port[1]); p < lo || p > hi {
		t.Errorf("deploy/expose@.service: example -port %d is outside relay.service's public ports %d-%d", p, lo, hi)
	}
}

// TestDeployHAProxyStartsAndDrains: deploy/haproxy.cfg starts under a
// 20,000-descriptor limit (its maxconn fits), and the drain and ready
// commands of docs/SCALING.md work on its stats socket. Only its bind port
// and socket path are changed, to a free port and a temporary directory.
func TestDeployHAProxyStartsAndDrains(t *testing.T) {
	haproxy := requireProgram(t, "haproxy", "haproxy")
	prlimit := requireProgram(t, "prlimit", "util-linux")
	socat := requireProgram(t, "socat", "socat")
	cfg := readDeploy(t, "haproxy.cfg")
	const sockPath = "/run/haproxy/admin.sock"
	if !strings.Contains(cfg, "stats socket "+sockPath+" ") || !strings.Contains(cfg, "level admin") {
		t.Fatalf("deploy/haproxy.cfg: no `stats socket %s ... level admin`", sockPath)
	}
	scaling, err := os.ReadFile("../docs/SCALING.md")
	if err != nil {
		t.Fatal(err)
	}
	cmds := regexp.MustCompile(`(?m)^\s*echo "(set server (\S+) state (\w+))" \| socat stdio (\S+)$`).FindAllStringSubmatch(string(scaling), -1)
	if len(cmds) < 2 {
		t.Fatalf("docs/SCALING.md: %d haproxy commands (echo \"set server ...\" | socat stdio SOCKET), want drain and ready", len(cmds))
	}

	dir := t.TempDir()
	sock := filepath.Join(dir, "admin.sock")
	file := filepath.Join(dir, "haproxy.cfg")
	e := newEnv(t)
	e.startService(prlimit, func(port int) []string {
		c := strings.ReplaceAll(cfg, sockPath, sock)
		c = strings.Replace(c, "bind :8081", fmt.Sprintf("bind 127.0.0.1:%d", port), 1)
		if err := os.WriteFile(file, []byte(c), 0o600); err != nil {
			t.Fatal(err)
		}
		return []string{"--nofile=20000:20000", haproxy, "-db", "-f", file}
	}, nil)

	// adminState is a server's srv_admin_state on the stats socket: 8 is
	// drain (SRV_ADMF_DRAIN), 0 ready.
	adminState := func(server string) (string, error) {
		out := e.runOK(socat, []string{"stdio", sock}, []byte("show servers state\n")).Out()
		be, srv, _ := strings.Cut(server, "/")
		m := regexp.MustCompile(`(?m)^\d+ ` + regexp.QuoteMeta(be) + ` \d+ ` + regexp.QuoteMeta(srv) + ` \S+ \d+ (\d+) `).FindStringSubmatch(out)
		if m == nil {
			return "", fmt.Errorf("no server %s in show servers state:\n%s", server, out)
		}
		return m[1], nil
	}
	// haproxy accepts on its frontend before its CLI answers.
	check.Eventually(t, serviceTimeout, func() error { _, err := adminState(cmds[0][2]); return err })
	for _, c := range cmds {
		line, server, state, path := c[1], c[2], c[3], c[4]
		if path != sockPath {
			t.Errorf("docs/SCALING.md: %q uses socket %s, deploy/haproxy.cfg has %s", c[0], path, sockPath)
		}
		e.runOK(socat, []string{"stdio", sock}, []byte(line+"\n"))
		got, err := adminState(server)
		if err != nil {
			t.Fatalf("after %q: %v", line, err)
		}
		if want := map[string]string{"drain": "8", "ready": "0"}[state]; got != want {
			t.Errorf("after %q: %s's srv_admin_state %s, want %s", line, server, got, want)
		}
	}
}

func readDeploy(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("../deploy", name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
