package e2e

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"tcprelay/internal/testutil"
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
	pollInterval    = 20 * time.Millisecond
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
	t     *testing.T
	mu    sync.Mutex
	procs []*proc
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
		if !p.exited() {
			e.t.Errorf("leak: %s (pid %d) still running at the end of the test; killing it", p, p.pid())
			p.cmd.Process.Kill()
			p.waitExit(killTimeout)
		}
		// Reaped by Wait, so the pid must be gone from the process table.
		if err := syscall.Kill(p.pid(), 0); !errors.Is(err, syscall.ESRCH) {
			e.t.Errorf("leak: pid %d (%s) still exists after the test (kill -0: %v)", p.pid(), p, err)
		}
	}
}

// proc is a started process.
type proc struct {
	t      *testing.T
	desc   string
	cmd    *exec.Cmd
	stdout *testutil.LockedBuffer // nil if scanned line by line (lines)
	stderr *testutil.LockedBuffer
	stdin  io.WriteCloser // if procOpts.stdinPipe
	done   chan struct{}  // closed when Wait returned
	daemon bool           // runs until the test stops it; must exit 0 on SIGTERM
	// service runs until the test stops it, like a daemon, but may end
	// in any way on SIGTERM (third-party servers: python3, iperf3, sshd).
	service bool

	mu      sync.Mutex
	stopped bool // stop ran
	killed  bool // the test SIGKILLed it on purpose
	// wantLines is how many stdout lines stop expects of a line-scanned
	// process; 0 means 1 (one announcement). See expectLines.
	wantLines int

	// Line-scanned stdout (echoserver).
	firstLine chan string
	scanDone  chan struct{}
	linesMu   sync.Mutex
	lines     []string
}

type procOpts struct {
	stdin      io.Reader
	stdinPipe  bool
	scanStdout bool
	daemon     bool
	service    bool
	env        []string // extra VAR=value entries, after the cleaned environment
}

func (p *proc) String() string { return p.desc }
func (p *proc) pid() int       { return p.cmd.Process.Pid }

// start starts bin with args and registers a cleanup that stops it.
func (e *env) start(bin string, args []string, o procOpts) *proc {
	t := e.t
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(withoutEnv(os.Environ(), "RELAY_SECRET", "LC_ALL", "LANG", "LANGUAGE"), "LC_ALL=C")
	cmd.Env = append(cmd.Env, o.env...)
	cmd.WaitDelay = 5 * time.Second // never hang in Wait on a stray pipe holder
	p := &proc{
		t:       t,
		desc:    strings.Join(append([]string{filepath.Base(bin)}, args...), " "),
		cmd:     cmd,
		stderr:  &testutil.LockedBuffer{},
		done:    make(chan struct{}),
		daemon:  o.daemon,
		service: o.service,
	}
	cmd.Stderr = p.stderr
	var pr, pw *os.File
	if o.scanStdout {
		var err error
		if pr, pw, err = os.Pipe(); err != nil {
			t.Fatal(err)
		}
		cmd.Stdout = pw
		p.firstLine = make(chan string, 1)
		p.scanDone = make(chan struct{})
	} else {
		p.stdout = &testutil.LockedBuffer{}
		cmd.Stdout = p.stdout
	}
	if o.stdinPipe {
		w, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		p.stdin = w
	} else if o.stdin != nil {
		cmd.Stdin = o.stdin
	}
	if err := cmd.Start(); err != nil {
		if pr != nil {
			pr.Close()
			pw.Close()
		}
		t.Fatalf("start %s: %v", p, err)
	}
	t.Logf("started %s (pid %d)", p, p.pid())
	if pw != nil {
		pw.Close() // the child holds the write end now
		go p.scan(pr)
	}
	go func() {
		cmd.Wait()
		close(p.done)
	}()
	e.mu.Lock()
	e.procs = append(e.procs, p)
	e.mu.Unlock()
	t.Cleanup(p.cleanup)
	return p
}

func withoutEnv(env []string, names ...string) []string {
	var out []string
outer:
	for _, kv := range env {
		for _, n := range names {
			if strings.HasPrefix(kv, n+"=") {
				continue outer
			}
		}
		out = append(out, kv)
	}
	return out
}

func (p *proc) scan(r *os.File) {
	defer close(p.scanDone)
	defer r.Close()
	sc := bufio.NewScanner(r)
	first := true
	for sc.Scan() {
		p.linesMu.Lock()
		p.lines = append(p.lines, sc.Text())
		p.linesMu.Unlock()
		if first {
			p.firstLine <- sc.Text()
			first = false
		}
	}
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *proc) waitExit(d time.Duration) bool {
	select {
	case <-p.done:
		return true
	case <-time.After(d):
		return false
	}
}

// status describes how the process ended; call after done.
func (p *proc) status() string {
	ps := p.cmd.ProcessState
	if ps == nil {
		return "not waited"
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return "killed by signal " + strconv.Itoa(int(ws.Signal())) + " (" + ws.Signal().String() + ")"
	}
	return "exit status " + strconv.Itoa(ps.ExitCode())
}

