package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/child"
)

// Paths of the binaries TestMain builds.
var relayBin, echoBin, exposeBin string

// Bounds. None of them is a synchronisation sleep: each bounds a wait for
// an event, and the tests fail when one is exceeded.
const (
	readyTimeout    = 5 * time.Second  // relay accepting on its control port
	announceTimeout = 10 * time.Second // echoserver printing its address
	stopTimeout     = 15 * time.Second // exit after SIGTERM (the relay drains up to 10s)
	killTimeout     = 5 * time.Second  // exit after SIGKILL
	clientTimeout   = 60 * time.Second // one nc or telnet run
	serviceTimeout  = 10 * time.Second // a third-party server accepting on its port
)

func TestMain(m *testing.M) {
	os.Exit(buildAndRun(m))
}

func buildAndRun(m *testing.M) int {
	dir, err := os.MkdirTemp("", "tcprelay-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	relayBin = filepath.Join(dir, "relay")
	echoBin = filepath.Join(dir, "echoserver")
	exposeBin = filepath.Join(dir, "expose")
	for bin, pkg := range map[string]string{
		relayBin:  "tcprelay/cmd/relay",
		echoBin:   "tcprelay/cmd/echoserver",
		exposeBin: "tcprelay/cmd/expose",
	} {
		cmd := exec.Command("go", "build", "-o", bin, pkg)
		if out, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "e2e: go build -o %s %s: %v\n%s", bin, pkg, err, out)
			return 1
		}
	}
	return m.Run()
}

// missing skips the test because a client program is not installed, except
// on CI, which must never skip.
func missing(t *testing.T, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s (CI=true: refusing to skip)", msg)
	}
	// make test lists the skipped tests at the end, so that a missing
	// program does not hide behind a quiet "ok".
	if path := os.Getenv("E2E_SKIPPED"); path != "" {
		if f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644); err == nil {
			fmt.Fprintf(f, "%s: %s\n", t.Name(), msg)
			f.Close()
		}
	}
	t.Skipf("%s; skipping", msg)
}

var ncCheck struct {
	once sync.Once
	err  error
}

