package main

// Processes: every program the bench starts goes through start, is
// registered, and is killed by killAll at the end, on an error, or on a
// signal. Children also get SIGKILL from the kernel if the bench itself dies
// (Pdeathsig), which is tied to the thread that forked them: they are all
// forked from one locked thread that never exits.

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

var spawnCh = make(chan func())

func init() {
	go func() {
		runtime.LockOSThread() // never unlocked: Pdeathsig fires when this thread exits
		for f := range spawnCh {
			f()
		}
	}()
}

// onSpawnThread runs f on the locked spawning thread and waits for it.
func onSpawnThread(f func()) {
	done := make(chan struct{})
	spawnCh <- func() {
		defer close(done)
		f()
	}
	<-done
}

// tailBuf keeps the last max bytes written to it.
type tailBuf struct {
	mu  sync.Mutex
	b   []byte
	max int
}

func (t *tailBuf) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if t.max > 0 && len(t.b) > t.max {
		t.b = append([]byte(nil), t.b[len(t.b)-t.max:]...)
	}
	return len(p), nil
}

func (t *tailBuf) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.b)
}

func (t *tailBuf) Bytes() []byte {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]byte(nil), t.b...)
}

// proc is a started process.
type proc struct {
	name   string
	cmd    *exec.Cmd
	done   chan struct{} // closed when Wait returned
	stdout *tailBuf      // nil when stdout is scanned line by line
	stderr *tailBuf

	linesMu  sync.Mutex
	lines    []string
	scanDone chan struct{}
}

type procOpts struct {
	scan bool     // read stdout line by line (servers); else collect it
	env  []string // extra VAR=value entries
}

var registry struct {
	sync.Mutex
	procs   []*proc
	closing bool
}

var errInterrupted = errors.New("interrupted")

