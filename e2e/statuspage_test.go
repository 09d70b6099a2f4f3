package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"tcprelay/internal/child"
)

// browserTimeout bounds one headless chromium run.
const browserTimeout = 60 * time.Second

// TestStatusPageInBrowser: the relay's status page, opened in a real
// browser (headless chromium) while an outside client holds a connection
// open, shows the tunnel's public port, the client's address as the relay
// sees it, and the bytes it has sent so far. A screenshot of the page is
// kept as a test artifact ($TEST_ARTIFACTS, else the test's temporary
// directory).
func TestStatusPageInBrowser(t *testing.T) {
	chromium := requireProgram(t, "chromium", "chromium")
	e := newEnv(t)
	maddr := child.Addr(freePort(t))
	r := e.startRelayWith(nil, nil, "-metrics-addr", maddr)
	_, pub := e.startEcho("127.0.0.1", r.port)

	// A live client: it has sent known bytes, had them echoed, and stays
	// connected while the browser looks.
	c, err := net.DialTimeout("tcp", child.Addr(pub), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const sent = 12_345
	msg := randomBytes(sent)
	c.SetDeadline(time.Now().Add(clientTimeout))
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	if got, err := io.ReadAll(io.LimitReader(c, sent)); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("echo through the relay: %v (%d of %d bytes)", err, len(got), sent)
	}
	client := c.LocalAddr().String()
	url := "http://" + maddr + "/"

	// The ops listener opens a moment after the control port: wait for the
	// page to list the client, so the browser is not what finds it late.
	var page string
	if !child.WaitFor(10*time.Second, func() bool {
		resp, err := http.Get(url)
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		page = string(b)
		return resp.StatusCode == http.StatusOK && strings.Contains(page, client)
	}) {
		t.Fatalf("GET %s does not list the client %s:\n%s", url, client, page)
	}

	// The page is at / exactly.
	if resp, err := http.Get(url + "index.html"); err != nil {
		t.Error(err)
	} else {
		resp.Body.Close()
		if resp.StatusCode != http.StatusNotFound {
			t.Errorf("GET %sindex.html: %s, want 404 Not Found", url, resp.Status)
		}
	}

	dom := runChromium(t, chromium, "--dump-dom", url)
	for _, want := range []string{
		"Port " + strconv.Itoa(pub) + ":",
		"<code>" + client + "</code>",
		`<span class="ok">ready</span>`,
		// The agents table names the session's port; the member row, the
		// session's remote address.
		fmt.Sprintf(`<td class="ports"><a href="#port-%d">%d</a></td>`, pub, pub),
	} {
		if !strings.Contains(dom, want) {
			t.Errorf("the page chromium loaded lacks %q", want)
		}
	}
	if !regexp.MustCompile(`<tr><td>[^<]*</td><td><code>127\.0\.0\.1:\d+</code></td><td class="num">\d+</td>`).MatchString(dom) {
		t.Errorf("the page's member row has no remote address")
	}
	if strings.Contains(dom, "<nil>") {
		t.Errorf("the page says <nil>")
	}
	// The client's row: its bytes to the agent are the ones it sent,
	// counted while the connection is open.
	row := regexp.MustCompile(`<tr><td><code>` + regexp.QuoteMeta(client) + `</code></td>.*?</tr>`).FindString(dom)
	m := regexp.MustCompile(`<data value="(\d+)">`).FindAllStringSubmatch(row, -1)
	if len(m) != 2 {
		t.Fatalf("no byte counts in the client's row %q; the page:\n%s", row, dom)
	}
	if toAgent, _ := strconv.Atoi(m[0][1]); toAgent != sent {
		t.Errorf("the client's row shows %d bytes to the agent, want %d (the connection is open): %q", toAgent, sent, row)
	}
	if fromAgent, _ := strconv.Atoi(m[1][1]); fromAgent != sent {
		t.Errorf("the client's row shows %d bytes from the agent, want %d: %q", fromAgent, sent, row)
	}

	// The charts: clients and bytes per second over the last hour, drawn
	// by the relay as SVG, sampled every 10 s. The client keeps moving
	// bytes until the endpoint has a complete sample (within 10 s and the
	// watch's second), so the charts have something to show.
	chartRe := regexp.MustCompile(`(?s)<section class="endpoint" id="port-` + strconv.Itoa(pub) + `">.*?</section>`)
	samples := regexp.MustCompile(`<svg [^>]*data-samples="(\d+)" data-peak="(\d+)"`)
	var section string
	if !child.WaitFor(15*time.Second, func() bool {
		echoRounds(t, c, 4096)
		resp, err := http.Get(url)
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		section = chartRe.FindString(string(b))
		m := samples.FindAllStringSubmatch(section, -1)
		return len(m) == 2 && m[0][1] != "1" && m[1][2] != "0"
	}) {
		t.Fatalf("no charts with a complete sample for port %d within 15 s:\n%s", pub, section)
	}
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if csp := resp.Header.Get("Content-Security-Policy"); csp != "default-src 'none'; style-src 'unsafe-inline'" {
		t.Errorf("the page's Content-Security-Policy is %q", csp)
	}
	dom = runChromium(t, chromium, "--dump-dom", url)
	section = chartRe.FindString(dom)
	m = samples.FindAllStringSubmatch(section, -1)
	if len(m) != 2 || strings.Contains(dom, "<script") {
		t.Fatalf("chromium's DOM of port %d's section has %d charts, want 2, and no script:\n%s", pub, len(m), section)
	}
	if m[0][2] != "1" {
		t.Errorf("the clients chart's peak is %s, want 1 (one client)", m[0][2])
	}
	if peak, _ := strconv.Atoi(m[1][2]); peak <= 0 {
		t.Errorf("the bytes chart's peak is %d B/s, want more than 0", peak)
	}
	for _, want := range []string{"<figcaption>clients, peak 1 client</figcaption>", "<figcaption>bytes per second, peak "} {
		if !strings.Contains(section, want) {
			t.Errorf("port %d's section lacks %q", pub, want)
		}
	}

	dir := os.Getenv("TEST_ARTIFACTS")
	if dir == "" {
		dir = t.TempDir()
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	shot, err := filepath.Abs(filepath.Join(dir, "statuspage.png"))
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(shot)
	runChromium(t, chromium, "--screenshot="+shot, "--window-size=1280,900", url)
	png, err := os.ReadFile(shot)
	if err != nil {
		t.Fatalf("no screenshot: %v", err)
	}
	if !bytes.HasPrefix(png, []byte("\x89PNG\r\n\x1a\n")) || len(png) < 1000 {
		t.Errorf("the screenshot %s is not a PNG image (%d bytes)", shot, len(png))
	}
	t.Logf("screenshot of the status page: %s (%d bytes)", shot, len(png))
}

// runChromium runs headless chromium with args, within browserTimeout, in
// a process group of its own that is killed when it ends (chromium leaves
// helper processes), and returns its stdout.
func runChromium(t *testing.T, chromium string, args ...string) string {
	t.Helper()
	profile := t.TempDir() // removed after the cleanup below, which kills the group
	ctx, cancel := context.WithTimeout(context.Background(), browserTimeout)
	defer cancel()
	args = append([]string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
		"--disable-background-networking", "--disable-component-update", "--disable-sync",
		"--no-first-run", "--user-data-dir=" + profile}, args...)
	cmd := exec.CommandContext(ctx, chromium, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	// Files, not pipes: a helper that outlives chromium cannot hold up Wait.
	out, err := os.CreateTemp(profile, "stdout")
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	var stderr bytes.Buffer
	cmd.Stdout = out
	cmd.Stderr = &stderr
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pgid := cmd.Process.Pid
	t.Cleanup(func() { killGroup(t, pgid) })
	err = cmd.Wait()
	killGroup(t, pgid)
	if ctx.Err() != nil {
		t.Fatalf("chromium %s: no result within %v; stderr:\n%s", strings.Join(args, " "), browserTimeout, stderr.String())
	}
	if err != nil {
		t.Fatalf("chromium %s: %v; stderr:\n%s", strings.Join(args, " "), err, stderr.String())
	}
	b, err := os.ReadFile(out.Name())
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// killGroup kills every process left in group pgid and waits until none
// is left.
func killGroup(t *testing.T, pgid int) {
	if err := syscall.Kill(-pgid, syscall.SIGKILL); errors.Is(err, syscall.ESRCH) {
		return
	}
	if !child.WaitFor(killTimeout, func() bool { return groupGone(pgid) }) {
		t.Errorf("leak: chromium's processes (group %d) still exist %v after SIGKILL", pgid, killTimeout)
	}
}

// groupGone reports whether no live process is in group pgid. Zombies
// count as gone: they await a reaper that is not this test (chromium's
// helpers are reparented on its exit).
func groupGone(pgid int) bool {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return syscall.Kill(-pgid, 0) != nil
	}
	for _, ent := range ents {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			continue
		}
		i := bytes.LastIndexByte(stat, ')')
		f := strings.Fields(string(stat[i+1:]))
		// Fields after the name: state, ppid, pgrp.
		if len(f) > 2 && f[0] != "Z" && f[2] == strconv.Itoa(pgid) {
			return false
		}
	}
	return true
}

// echoRounds sends n random bytes on c and reads their echo.
func echoRounds(t *testing.T, c net.Conn, n int) {
	t.Helper()
	msg := randomBytes(n)
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	if got, err := io.ReadAll(io.LimitReader(c, int64(n))); err != nil || !bytes.Equal(got, msg) {
		t.Fatalf("echo through the relay: %v (%d of %d bytes)", err, len(got), n)
	}
}