// requireNC checks that nc is Debian's netcat-openbsd, which has -N.
func requireNC(t *testing.T) {
	t.Helper()
	ncCheck.once.Do(func() {
		path, err := exec.LookPath("nc")
		if err != nil {
			ncCheck.err = fmt.Errorf("nc not found in PATH (install Debian package netcat-openbsd)")
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		out, _ := exec.CommandContext(ctx, path, "-h").CombinedOutput() // exits 1 on -h
		if !bytes.Contains(out, []byte("OpenBSD netcat")) {
			ncCheck.err = fmt.Errorf("%s is not OpenBSD netcat (need -N; install Debian package netcat-openbsd); nc -h said:\n%s", path, out)
		}
	})
	if ncCheck.err != nil {
		missing(t, "%v", ncCheck.err)
	}
}

func requireTelnet(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("telnet"); err != nil {
		missing(t, "telnet not found in PATH (install Debian package telnet)")
	}
}

// env is one test's set of processes.
type env struct {
	t         *testing.T
	mu        sync.Mutex
	procs     []*proc
	stateHome string // XDG_STATE_HOME of every process
	// relayWrap, if set, runs each relay under this command and its
	// arguments (such as prlimit --nofile=N:N), which then exec the relay.
	relayWrap []string
}

// newEnv returns an env whose leak check runs after every process's own
// cleanup (cleanups run last-registered first).
func newEnv(t *testing.T) *env {
	e := &env{t: t}
	t.Cleanup(e.checkLeaks)
	return e
}

func (e *env) checkLeaks() {
	e.mu.Lock()
	procs := append([]*proc(nil), e.procs...)
	e.mu.Unlock()
	for _, p := range procs {
		if !p.Exited() {
			e.t.Errorf("leak: %s (pid %d) still running at the end of the test; killing it", p, p.Pid())
			p.Proc.Kill()
		}
		// Reaped by Wait, so the pid must be gone from the process table.
		if err := syscall.Kill(p.Pid(), 0); !errors.Is(err, syscall.ESRCH) {
			e.t.Errorf("leak: pid %d (%s) still exists after the test (kill -0: %v)", p.Pid(), p, err)
		}
	}
}

// proc is a started process, with what the test expects of its end.
type proc struct {
	*child.Proc
	t      *testing.T
	daemon bool // runs until the test stops it; must exit 0 on SIGTERM
	// service runs until the test stops it, like a daemon, but may end
	// in any way on SIGTERM (third-party servers: python3, iperf3, sshd).
	service bool

	mu      sync.Mutex
	stopped bool // stop ran
	killed  bool // the test SIGKILLed it on purpose
	// wantLines is how many stdout lines stop expects of a line-scanned
	// process; 0 means 1 (one announcement). See expectLines.
	wantLines int
}

type procOpts struct {
	stdin      io.Reader
	stdinPipe  bool
	scanStdout bool
	daemon     bool
	service    bool
	env        []string // extra VAR=value entries, after the cleaned environment
}

// start starts bin with args and registers a cleanup that stops it.
func (e *env) start(bin string, args []string, o procOpts) *proc {
	t := e.t
	t.Helper()
	desc := strings.Join(append([]string{filepath.Base(bin)}, args...), " ")
	// Relays keep their state files in the test's own directory (a relay
	// restarted in the test finds its own).
	e.mu.Lock()
	if e.stateHome == "" {
		e.stateHome = t.TempDir()
	}
	env := append([]string{"XDG_STATE_HOME=" + e.stateHome}, o.env...)
	e.mu.Unlock()
	cp, err := child.Start(desc, bin, args, child.Options{
		Env: env, Stdin: o.stdin, StdinPipe: o.stdinPipe, Scan: o.scanStdout})
	if err != nil {
		t.Fatal(err)
	}
	p := &proc{Proc: cp, t: t, daemon: o.daemon, service: o.service}
	t.Logf("started %s (pid %d)", p, p.Pid())
	e.mu.Lock()
	e.procs = append(e.procs, p)
	e.mu.Unlock()
	t.Cleanup(p.cleanup)
	return p
}

// mustExit waits for a process that is expected to end by itself.
func (p *proc) mustExit(d time.Duration) {
	p.t.Helper()
	if !p.Wait(d) {
		p.t.Fatalf("%s did not exit within %v\nstdout so far: %q\nstderr so far:\n%s", p, d, p.Out(), p.Stderr)
	}
}

// kill SIGKILLs the process on purpose and waits for it.
func (p *proc) kill() {
	p.t.Helper()
	p.mu.Lock()
	p.killed = true
	p.mu.Unlock()
	if !p.Proc.Kill() {
		p.t.Fatalf("%s did not exit within %v of SIGKILL", p, killTimeout)
	}
}

// stop sends SIGTERM, waits (bounded), SIGKILLs if needed, and for a daemon
// asserts exit status 0 (graceful shutdown). It also checks stderr for
// panics. It runs once; cleanup calls it for processes the test left.
func (p *proc) stop() {
	t := p.t
	t.Helper()
	p.mu.Lock()
	if p.stopped {
		p.mu.Unlock()
		return
	}
	p.stopped = true
	killed := p.killed
	p.mu.Unlock()

	if p.Exited() {
		if (p.daemon || p.service) && !killed {
			t.Errorf("%s exited before the test stopped it (%s); stderr:\n%s", p, p.Status(), p.Stderr)
		}
	} else {
		p.Cmd.Process.Signal(syscall.SIGTERM)
		start := time.Now()
		switch {
		case p.Wait(stopTimeout):
			if p.daemon && p.ExitCode() != 0 {
				t.Errorf("%s: %s after SIGTERM, want exit status 0 (graceful shutdown); stderr:\n%s", p, p.Status(), p.Stderr)
			} else {
				t.Logf("%s: %s %v after SIGTERM", p, p.Status(), time.Since(start).Round(time.Millisecond))
			}
		default:
			t.Errorf("%s did not exit within %v of SIGTERM; sending SIGKILL; stderr:\n%s", p, stopTimeout, p.Stderr)
			if !p.Proc.Kill() {
				t.Errorf("%s did not exit within %v of SIGKILL either", p, killTimeout)
				return
			}
		}
	}
	if strings.Contains(p.Stderr.String(), "panic") {
		t.Errorf("%s: stderr mentions a panic:\n%s", p, p.Stderr)
	}
	if closed := p.StdoutClosed(); closed != nil {
		p.mu.Lock()
		want := max(p.wantLines, 1)
		p.mu.Unlock()
		select {
		case <-closed:
			lines := p.Lines()
			if len(lines) != want {
				t.Errorf("%s printed %d stdout lines, want exactly %d: %q; its stderr:\n%s", p, len(lines), want, lines, lastLines(p.Stderr.String(), 30))
			}
		case <-time.After(killTimeout):
			t.Errorf("%s: stdout not closed %v after exit", p, killTimeout)
		}
	}
}

func (p *proc) cleanup() { p.stop() }

// relay is a running relay.
type relay struct {
	*proc
	port int
	// readyAddrs are the local addresses of the readiness probes: the relay
	// may log their connections as dropped.
	readyAddrs []string
	ip         string   // the address it binds (-bind)
	env, flags []string // as started, for restartRelay
}

// freePort returns a port that was free on 127.0.0.1 a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	port, err := child.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	return port
}

