package main

// Processes: every program the bench starts goes through start, is
// registered, and is killed by killAll at the end, on an error, or on a
// signal. Children also get SIGKILL from the kernel if the bench itself dies
// (Pdeathsig), which is tied to the thread that forked them: they are all
// forked from one locked thread that never exits.

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"tcprelay/internal/child"
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

var registry struct {
	sync.Mutex
	procs   []*child.Proc
	closing bool
}

var errInterrupted = errors.New("interrupted")

// start starts bin with args (child.Start, keeping the last 16 MiB of
// stdout and 64 KiB of stderr) from the spawning thread, with Pdeathsig,
// and registers it for killAll.
func start(name, bin string, args []string, o child.Options) (*child.Proc, error) {
	o.KeepStdout, o.KeepStderr = 16<<20, 64<<10
	o.Start = func(p *child.Proc) error {
		p.Cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		registry.Lock()
		defer registry.Unlock()
		if registry.closing {
			return errInterrupted
		}
		var err error
		onSpawnThread(func() { err = p.Cmd.Start() })
		if err == nil {
			registry.procs = append(registry.procs, p)
		}
		return err
	}
	return child.Start(name, bin, args, o)
}

// lastLog returns the last stderr line that contains one of subs, clipped.
func lastLog(p *child.Proc, subs ...string) string {
	lines := strings.Split(strings.TrimSpace(p.Stderr.String()), "\n")
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
	procs := append([]*child.Proc(nil), registry.procs...)
	registry.Unlock()
	for _, p := range procs {
		if !p.Exited() {
			p.Cmd.Process.Kill()
		}
	}
	for _, p := range procs {
		if !p.Wait(5 * time.Second) {
			fmt.Fprintf(os.Stderr, "bench: %s (pid %d) did not exit within 5s of SIGKILL\n", p.Name, p.Pid())
		}
	}
}

// runningCount reports how many started processes are still running.
func runningCount() int {
	registry.Lock()
	defer registry.Unlock()
	n := 0
	for _, p := range registry.procs {
		if !p.Exited() {
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

// relayProc is a running ./relay.
type relayProc struct {
	*child.Proc
	port int
}

// startRelay starts `relay -bind 127.0.0.1 FLAGS PORT` on a free PORT,
// retrying with another port if it got taken, and waits for its
// "relay listening" log line.
func startRelay(cfg *config, flags ...string) (*relayProc, error) {
	for attempt := 1; attempt <= 5; attempt++ {
		port, err := child.FreePort()
		if err != nil {
			return nil, err
		}
		args := append(append([]string{"-bind", "127.0.0.1"}, flags...), strconv.Itoa(port))
		p, err := start("relay", cfg.relayBin, args, child.Options{Scan: true, Env: cfg.agentEnv()})
		if err != nil {
			return nil, err
		}
		err = p.AwaitReady(10*time.Second, func() bool { return strings.Contains(p.Stderr.String(), "relay listening") })
		if errors.Is(err, child.ErrPortTaken) {
			continue
		}
		if err != nil {
			p.Kill()
			return nil, fmt.Errorf("%v: %s", err, clip(p.Stderr.String(), 1000))
		}
		return &relayProc{Proc: p, port: port}, nil
	}
	return nil, errors.New("relay: no free port in 5 attempts")
}

// startAgent starts an agent (./echoserver or ./expose) that dials the relay
// at 127.0.0.1:relayPort and returns it with the public port it announced.
func startAgent(cfg *config, bin string, relayPort int, extra ...string) (*child.Proc, int, error) {
	name := filepath.Base(bin)
	args := append([]string{"127.0.0.1", strconv.Itoa(relayPort)}, extra...)
	p, err := start(name, bin, args, child.Options{Scan: true, Env: cfg.agentEnv()})
	if err != nil {
		return nil, 0, err
	}
	line, err := p.FirstLine(10 * time.Second)
	if err != nil {
		p.Kill()
		return nil, 0, fmt.Errorf("%v, want its address: %s", err, clip(p.Stderr.String(), 1000))
	}
	port, ok := child.AnnouncedPort(line, "127.0.0.1")
	if !ok {
		p.Kill()
		return nil, 0, fmt.Errorf("%s: first stdout line %q is not \"established relay address: 127.0.0.1:PORT\"", name, line)
	}
	return p, port, nil
}

// startService starts a third-party server on a free port (args(port)) and
// waits until ready(p, port) (child.TCPReady if nil), retrying with another
// port if it was taken.
func startService(name, bin string, args func(port int) []string, ready func(p *child.Proc, port int) bool) (*child.Proc, int, error) {
	if ready == nil {
		ready = func(_ *child.Proc, port int) bool { return child.TCPReady(port) }
	}
	for attempt := 1; attempt <= 5; attempt++ {
		port, err := child.FreePort()
		if err != nil {
			return nil, 0, err
		}
		p, err := start(name, bin, args(port), child.Options{Scan: true})
		if err != nil {
			return nil, 0, err
		}
		err = p.AwaitReady(10*time.Second, func() bool { return ready(p, port) })
		if errors.Is(err, child.ErrPortTaken) {
			continue
		}
		if err != nil {
			p.Kill()
			return nil, 0, fmt.Errorf("%v (port %d): %s", err, port, clip(p.Out()+p.Stderr.String(), 1000))
		}
		return p, port, nil
	}
	return nil, 0, fmt.Errorf("%s: no free port in 5 attempts", name)
}

// runClient runs a client program to completion, bounded by timeout, and
// returns its stdout. A non-zero exit is an error that quotes stderr.
func runClient(name, bin string, args []string, timeout time.Duration) ([]byte, error) {
	p, err := start(name, bin, args, child.Options{})
	if err != nil {
		return nil, err
	}
	if !p.Wait(timeout) {
		p.Kill()
		return p.Stdout.Bytes(), fmt.Errorf("%s did not finish within %v", name, timeout)
	}
	out := p.Stdout.Bytes()
	if p.ExitCode() != 0 {
		return out, fmt.Errorf("%s: %s: %s %s", name, p.Status(), clip(p.Stderr.String(), 500), clip(string(out), 500))
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
func limitsLine(p *child.Proc) string {
	soft, hard, err := fdLimit(p.Pid())
	if err != nil {
		return fmt.Sprintf("%s (pid %d): %v", p.Name, p.Pid(), err)
	}
	return fmt.Sprintf("%s (pid %d): Max open files soft %s, hard %s (/proc/%d/limits)", p.Name, p.Pid(), soft, hard, p.Pid())
}
