package e2e

import (
	"bytes"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"tcprelay/internal/child"
)

// TestAdminAPIWithCtl: relay -admin-addr with a token, driven by `relay
// ctl` as an operator types it: list agents, endpoints and clients; close
// one client; drain a port (new clients refused, the load balancer's check
// says 503) and resume it; disconnect an agent (it comes back); reload the
// agents file (an error is reported and the agents in force are kept). A
// wrong token is a 401, and past the failed-authentication budget a 429.
func TestAdminAPIWithCtl(t *testing.T) {
	requireNC(t)
	e := newEnv(t)
	dir := t.TempDir()
	token := filepath.Join(dir, "token")
	os.WriteFile(token, []byte("an-admin-token-of-some-length\n"), 0o600)
	keyFile, key := e.agentKey("alice")
	agents := writeAgents(t, "", "alice "+key+"\n")
	aaddr, maddr := child.Addr(freePort(t)), child.Addr(freePort(t))
	r := e.startRelayWith(nil, nil, "-agents", agents, "-admin-addr", aaddr, "-admin-token-file", token, "-metrics-addr", maddr)
	alice, pub := e.startAgent(echoBin, []string{"-key", keyFile, "127.0.0.1", strconv.Itoa(r.port)}, "127.0.0.1")
	live := openLive(t, pub)
	client := live.c.LocalAddr().String()

	ctl := func(args ...string) *proc {
		t.Helper()
		return e.run(relayBin, append([]string{"ctl", "-addr", aaddr, "-token-file", token}, args...), nil)
	}
	okCtl := func(want string, args ...string) string {
		t.Helper()
		var p *proc
		check := func() bool { p = ctl(args...); return p.ExitCode() == 0 && strings.Contains(p.Out(), want) }
		if !child.WaitFor(5*time.Second, check) { // the API's listener opens just after the control port
			t.Fatalf("relay ctl %s: %s, stdout:\n%s\nstderr:\n%s\nwant %q", strings.Join(args, " "), p.Status(), p.Out(), p.Stderr, want)
		}
		t.Logf("relay ctl %s:\n%s", strings.Join(args, " "), p.Out())
		return p.Out()
	}
	okCtl("alice", "agents")
	okCtl(strconv.Itoa(pub), "endpoints")
	okCtl(client, "clients")

	okCtl("closed "+client, "close", strconv.Itoa(pub), client)
	if _, ok := live.closedWithin(2 * time.Second); !ok {
		t.Error("relay ctl close: the client's connection is still open")
	}

	okCtl("drains", "drain", strconv.Itoa(pub))
	p := e.nc("127.0.0.1", pub, []byte("while draining\n"))
	p.mustExit(clientTimeout)
	if len(p.Stdout.Bytes()) != 0 {
		t.Errorf("a client of a draining port was served: %q", p.Stdout.Bytes())
	}
	if code := httpStatus(t, "http://"+maddr+"/ready/"+strconv.Itoa(pub)); code != 503 {
		t.Errorf("/ready/%d while draining: %d, want 503", pub, code)
	}
	okCtl("takes new clients again", "resume", strconv.Itoa(pub))
	e.ncEcho("127.0.0.1", pub, []byte("after resume\n"))

	alice.expectLines(2)
	okCtl("disconnected 1 session\n", "disconnect", "alice")
	if line, ok := alice.waitLine(2, 15*time.Second); !ok {
		t.Errorf("alice did not come back after the disconnect; stderr:\n%s", alice.Stderr)
	} else {
		t.Logf("alice again: %s", line)
	}

	writeAgents(t, agents, "alice "+key+" colour=blue\n")
	if p := ctl("reload"); p.ExitCode() != 1 || !strings.Contains(p.Stderr.String(), "colour") {
		t.Errorf("relay ctl reload of a broken file: %s, stderr %q; want exit 1 naming the error", p.Status(), p.Stderr)
	}
	writeAgents(t, agents, "alice "+key+"\n")
	okCtl("reloaded: 1 agent admitted by key", "reload")

	// The metrics address does not serve the API.
	if code := httpStatus(t, "http://"+maddr+"/v1/agents"); code != 404 {
		t.Errorf("/v1/agents on the metrics address: %d, want 404", code)
	}
	// With curl, as an operator would: the token works, and without it is
	// a 401.
	curl := requireProgram(t, "curl", "curl")
	tok, _ := os.ReadFile(token)
	if p := e.runOK(curl, []string{"-sS", "-H", "Authorization: Bearer " + strings.TrimSpace(string(tok)), "http://" + aaddr + "/v1/endpoints"}, nil); !strings.Contains(p.Out(), `"port":`+strconv.Itoa(pub)) {
		t.Errorf("curl /v1/endpoints with the token: %s", p.Out())
	}
	if p := e.runOK(curl, []string{"-s", "-o", "/dev/null", "-w", "%{http_code}", "http://" + aaddr + "/v1/agents"}, nil); p.Out() != "401" {
		t.Errorf("curl /v1/agents without a token: %q, want 401", p.Out())
	}
	// Wrong tokens: 401, then 429 once the address's budget is spent.
	codes := map[int]int{}
	for range 8 {
		req, _ := http.NewRequest("GET", "http://"+aaddr+"/v1/agents", nil)
		req.Header.Set("Authorization", "Bearer a-wrong-token")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		codes[resp.StatusCode]++
	}
	if codes[401] == 0 || codes[429] == 0 || codes[200] != 0 {
		t.Errorf("8 requests with a wrong token: %v, want 401s then 429s", codes)
	}
	if p := e.run(relayBin, []string{"ctl", "-addr", aaddr, "-token-file", filepath.Join(dir, "none"), "agents"}, nil); p.ExitCode() == 0 {
		t.Errorf("relay ctl with a missing token file: %s, want a failure", p.Status())
	}
}

// httpStatus is the status code of a GET of url.
func httpStatus(t *testing.T, url string) int {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// TestOperatingDocumentsEveryFlag: docs/OPERATING.md's table names every
// flag `relay -h` lists, so an operator never has to read code for one.
func TestOperatingDocumentsEveryFlag(t *testing.T) {
	e := newEnv(t)
	help := e.run(relayBin, []string{"-h"}, nil)
	doc, err := os.ReadFile(filepath.Join("..", "docs", "OPERATING.md"))
	if err != nil {
		t.Fatal(err)
	}
	flags := regexp.MustCompile(`(?m)^  -([a-z0-9-]+)`).FindAllStringSubmatch(help.Stdout.String()+help.Stderr.String(), -1)
	if len(flags) < 20 {
		t.Fatalf("relay -h listed %d flags:\n%s%s", len(flags), help.Stdout, help.Stderr)
	}
	for _, f := range flags {
		if !bytes.Contains(doc, []byte("`-"+f[1])) {
			t.Errorf("docs/OPERATING.md does not name -%s", f[1])
		}
	}
}