// startRelay starts `relay -bind 127.0.0.1 PORT` on a free PORT chosen by
// pick (freePort if nil), retrying with a new port up to 5 times if the
// relay exits because the port got taken, and waits until it accepts.
func (e *env) startRelay(pick func() int) *relay {
	e.t.Helper()
	return e.startRelayWith(pick, nil)
}

// startRelayWith is startRelay with extra environment entries (such as
// RELAY_SECRET=...) and extra flags before PORT.
func (e *env) startRelayWith(pick func() int, env []string, flags ...string) *relay {
	t := e.t
	t.Helper()
	if pick == nil {
		pick = func() int { return freePort(t) }
	}
	for attempt := 1; attempt <= 5; attempt++ {
		port := pick()
		if r := e.tryRelay("127.0.0.1", port, env, flags); r != nil {
			return r
		}
		t.Logf("attempt %d: port %d got taken; retrying with a new port", attempt, port)
	}
	t.Fatalf("relay: could not get a free port in 5 attempts")
	return nil
}

// restartRelay starts a new relay like old (same PORT, environment and
// flags) after old ended, retrying for up to readyTimeout while the port is
// not bindable yet, and waits until it accepts.
func (e *env) restartRelay(old *relay) *relay {
	t := e.t
	t.Helper()
	if !old.Exited() {
		t.Fatalf("restartRelay: %s (pid %d) is still running", old, old.Pid())
	}
	// The port frees up on the kernel's schedule: retry.
	var r *relay
	attempts := 0
	check.Eventually(t, readyTimeout, func() error {
		attempts++
		if r = e.tryRelay(old.ip, old.port, old.env, old.flags); r == nil {
			return fmt.Errorf("relay: port %d still not bindable after the old relay ended", old.port)
		}
		return nil
	})
	if attempts > 1 {
		t.Logf("relay restarted on port %d at attempt %d", old.port, attempts)
	}
	return r
}

// tryRelay starts `relay -bind IP FLAGS PORT` and waits until it accepts.
// It returns nil if the relay exited because the port was taken, and fails
// the test if it exited for any other reason.
func (e *env) tryRelay(ip string, port int, env, flags []string) *relay {
	t := e.t
	t.Helper()
	args := append(append([]string{"-bind", ip}, flags...), strconv.Itoa(port))
	bin := relayBin
	if len(e.relayWrap) > 0 {
		bin, args = e.relayWrap[0], append(append(e.relayWrap[1:len(e.relayWrap):len(e.relayWrap)], relayBin), args...)
	}
	p := e.start(bin, args, procOpts{daemon: true, env: env})
	r := &relay{proc: p, port: port, ip: ip, env: env, flags: flags}
	var dialErr error
	err := p.AwaitReady(readyTimeout, func() bool {
		c, err := net.DialTimeout("tcp", net.JoinHostPort(ip, strconv.Itoa(port)), 200*time.Millisecond)
		if err != nil {
			dialErr = err
			return false
		}
		r.readyAddrs = append(r.readyAddrs, c.LocalAddr().String())
		c.Close()
		return true
	})
	switch {
	case errors.Is(err, child.ErrPortTaken):
		t.Logf("port %d taken (%s)", port, p.Status())
		p.ended()
		return nil
	case err != nil:
		t.Fatalf("%v (last dial error: %v); stderr:\n%s", err, dialErr, p.Stderr)
	}
	return r
}

