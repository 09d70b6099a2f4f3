package e2e

import (
	"encoding/json"
	"os"
	"os/exec"
	"regexp"
	"strings"
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