// start starts bin with args and registers it for killAll.
func start(name, bin string, args []string, o procOpts) (*proc, error) {
	cmd := exec.Command(bin, args...)
	cmd.Env = append(append(os.Environ(), "LC_ALL=C"), o.env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = 2 * time.Second
	p := &proc{name: name, cmd: cmd, done: make(chan struct{}), stderr: &tailBuf{max: 64 << 10}}
	cmd.Stderr = p.stderr
	var pr, pw *os.File
	if o.scan {
		var err error
		if pr, pw, err = os.Pipe(); err != nil {
			return nil, err
		}
		cmd.Stdout = pw
		p.scanDone = make(chan struct{})
	} else {
		p.stdout = &tailBuf{max: 16 << 20}
		cmd.Stdout = p.stdout
	}
	registry.Lock()
	if registry.closing {
		registry.Unlock()
		if pr != nil {
			pr.Close()
			pw.Close()
		}
		return nil, errInterrupted
	}
	var err error
	onSpawnThread(func() { err = cmd.Start() })
	if err == nil {
		registry.procs = append(registry.procs, p)
	}
	registry.Unlock()
	if pw != nil {
		pw.Close() // the child holds the write end now
	}
	if err != nil {
		if pr != nil {
			pr.Close()
		}
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	if pr != nil {
		go p.scan(pr)
	}
	go func() {
		cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) scan(r *os.File) {
	defer close(p.scanDone)
	defer r.Close()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		p.linesMu.Lock()
		if len(p.lines) < 100000 {
			p.lines = append(p.lines, sc.Text())
		}
		p.linesMu.Unlock()
	}
}

// countLines counts the stdout lines that contain s (scanned processes).
func (p *proc) countLines(s string) int {
	p.linesMu.Lock()
	defer p.linesMu.Unlock()
	n := 0
	for _, l := range p.lines {
		if strings.Contains(l, s) {
			n++
		}
	}
	return n
}

// firstLine returns the first stdout line, if any (scanned processes).
func (p *proc) firstLine() (string, bool) {
	p.linesMu.Lock()
	defer p.linesMu.Unlock()
	if len(p.lines) == 0 {
		return "", false
	}
	return p.lines[0], true
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *proc) wait(d time.Duration) bool {
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
		return "killed by " + ws.Signal().String()
	}
	return "exit status " + strconv.Itoa(ps.ExitCode())
}

// kill SIGKILLs the process and waits for it (bounded).
func (p *proc) kill() {
	if p == nil || p.exited() {
		return
	}
	p.cmd.Process.Kill()
	p.wait(5 * time.Second)
}

// lastLog returns the last stderr line that contains one of subs, clipped.
func (p *proc) lastLog(subs ...string) string {
	lines := strings.Split(strings.TrimSpace(p.stderr.String()), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		for _, s := range subs {
			if strings.Contains(lines[i], s) {
				l := lines[i]
				if strings.HasPrefix(l, "time=") { // slog's timestamp: noise here
					_, l, _ = strings.Cut(l, " ")
				}
				return clip(l, 300)
			}
		}
	}
	return ""
}

// killAll kills every process still running; later starts fail.
func killAll() {
	registry.Lock()
	registry.closing = true
	procs := append([]*proc(nil), registry.procs...)
	registry.Unlock()
	for _, p := range procs {
		if !p.exited() {
			p.cmd.Process.Kill()
		}
	}
	for _, p := range procs {
		if !p.wait(5 * time.Second) {
			fmt.Fprintf(os.Stderr, "bench: %s (pid %d) did not exit within 5s of SIGKILL\n", p.name, p.pid())
		}
	}
}

// runningCount reports how many started processes are still running.
func runningCount() int {
	registry.Lock()
	defer registry.Unlock()
	n := 0
	for _, p := range registry.procs {
		if !p.exited() {
			n++
		}
	}
	return n
}

func clip(s string, n int) string {
	s = strings.TrimSpace(s)
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// freePort returns a port that was free on 127.0.0.1 a moment ago.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// relayProc is a running ./relay.
type relayProc struct {
	*proc
	port int
}

// startRelay starts `relay -bind 127.0.0.1 FLAGS PORT` on a free PORT,
// retrying with another port if it got taken, and waits for its
// "relay listening" log line.
func startRelay(cfg *config, flags ...string) (*relayProc, error) {
	for attempt := 1; attempt <= 5; attempt++ {
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		args := append(append([]string{"-bind", "127.0.0.1"}, flags...), strconv.Itoa(port))
		p, err := start("relay", cfg.relayBin, args, procOpts{scan: true, env: cfg.agentEnv()})
		if err != nil {
			return nil, err
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			if p.exited() {
				if strings.Contains(p.stderr.String(), "address already in use") {
					break // retry with another port
				}
				return nil, fmt.Errorf("relay exited during start-up (%s): %s", p.status(), clip(p.stderr.String(), 1000))
			}
			if strings.Contains(p.stderr.String(), "relay listening") {
				return &relayProc{proc: p, port: port}, nil
			}
			if time.Now().After(deadline) {
				p.kill()
				return nil, fmt.Errorf("relay not listening within 10s: %s", clip(p.stderr.String(), 1000))
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return nil, errors.New("relay: no free port in 5 attempts")
}

var announceRE = regexp.MustCompile(`^established relay address: 127\.0\.0\.1:(\d+)$`)

// startAgent starts an agent (./echoserver or ./expose) that dials the relay
// at 127.0.0.1:relayPort and returns it with the public port it announced.
func startAgent(cfg *config, bin string, relayPort int, extra ...string) (*proc, int, error) {
	name := filepath.Base(bin)
	args := append([]string{"127.0.0.1", strconv.Itoa(relayPort)}, extra...)
	p, err := start(name, bin, args, procOpts{scan: true, env: cfg.agentEnv()})
	if err != nil {
		return nil, 0, err
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if line, ok := p.firstLine(); ok {
			m := announceRE.FindStringSubmatch(line)
			if m == nil {
				p.kill()
				return nil, 0, fmt.Errorf("%s: first stdout line %q is not \"established relay address: 127.0.0.1:PORT\"", name, line)
			}
			port, _ := strconv.Atoi(m[1])
			return p, port, nil
		}
		if p.exited() {
			return nil, 0, fmt.Errorf("%s exited (%s) without announcing its address: %s", name, p.status(), clip(p.stderr.String(), 1000))
		}
		if time.Now().After(deadline) {
			p.kill()
			return nil, 0, fmt.Errorf("%s announced no address within 10s: %s", name, clip(p.stderr.String(), 1000))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// startService starts a third-party server on a free port (args(port)) and
// waits until ready(p, port), retrying with another port if it was taken.
func startService(name, bin string, args func(port int) []string, ready func(p *proc, port int) bool) (*proc, int, error) {
	if ready == nil {
		ready = func(_ *proc, port int) bool { return tcpReady(port) }
	}
	for attempt := 1; attempt <= 5; attempt++ {
		port, err := freePort()
		if err != nil {
			return nil, 0, err
		}
		p, err := start(name, bin, args(port), procOpts{scan: true})
		if err != nil {
			return nil, 0, err
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			if p.exited() {
				p.linesMu.Lock()
				out := strings.Join(p.lines, "\n")
				p.linesMu.Unlock()
				out += p.stderr.String()
				if strings.Contains(strings.ToLower(out), "address already in use") {
					break
				}
				return nil, 0, fmt.Errorf("%s exited during start-up (%s): %s", name, p.status(), clip(out, 1000))
			}
			if ready(p, port) {
				return p, port, nil
			}
			if time.Now().After(deadline) {
				p.kill()
				return nil, 0, fmt.Errorf("%s not ready on port %d within 10s: %s", name, port, clip(p.stderr.String(), 1000))
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return nil, 0, fmt.Errorf("%s: no free port in 5 attempts", name)
}

// tcpReady reports whether 127.0.0.1:port accepts a connection.
func tcpReady(port int) bool {
	c, err := net.DialTimeout("tcp", addr(port), 200*time.Millisecond)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

func addr(port int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) }

// runClient runs a client program to completion, bounded by timeout, and
// returns its stdout. A non-zero exit is an error that quotes stderr.
func runClient(name, bin string, args []string, timeout time.Duration) ([]byte, error) {
	p, err := start(name, bin, args, procOpts{})
	if err != nil {
		return nil, err
	}
	if !p.wait(timeout) {
		p.kill()
		return p.stdout.Bytes(), fmt.Errorf("%s did not finish within %v", name, timeout)
	}
	out := p.stdout.Bytes()
	if p.cmd.ProcessState.ExitCode() != 0 {
		return out, fmt.Errorf("%s: %s: %s %s", name, p.status(), clip(p.stderr.String(), 500), clip(string(out), 500))
	}
	return out, nil
}

// ---------------------------------------------------------------- /proc

// cpuTicks is utime+stime of pid, in clock ticks (/proc/PID/stat fields 14
// and 15).
func cpuTicks(pid int) (int64, error) {
	u, s, err := cpuTicksSplit(pid)
	return u + s, err
}

// cpuTicksSplit is utime and stime of pid, in clock ticks.
func cpuTicksSplit(pid int) (utime, stime int64, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, err
	}
	// Field 2 (comm) is in parentheses and may hold spaces: count fields
	// from after the last ')'. The first field there is field 3 (state).
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: no ')'", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: %d fields after comm", pid, len(f))
	}
	utime, err1 := strconv.ParseInt(f[14-3], 10, 64)
	stime, err2 := strconv.ParseInt(f[15-3], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, 0, fmt.Errorf("/proc/%d/stat: utime %q stime %q", pid, f[11], f[12])
	}
	return utime, stime, nil
}

// rssKiB is VmRSS of pid, in KiB.
func rssKiB(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			f := strings.Fields(rest)
			if len(f) >= 1 {
				return strconv.ParseInt(f[0], 10, 64)
			}
		}
	}
	return 0, fmt.Errorf("/proc/%d/status: no VmRSS", pid)
}

// fdCount is the number of entries in /proc/PID/fd.
func fdCount(pid int) (int, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	names, err := f.Readdirnames(-1)
	return len(names), err
}

// fdKinds counts the entries of /proc/PID/fd by kind: socket, pipe,
// anon_inode (epoll, eventfd), file.
func fdKinds(pid int) (map[string]int, error) {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	names, err := f.Readdirnames(-1)
	f.Close()
	if err != nil {
		return nil, err
	}
	kinds := map[string]int{}
	for _, n := range names {
		l, err := os.Readlink(dir + "/" + n)
		if err != nil {
			continue // closed meanwhile
		}
		switch {
		case strings.HasPrefix(l, "socket:"):
			kinds["socket"]++
		case strings.HasPrefix(l, "pipe:"):
			kinds["pipe"]++
		case strings.HasPrefix(l, "anon_inode:"):
			kinds["anon_inode"]++
		default:
			kinds["file"]++
		}
	}
	return kinds, nil
}

// kindsDelta describes after-before per kind, e.g. "+10,000 sockets, +26 pipes".
func kindsDelta(before, after map[string]int) string {
	var parts []string
	for _, k := range []string{"socket", "pipe", "anon_inode", "file"} {
		if d := after[k] - before[k]; d != 0 {
			parts = append(parts, fmt.Sprintf("%+d %ss", d, k))
		}
	}
	if len(parts) == 0 {
		return "no change"
	}
	return strings.Join(parts, ", ")
}

// fdLimit is the "Max open files" line of /proc/PID/limits: soft and hard.
func fdLimit(pid int) (soft, hard string, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", pid))
	if err != nil {
		return "", "", err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, "Max open files"); ok {
			f := strings.Fields(rest)
			if len(f) >= 2 {
				return f[0], f[1], nil
			}
		}
	}
	return "", "", fmt.Errorf("/proc/%d/limits: no \"Max open files\"", pid)
}

// limitsLine describes a process's fd limit, for the log.
func limitsLine(p *proc) string {
	soft, hard, err := fdLimit(p.pid())
	if err != nil {
		return fmt.Sprintf("%s (pid %d): %v", p.name, p.pid(), err)
	}
	return fmt.Sprintf("%s (pid %d): Max open files soft %s, hard %s (/proc/%d/limits)", p.name, p.pid(), soft, hard, p.pid())
}