// startEcho starts `echoserver HOST RELAYPORT` and returns the process and
// the public port it announced (see startAgent).
func (e *env) startEcho(host string, relayPort int) (*proc, int) {
	e.t.Helper()
	return e.startAgent(echoBin, []string{host, strconv.Itoa(relayPort)}, host)
}

// startExpose starts `expose [flags] HOST RELAYPORT TARGET` and returns the
// process and the public port it announced (see startAgent).
func (e *env) startExpose(host string, relayPort int, target string, flags ...string) (*proc, int) {
	e.t.Helper()
	args := append(append([]string(nil), flags...), host, strconv.Itoa(relayPort), target)
	return e.startAgent(exposeBin, args, host)
}

// startAgent starts an agent (echoserver, expose) as a daemon, reads its
// announcement line with a bufio.Scanner under a timeout, checks it is
// exactly "established relay address: HOST:PORT" with the HOST it dialed,
// and returns the process and the public port.
func (e *env) startAgent(bin string, args []string, host string) (*proc, int) {
	e.t.Helper()
	return e.startAgentWith(bin, args, host, nil)
}

// startEchoWith is startEcho with extra environment entries and flags.
func (e *env) startEchoWith(host string, relayPort int, env []string, flags ...string) (*proc, int) {
	e.t.Helper()
	args := append(append([]string(nil), flags...), host, strconv.Itoa(relayPort))
	return e.startAgentWith(echoBin, args, host, env)
}

// startAgentWith is startAgent with extra environment entries.
func (e *env) startAgentWith(bin string, args []string, host string, env []string) (*proc, int) {
	t := e.t
	t.Helper()
	p := e.start(bin, args, procOpts{scanStdout: true, daemon: true, env: env})
	line, err := p.FirstLine(announceTimeout)
	if err != nil {
		t.Fatalf("%v, want its address; stderr:\n%s", err, p.Stderr)
	}
	port, ok := child.AnnouncedPort(line, host)
	if !ok {
		t.Fatalf("%s: stdout line %q is not \"established relay address: %s:PORT\"", p, line, host)
	}
	return p, port
}

// expectLines sets how many stdout lines stop expects of a line-scanned
// agent: one more per re-registration the test causes.
func (p *proc) expectLines(n int) {
	p.mu.Lock()
	p.wantLines = n
	p.mu.Unlock()
}

// reannounced waits up to d for a line-scanned agent's second
// announcement (after a reconnection, on 127.0.0.1) and returns its port;
// the test fails if none comes.
func (p *proc) reannounced(d time.Duration) int {
	p.t.Helper()
	p.expectLines(2)
	line, ok := p.waitLine(2, d)
	port, isAddr := child.AnnouncedPort(line, "127.0.0.1")
	if !ok || !isAddr {
		p.t.Fatalf("%s: no second announcement within %v (got %q); stderr:\n%s", p, d, line, p.Stderr)
	}
	return port
}

// waitLine waits up to d for the n-th stdout line (1-based) of a
// line-scanned process and returns it.
func (p *proc) waitLine(n int, d time.Duration) (string, bool) {
	var line string
	ok := child.WaitFor(d, func() bool {
		var ok bool
		line, ok = p.Line(n)
		return ok
	})
	return line, ok
}

// signal sends sig (SIGSTOP, SIGCONT, ...) to the process.
func (p *proc) signal(sig syscall.Signal) {
	p.t.Helper()
	if err := p.Cmd.Process.Signal(sig); err != nil {
		p.t.Fatalf("%s: send %v: %v", p, sig, err)
	}
}

// sigterm sends SIGTERM for a test that checks the shutdown itself (with
// Wait and Status): stop, at cleanup, then leaves the process alone.
func (p *proc) sigterm() {
	p.t.Helper()
	p.ended()
	p.signal(syscall.SIGTERM)
}

// ended marks the process as needing no stop at cleanup: it ended as the
// test wanted, or the test stops it itself.
func (p *proc) ended() {
	p.mu.Lock()
	p.stopped = true
	p.mu.Unlock()
}

// requireProgram returns the path of name (a command looked up in PATH, or
// an absolute path), or skips the test naming the Debian package to install
// (fails instead on CI).
func requireProgram(t *testing.T, name, debianPackage string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		missing(t, "%s not found (install Debian package %s): %v", name, debianPackage, err)
	}
	return path
}

