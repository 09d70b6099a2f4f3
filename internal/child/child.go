// Package child starts the programs that the end-to-end tests (e2e) and
// the bench (make bench) run as child processes: the relay, echoserver and
// expose binaries, and third-party programs such as iperf3 and
// redis-server. It collects their output, tells how they ended, and reads
// what they print at start-up.
package child

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// PollInterval is how often the waits of this package check their
// condition.
const PollInterval = 20 * time.Millisecond

// killTimeout bounds the wait for an exit after SIGKILL.
const killTimeout = 5 * time.Second

// maxLines is the most stdout lines kept of a scanned process.
const maxLines = 100000

// Buffer collects a process's output; it may be read while the process
// writes. With Max > 0 it keeps only the last Max bytes.
type Buffer struct {
	Max int

	mu sync.Mutex
	b  []byte
}

func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.b = append(b.b, p...)
	if b.Max > 0 && len(b.b) > b.Max {
		b.b = append([]byte(nil), b.b[len(b.b)-b.Max:]...)
	}
	return len(p), nil
}

func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return string(b.b)
}

// Bytes returns a copy of the contents.
func (b *Buffer) Bytes() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]byte(nil), b.b...)
}

// Proc is a started process.
type Proc struct {
	Name   string // for messages; String returns it
	Cmd    *exec.Cmd
	Stdout *Buffer        // nil if stdout is scanned line by line (Options.Scan)
	Stderr *Buffer        // always collected
	Stdin  io.WriteCloser // with Options.StdinPipe
	done   chan struct{}  // closed when Wait returned
	closed chan struct{}  // scanned stdout: closed at its EOF
	linesM sync.Mutex     // guards lines
	lines  []string       // scanned stdout
}

// Options tune Start. The zero value collects stdout and stderr in full
// and leaves stdin empty.
type Options struct {
	Env       []string  // extra VAR=value entries, after the cleaned environment
	Stdin     io.Reader // the process's stdin
	StdinPipe bool      // give the process a pipe as stdin: Proc.Stdin
	Scan      bool      // read stdout line by line (Line, Lines, FirstLine), not into Stdout
	// KeepStdout and KeepStderr bound what the buffers keep to the last
	// that many bytes; 0 keeps everything.
	KeepStdout, KeepStderr int
	// Start, if not nil, starts p.Cmd instead of p.Cmd.Start (the bench
	// forks from one thread and registers every process it starts).
	Start func(p *Proc) error
}

// Start starts bin with args. The child's environment is this process's,
// without RELAY_SECRET and the locale variables, plus LC_ALL=C and o.Env:
// the relay's secret comes only from o.Env, and messages are in English.
func Start(name, bin string, args []string, o Options) (*Proc, error) {
	cmd := exec.Command(bin, args...)
	cmd.Env = append(withoutEnv(os.Environ(), "RELAY_SECRET", "LC_ALL", "LANG", "LANGUAGE"), "LC_ALL=C")
	cmd.Env = append(cmd.Env, o.Env...)
	cmd.WaitDelay = 5 * time.Second // never hang in Wait on a stray pipe holder
	p := &Proc{Name: name, Cmd: cmd, Stderr: &Buffer{Max: o.KeepStderr}, done: make(chan struct{})}
	cmd.Stderr = p.Stderr
	if o.StdinPipe {
		w, err := cmd.StdinPipe()
		if err != nil {
			return nil, err
		}
		p.Stdin = w
	} else {
		cmd.Stdin = o.Stdin
	}
	var pr, pw *os.File
	if o.Scan {
		var err error
		if pr, pw, err = os.Pipe(); err != nil {
			return nil, err
		}
		cmd.Stdout = pw
		p.closed = make(chan struct{})
	} else {
		p.Stdout = &Buffer{Max: o.KeepStdout}
		cmd.Stdout = p.Stdout
	}
	var err error
	if o.Start != nil {
		err = o.Start(p)
	} else {
		err = cmd.Start()
	}
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

func (p *Proc) scan(r *os.File) {
	defer close(p.closed)
	defer r.Close()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		p.linesM.Lock()
		if len(p.lines) < maxLines {
			p.lines = append(p.lines, sc.Text())
		}
		p.linesM.Unlock()
	}
}

func (p *Proc) String() string { return p.Name }
func (p *Proc) Pid() int       { return p.Cmd.Process.Pid }

// Exited reports whether the process has ended (and been waited for).
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Wait waits up to d for the process to end and reports whether it did.
func (p *Proc) Wait(d time.Duration) bool {
	select {
	case <-p.done:
		return true
	case <-time.After(d):
		return false
	}
}