// exitCode is the exit status, or -1 if killed by a signal; call after done.
func (p *proc) exitCode() int { return p.cmd.ProcessState.ExitCode() }

// mustExit waits for a process that is expected to end by itself.
func (p *proc) mustExit(d time.Duration) {
	p.t.Helper()
	if !p.waitExit(d) {
		p.t.Fatalf("%s did not exit within %v\nstdout so far: %q\nstderr so far:\n%s", p, d, p.out(), p.stderr)
	}
}

func (p *proc) out() string {
	if p.stdout == nil {
		p.linesMu.Lock()
		defer p.linesMu.Unlock()
		return strings.Join(p.lines, "\n")
	}
	return p.stdout.String()
}

// kill SIGKILLs the process on purpose and waits for it.
func (p *proc) kill() {
	p.t.Helper()
	p.mu.Lock()
	p.killed = true
	p.mu.Unlock()
	p.cmd.Process.Signal(syscall.SIGKILL)
	if !p.waitExit(killTimeout) {
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

	if p.exited() {
		if (p.daemon || p.service) && !killed {
			t.Errorf("%s exited before the test stopped it (%s); stderr:\n%s", p, p.status(), p.stderr)
		}
	} else {
		p.cmd.Process.Signal(syscall.SIGTERM)
		start := time.Now()
		switch {
		case p.waitExit(stopTimeout):
			if p.daemon && p.exitCode() != 0 {
				t.Errorf("%s: %s after SIGTERM, want exit status 0 (graceful shutdown); stderr:\n%s", p, p.status(), p.stderr)
			} else {
				t.Logf("%s: %s %v after SIGTERM", p, p.status(), time.Since(start).Round(time.Millisecond))
			}
		default:
			t.Errorf("%s did not exit within %v of SIGTERM; sending SIGKILL; stderr:\n%s", p, stopTimeout, p.stderr)
			p.cmd.Process.Kill()
			if !p.waitExit(killTimeout) {
				t.Errorf("%s did not exit within %v of SIGKILL either", p, killTimeout)
				return
			}
		}
	}
	if strings.Contains(p.stderr.String(), "panic") {
		t.Errorf("%s: stderr mentions a panic:\n%s", p, p.stderr)
	}
	if p.scanDone != nil {
		p.mu.Lock()
		want := max(p.wantLines, 1)
		p.mu.Unlock()
		select {
		case <-p.scanDone:
			p.linesMu.Lock()
			lines := append([]string(nil), p.lines...)
			p.linesMu.Unlock()
			if len(lines) != want {
				t.Errorf("%s printed %d stdout lines, want exactly %d: %q", p, len(lines), want, lines)
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
	env, flags []string // as started, for restartRelay
}

// freePort returns a port that was free on 127.0.0.1 a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
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
		if r := e.tryRelay(port, env, flags); r != nil {
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
	if !old.exited() {
		t.Fatalf("restartRelay: %s (pid %d) is still running", old, old.pid())
	}
	deadline := time.Now().Add(readyTimeout)
	for attempt := 1; ; attempt++ {
		if r := e.tryRelay(old.port, old.env, old.flags); r != nil {
			if attempt > 1 {
				t.Logf("relay restarted on port %d at attempt %d", old.port, attempt)
			}
			return r
		}
		if time.Now().After(deadline) {
			t.Fatalf("relay: port %d still not bindable %v after the old relay ended", old.port, readyTimeout)
		}
		time.Sleep(pollInterval) // poll: the port frees up on the kernel's schedule
	}
}

// tryRelay starts `relay -bind 127.0.0.1 FLAGS PORT` and waits until it
// accepts. It returns nil if the relay exited because the port was taken,
// and fails the test if it exited for any other reason.
func (e *env) tryRelay(port int, env, flags []string) *relay {
	t := e.t
	t.Helper()
	args := append(append([]string{"-bind", "127.0.0.1"}, flags...), strconv.Itoa(port))
	p := e.start(relayBin, args, procOpts{daemon: true, env: env})
	r := &relay{proc: p, port: port, env: env, flags: flags}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	deadline := time.Now().Add(readyTimeout)
	for {
		if p.exited() {
			if strings.Contains(p.stderr.String(), "address already in use") {
				t.Logf("port %d taken (%s)", port, p.status())
				p.mu.Lock()
				p.stopped = true // ended as it should: nothing to stop
				p.mu.Unlock()
				return nil
			}
			t.Fatalf("%s exited during startup (%s); stderr:\n%s", p, p.status(), p.stderr)
		}
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			r.readyAddrs = append(r.readyAddrs, c.LocalAddr().String())
			c.Close()
			if !p.exited() { // else whoever took the port answered: loop to retry
				return r
			}
			continue
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not accepting on %s within %v (last dial error: %v); stderr:\n%s", p, addr, readyTimeout, err, p.stderr)
		}
		time.Sleep(pollInterval)
	}
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
	var line string
	select {
	case line = <-p.firstLine:
	case <-p.done:
		select {
		case line = <-p.firstLine:
		default:
			t.Fatalf("%s exited (%s) without announcing its address; stderr:\n%s", p, p.status(), p.stderr)
		}
	case <-time.After(announceTimeout):
		t.Fatalf("%s printed no line within %v; stderr:\n%s", p, announceTimeout, p.stderr)
	}
	port, ok := announcedPort(line, host)
	if !ok {
		t.Fatalf("%s: stdout line %q is not \"established relay address: %s:PORT\"", p, line, host)
	}
	return p, port
}

// announcedPort parses "established relay address: HOST:PORT".
func announcedPort(line, host string) (int, bool) {
	re := regexp.MustCompile(`^established relay address: ` + regexp.QuoteMeta(host) + `:(\d+)$`)
	m := re.FindStringSubmatch(line)
	if m == nil {
		return 0, false
	}
	port, err := strconv.Atoi(m[1])
	if err != nil || port < 1 || port > 65535 {
		return 0, false
	}
	return port, true
}

// expectLines sets how many stdout lines stop expects of a line-scanned
// agent: one more per re-registration the test causes.
func (p *proc) expectLines(n int) {
	p.mu.Lock()
	p.wantLines = n
	p.mu.Unlock()
}

// waitLine waits up to d for the n-th stdout line (1-based) of a
// line-scanned process and returns it.
func (p *proc) waitLine(n int, d time.Duration) (string, bool) {
	var line string
	ok := waitFor(d, func() bool {
		p.linesMu.Lock()
		defer p.linesMu.Unlock()
		if len(p.lines) >= n {
			line = p.lines[n-1]
			return true
		}
		return false
	})
	return line, ok
}

// signal sends sig (SIGSTOP, SIGCONT, ...) to the process.
func (p *proc) signal(sig syscall.Signal) {
	p.t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		p.t.Fatalf("%s: send %v: %v", p, sig, err)
	}
}

// sigterm sends SIGTERM for a test that checks the shutdown itself (with
// waitExit and status): stop, at cleanup, then leaves the process alone.
func (p *proc) sigterm() {
	p.t.Helper()
	p.mu.Lock()
	p.stopped = true
	p.mu.Unlock()
	p.signal(syscall.SIGTERM)
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
// PORT, and waits until ready(p, PORT) holds (tcpReady if nil) by polling.
// If the server exits during startup because the port got taken between
// freePort and its bind, it retries with a new port, up to 5 times. The
// server must still be running when the test stops it; its exit status on
// SIGTERM is only logged.
func (e *env) startService(bin string, args func(port int) []string, ready func(p *proc, port int) bool) (*proc, int) {
	t := e.t
	t.Helper()
	if ready == nil {
		ready = func(_ *proc, port int) bool { return tcpReady(port) }
	}
	for attempt := 1; attempt <= 5; attempt++ {
		port := freePort(t)
		p := e.start(bin, args(port), procOpts{service: true})
		deadline := time.Now().Add(serviceTimeout)
		for {
			if p.exited() {
				if strings.Contains(strings.ToLower(p.out()+p.stderr.String()), "address already in use") {
					t.Logf("attempt %d: port %d got taken (%s); retrying with a new port", attempt, port, p.status())
					p.mu.Lock()
					p.stopped = true // ended as it should: nothing to stop
					p.mu.Unlock()
					break
				}
				t.Fatalf("%s exited during startup (%s)\nstdout:\n%s\nstderr:\n%s", p, p.status(), p.out(), p.stderr)
			}
			if ready(p, port) {
				if !p.exited() { // else whoever took the port answered: loop to retry
					return p, port
				}
				continue
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s not ready on 127.0.0.1:%d within %v\nstdout:\n%s\nstderr:\n%s", p, port, serviceTimeout, p.out(), p.stderr)
			}
			time.Sleep(pollInterval)
		}
	}
	t.Fatalf("%s: could not get a free port in 5 attempts", filepath.Base(bin))
	return nil, 0
}

// tcpReady reports whether 127.0.0.1:port accepts a connection.
func tcpReady(port int) bool {
	c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), 200*time.Millisecond)
	if err != nil {
		return false
	}
	c.Close()
	return true
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
	if p.exitCode() != 0 {
		e.t.Fatalf("%s: %s, want exit status 0\nstdout:\n%s\nstderr:\n%s", p, p.status(), clip(p.out()), p.stderr)
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
	if p.exitCode() != 0 {
		t.Errorf("%s: %s, want 0; stderr:\n%s", p, p.status(), p.stderr)
	}
	if got := p.stdout.Bytes(); !bytes.Equal(got, input) {
		t.Errorf("%s: echoed %q, want %q", p, got, input)
	}
}

// waitFor polls cond every pollInterval until it is true or d has passed.
func waitFor(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(pollInterval)
	}
}