// startService starts a third-party server (redis-server, sshd, ...) that
// listens on 127.0.0.1:PORT, with args(PORT) as its arguments, on a free
// PORT, and waits until ready(p, PORT) holds (child.TCPReady if nil) by
// polling. If the server exits during startup because the port got taken
// between freePort and its bind, it retries with a new port, up to 5
// times. The server must still be running when the test stops it; its exit
// status on SIGTERM is only logged.
func (e *env) startService(bin string, args func(port int) []string, ready func(p *proc, port int) bool) (*proc, int) {
	t := e.t
	t.Helper()
	if ready == nil {
		ready = func(_ *proc, port int) bool { return child.TCPReady(port) }
	}
	for attempt := 1; attempt <= 5; attempt++ {
		port := freePort(t)
		p := e.start(bin, args(port), procOpts{service: true})
		err := p.AwaitReady(serviceTimeout, func() bool { return ready(p, port) })
		switch {
		case errors.Is(err, child.ErrPortTaken):
			t.Logf("attempt %d: port %d got taken (%s); retrying with a new port", attempt, port, p.Status())
			p.ended()
		case err != nil:
			t.Fatalf("%v (127.0.0.1:%d)\nstdout:\n%s\nstderr:\n%s", err, port, p.Out(), p.Stderr)
		default:
			return p, port
		}
	}
	t.Fatalf("%s: could not get a free port in 5 attempts", filepath.Base(bin))
	return nil, 0
}

// run runs a client program to completion (bounded by clientTimeout) and
// returns it; the caller checks its exit status and output.
func (e *env) run(bin string, args []string, stdin []byte) *proc {
	e.t.Helper()
	var o procOpts
	if stdin != nil {
		o.stdin = bytes.NewReader(stdin)
	}
	p := e.start(bin, args, o)
	p.mustExit(clientTimeout)
	return p
}

// runOK is run, and fails the test unless the program exits 0.
func (e *env) runOK(bin string, args []string, stdin []byte) *proc {
	e.t.Helper()
	p := e.run(bin, args, stdin)
	if p.ExitCode() != 0 {
		e.t.Fatalf("%s: %s, want exit status 0\nstdout:\n%s\nstderr:\n%s", p, p.Status(), clip(p.Out()), p.Stderr)
	}
	return p
}

// clip shortens s for an error message.
func clip(s string) string {
	const limit = 2000
	if len(s) <= limit {
		return s
	}
	return s[:limit] + fmt.Sprintf("... (%d bytes in all)", len(s))
}

// nc starts `nc -N HOST PORT` with input on stdin.
func (e *env) nc(host string, port int, input []byte) *proc {
	e.t.Helper()
	return e.start("nc", []string{"-N", host, strconv.Itoa(port)}, procOpts{stdin: bytes.NewReader(input)})
}

// ncEcho sends input through nc and checks that exactly input comes back.
func (e *env) ncEcho(host string, port int, input []byte) {
	t := e.t
	t.Helper()
	p := e.nc(host, port, input)
	p.mustExit(clientTimeout)
	if p.ExitCode() != 0 {
		t.Errorf("%s: %s, want 0; stderr:\n%s", p, p.Status(), p.Stderr)
	}
	if got := p.Stdout.Bytes(); !bytes.Equal(got, input) {
		t.Errorf("%s: echoed %q, want %q", p, got, input)
	}
}

// startHAProxy starts haproxy in TCP mode in front of the servers of
// backend (the lines of its "backend back" section), with extra lines for
// its global section, and returns the port of its frontend.
func (e *env) startHAProxy(global, backend string) int {
	t := e.t
	t.Helper()
	haproxy := requireProgram(t, "haproxy", "haproxy")
	cfg := filepath.Join(t.TempDir(), "haproxy.cfg")
	_, port := e.startService(haproxy, func(port int) []string {
		os.WriteFile(cfg, []byte(fmt.Sprintf(`global
  maxconn 2000
%s
defaults
  mode tcp
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  retries 3
  option redispatch 1
frontend front
  bind 127.0.0.1:%d
  default_backend back
backend back
%s`, global, port, backend)), 0o644)
		return []string{"-db", "-f", cfg}
	}, nil)
	return port
}