// Kill sends SIGKILL unless the process has ended, waits up to 5s for it
// to end, and reports whether it did.
func (p *Proc) Kill() bool {
	if !p.Exited() {
		p.Cmd.Process.Kill()
	}
	return p.Wait(killTimeout)
}

// Status describes how the process ended: "exit status N" or "killed by
// signal N (NAME)"; call after it ended.
func (p *Proc) Status() string {
	ps := p.Cmd.ProcessState
	if ps == nil {
		return "not waited"
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return "killed by signal " + strconv.Itoa(int(ws.Signal())) + " (" + ws.Signal().String() + ")"
	}
	return "exit status " + strconv.Itoa(ps.ExitCode())
}

// ExitCode is the exit status, or -1 if killed by a signal or still
// running.
func (p *Proc) ExitCode() int { return p.Cmd.ProcessState.ExitCode() }

// Out is the stdout so far: the buffer, or the scanned lines joined by
// "\n".
func (p *Proc) Out() string {
	if p.Stdout == nil {
		return strings.Join(p.Lines(), "\n")
	}
	return p.Stdout.String()
}

// Lines returns a copy of the stdout lines so far (scanned processes).
func (p *Proc) Lines() []string {
	p.linesM.Lock()
	defer p.linesM.Unlock()
	return append([]string(nil), p.lines...)
}

// Line returns the n-th stdout line (1-based), if there is one yet
// (scanned processes).
func (p *Proc) Line(n int) (string, bool) {
	p.linesM.Lock()
	defer p.linesM.Unlock()
	if len(p.lines) < n {
		return "", false
	}
	return p.lines[n-1], true
}

// StdoutClosed is closed when the scanned stdout reached EOF: every line is
// in. It is nil for a process whose stdout is not scanned.
func (p *Proc) StdoutClosed() <-chan struct{} { return p.closed }

// FirstLine waits up to d for the first stdout line of a scanned process.
// It fails if the process ends without printing one, or at d.
func (p *Proc) FirstLine(d time.Duration) (string, error) {
	deadline := time.Now().Add(d)
	for {
		if line, ok := p.Line(1); ok {
			return line, nil
		}
		if p.Exited() {
			if p.closed != nil {
				select { // the scanner may not have the line yet
				case <-p.closed:
				case <-time.After(killTimeout):
				}
			}
			if line, ok := p.Line(1); ok {
				return line, nil
			}
			return "", fmt.Errorf("%s exited (%s) without printing a line", p, p.Status())
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("%s printed no line within %v", p, d)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// ErrPortTaken is AwaitReady's error for a server that exited because its
// port was taken.
var ErrPortTaken = errors.New("port taken: address already in use")

// AwaitReady polls ready until it holds while the process runs, the
// process exits, or d passes. A process that exited saying "address already
// in use" (any case, on stdout or stderr) gives ErrPortTaken: its port got
// taken between FreePort and its bind, so the caller may retry with a new
// one.
func (p *Proc) AwaitReady(d time.Duration, ready func() bool) error {
	deadline := time.Now().Add(d)
	for {
		if p.Exited() {
			if strings.Contains(strings.ToLower(p.Out()+p.Stderr.String()), "address already in use") {
				return ErrPortTaken
			}
			return fmt.Errorf("%s exited during start-up (%s)", p, p.Status())
		}
		if ready() {
			if !p.Exited() { // else whoever took the port answered: look again
				return nil
			}
			continue
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready within %v", p, d)
		}
		time.Sleep(PollInterval)
	}
}

// WaitFor polls cond every PollInterval until it holds or d has passed,
// and reports whether it held.
func WaitFor(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(PollInterval)
	}
}

// FreePort returns a port that was free on 127.0.0.1 a moment ago.
func FreePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// Addr is "127.0.0.1:port".
func Addr(port int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) }

// TCPReady reports whether 127.0.0.1:port accepts a connection.
func TCPReady(port int) bool {
	c, err := net.DialTimeout("tcp", Addr(port), 200*time.Millisecond)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// AnnouncedPort parses an agent's (echoserver, expose) announcement line,
// exactly "established relay address: HOST:PORT" with the given HOST.
func AnnouncedPort(line, host string) (int, bool) {
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

// IperfResult is the part of iperf3 -J's output that the tests and the
// bench read.
type IperfResult struct {
	Error string `json:"error"`
	End   struct {
		SumSent     IperfSum `json:"sum_sent"`
		SumReceived IperfSum `json:"sum_received"`
	} `json:"end"`
}

// IperfSum is one of iperf3 -J's end sums.
type IperfSum struct {
	Bytes         int64   `json:"bytes"`
	BitsPerSecond float64 `json:"bits_per_second"`
}
