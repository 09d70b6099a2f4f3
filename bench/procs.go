//go:build linux

package main

// Processes and what /proc says about them. Every program the bench starts
// is killed at the end of its section. If the bench dies first (Ctrl-C, a
// panic), the kernel kills them (Pdeathsig). Pdeathsig is tied to the
// thread that forked them: they are all forked from one locked thread that
// never exits.

import (
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

var spawn = make(chan func())

func init() {
	go func() {
		runtime.LockOSThread() // never unlocked: Pdeathsig fires when this thread exits
		for f := range spawn {
			f()
		}
	}()
}

var procs struct {
	sync.Mutex
	list []*child.Proc
}

// start starts bin with args (child.Start with the relay's secret in the
// environment, keeping the last 16 MiB of stdout and 64 KiB of stderr) from
// the spawning thread, with Pdeathsig.
func start(name, bin string, args []string, o child.Options) (*child.Proc, error) {
	o.Env, o.KeepStdout, o.KeepStderr = env, 16<<20, 64<<10
	o.Start = func(p *child.Proc) error {
		p.Cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		procs.Lock()
		defer procs.Unlock()
		done := make(chan error)
		spawn <- func() { done <- p.Cmd.Start() }
		err := <-done
		if err == nil {
			procs.list = append(procs.list, p)
		}
		return err
	}
	return child.Start(name, bin, args, o)
}

// killAll kills every process started so far.
func killAll() {
	procs.Lock()
	list := procs.list
	procs.list = nil
	procs.Unlock()
	for _, p := range list {
		if !p.Kill() {
			fmt.Fprintf(os.Stderr, "bench: %s (pid %d) did not exit within 5s of SIGKILL\n", p.Name, p.Pid())
		}
	}
}

func clip(s string, n int) string {
	if s = strings.TrimSpace(s); len(s) > n {
		return s[:n] + "..."
	}
	return s
}

// serve starts a server on a free port (args(port)) and waits until
// ready(p, port) holds (child.TCPReady if nil), retrying with another port
// if that one got taken meanwhile.
func serve(name, bin string, args func(port int) []string, ready func(p *child.Proc, port int) bool) (*child.Proc, int, error) {
	if ready == nil {
		ready = func(_ *child.Proc, port int) bool { return child.TCPReady(port) }
	}
	for range 5 {
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

// limitFlags let one tunnel hold every connection the bench opens.
var limitFlags = []string{"-max-conns-per-tunnel", "-1", "-max-pending-per-tunnel", "20000"}

// startRelay starts `relay -bind 127.0.0.1 FLAGS PORT` and behind it one
// agent per spec, ./echoserver or ./expose: its binary and extra arguments.
// It returns the relay, the agents, and the public port each announced.
func startRelay(flags []string, specs ...[]string) (relay *child.Proc, agents []*child.Proc, ports []int, err error) {
	relay, rport, err := serve("relay", relayBin, func(port int) []string {
		return append(append([]string{"-bind", "127.0.0.1", "-state-dir", "off"}, flags...), strconv.Itoa(port))
	}, func(p *child.Proc, _ int) bool { return strings.Contains(p.Stderr.String(), "relay listening") })
	for i := 0; i < len(specs) && err == nil; i++ {
		bin, line := specs[i][0], ""
		var p *child.Proc
		if p, err = start(filepath.Base(bin), bin, append([]string{"127.0.0.1", strconv.Itoa(rport)}, specs[i][1:]...), child.Options{Scan: true}); err != nil {
			break
		}
		if line, err = p.FirstLine(10 * time.Second); err != nil {
			err = fmt.Errorf("%v, want its address: %s", err, clip(p.Stderr.String(), 1000))
		} else if port, ok := child.AnnouncedPort(line, "127.0.0.1"); !ok {
			err = fmt.Errorf("%s: first line %q is not \"established relay address: 127.0.0.1:PORT\"", p.Name, line)
		} else {
			agents, ports = append(agents, p), append(ports, port)
		}
	}
	return relay, agents, ports, err
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
		return nil, fmt.Errorf("%s did not finish within %v", name, timeout)
	}
	if out := p.Stdout.Bytes(); p.ExitCode() != 0 {
		return out, fmt.Errorf("%s: %s: %s %s", name, p.Status(), clip(p.Stderr.String(), 500), clip(string(out), 500))
	}
	return p.Stdout.Bytes(), nil
}

// procLine returns the fields after prefix on the first line of the file
// that starts with it (nil if none).
func procLine(file, prefix string) []string {
	b, _ := os.ReadFile(file)
	for l := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(l, prefix); ok {
			return strings.Fields(rest)
		}
	}
	return nil
}

// snapshot is what /proc says of each of ps: "cpu" and "user", its CPU
// time and the user part of it in seconds (fields 14 and 15 of
// /proc/PID/stat, in USER_HZ ticks: 100 a second on x86 and arm); "rss" in
// KiB; "fds" open and their soft "limit"; and the fds by kind: "socket",
// "pipe", "anon_inode" (epoll, eventfd), "file".
func snapshot(ps ...*child.Proc) ([]map[string]float64, error) {
	var out []map[string]float64
	for _, p := range ps {
		dir := fmt.Sprintf("/proc/%d/", p.Pid())
		stat, rss, limit := procLine(dir+"stat", ""), procLine(dir+"status", "VmRSS:"), procLine(dir+"limits", "Max open files")
		fds, err := os.ReadDir(dir + "fd")
		if err != nil || len(stat) < 15 || !strings.HasSuffix(stat[1], ")") || len(rss) < 1 || len(limit) < 1 {
			return nil, fmt.Errorf("%s: %s unreadable: %v", p.Name, dir, err) // or (comm) held a space
		}
		m := map[string]float64{"fds": float64(len(fds))}
		for k, v := range map[string]string{"user": stat[13], "sys": stat[14], "rss": rss[0], "limit": limit[0]} {
			m[k], _ = strconv.ParseFloat(v, 64)
		}
		m["user"], m["cpu"] = m["user"]/100, (m["user"]+m["sys"])/100
		for _, e := range fds {
			l, _ := os.Readlink(dir + "fd/" + e.Name()) // "socket:[123]", "/dev/null"
			kind, _, ok := strings.Cut(l, ":")
			if !ok || strings.HasPrefix(kind, "/") {
				kind = "file"
			}
			m[kind]++
		}
		out = append(out, m)
	}
	return out, nil
}

// sub returns after - before, key by key.
func sub(after, before []map[string]float64) []map[string]float64 {
	d := make([]map[string]float64, len(after))
	for i := range after {
		d[i] = map[string]float64{}
		for k, v := range after[i] {
			d[i][k] = v - before[i][k]
		}
	}
	return d
}

// diagnose describes processes after a failure: exits, and open fds
// against their limits.
func diagnose(ps ...*child.Proc) string {
	var s []string
	for _, p := range ps {
		if m, err := snapshot(p); p.Exited() || err != nil {
			s = append(s, fmt.Sprintf("%s EXITED (%s): %s", p.Name, p.Status(), clip(p.Stderr.String(), 300)))
		} else {
			s = append(s, fmt.Sprintf("%s: %.0f fds open, limit %.0f", p.Name, m[0]["fds"], m[0]["limit"]))
		}
	}
	return strings.Join(s, "; ")
}
