// Package e2e runs the built relay and echoserver binaries with real,
// unmodified clients (nc from Debian's netcat-openbsd, and telnet), as a new
// user would.
package e2e

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"tcprelay/internal/child"
)

// TestWorkedExampleTelnet is the example a new user tries first: a relay,
// an echoserver, and telnet to the announced port.
func TestWorkedExampleTelnet(t *testing.T) {
	requireTelnet(t)
	e := newEnv(t)
	r := e.startRelay(nil)
	es, pub := e.startEcho("127.0.0.1", r.port)

	tel := e.start("telnet", []string{"127.0.0.1", strconv.Itoa(pub)}, procOpts{stdinPipe: true})
	if _, err := io.WriteString(tel.Stdin, "Hello, world\r\n"); err != nil {
		t.Fatalf("write to telnet's stdin: %v", err)
	}
	// Keep stdin open until the echo arrives: telnet closes the connection
	// at stdin EOF.
	afterEscape := regexp.MustCompile(`(?s)Escape character is '\^\]'\.\r?\n(.*)`)
	echoed := func() bool {
		m := afterEscape.FindStringSubmatch(tel.Stdout.String())
		return m != nil && strings.Contains(m[1], "Hello, world")
	}
	if !child.WaitFor(10*time.Second, echoed) {
		t.Fatalf("no \"Hello, world\" after the Escape-character line of telnet within 10s\ntelnet stdout: %q\ntelnet stderr: %q\nrelay stderr:\n%s\nechoserver stderr:\n%s",
			tel.Stdout, tel.Stderr, r.Stderr, es.Stderr)
	}
	tel.Stdin.Close()
	tel.mustExit(10 * time.Second)
	if tel.ExitCode() != 0 {
		t.Errorf("%s: %s after stdin EOF, want exit status 0; stderr: %q", tel, tel.Status(), tel.Stderr)
	}
	out := tel.Stdout.String()
	for _, want := range []string{"Trying 127.0.0.1...", "Connected to 127.0.0.1."} {
		if !strings.Contains(out, want) {
			t.Errorf("telnet stdout lacks %q: %q", want, out)
		}
	}
	t.Logf("telnet stdout: %q", out)

	// Graceful shutdown in the order a user would do it.
	es.stop()
	r.stop()
}

// TestAnnounceLocalhostFirstPort checks that an agent announces the host it
// dialed, and that the first agent on a fresh relay gets PORT+1.
func TestAnnounceLocalhostFirstPort(t *testing.T) {
	requireNC(t)
	e := newEnv(t)
	nextFree := false
	r := e.startRelay(func() int {
		for range 20 {
			p := freePort(t)
			if p >= 65535 {
				continue
			}
			ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p+1)))
			if err == nil {
				ln.Close()
				nextFree = true
				return p
			}
		}
		nextFree = false
		return freePort(t)
	})
	_, pub := e.startEcho("localhost", r.port) // asserts "established relay address: localhost:N"
	if nextFree {
		if pub != r.port+1 {
			t.Errorf("first agent on relay at PORT %d got public port %d, want PORT+1 = %d (it was free a moment before the relay started)", r.port, pub, r.port+1)
		}
	} else {
		t.Logf("PORT+1 = %d was busy; only checking that the public port is above PORT", r.port+1)
		if pub <= r.port {
			t.Errorf("first agent on relay at PORT %d got public port %d, want > PORT", r.port, pub)
		}
	}
	e.ncEcho("localhost", pub, []byte("via localhost\n"))
}

// TestNcBinaryParallel pipes 4 MiB of random bytes through nc -N, eight
// clients at once on one echoserver: every byte comes back, and every nc
// exits, which needs the half-close to travel both ways through the relay.
func TestNcBinaryParallel(t *testing.T) {
	requireNC(t)
	e := newEnv(t)
	r := e.startRelay(nil)
	_, pub := e.startEcho("127.0.0.1", r.port)

	const clients, size = 8, 4 << 20
	inputs := make([][]byte, clients)
	procs := make([]*proc, clients)
	start := time.Now()
	for i := range clients {
		data := make([]byte, size)
		rand.Read(data)
		for b := range 256 { // every byte value, NUL, CR, LF and 0xff included
			data[i*300+b] = byte(b)
		}
		inputs[i] = data
		procs[i] = e.nc("127.0.0.1", pub, data)
	}
	for i, p := range procs {
		p.mustExit(clientTimeout)
		if p.ExitCode() != 0 {
			t.Errorf("client %d: %s: %s, want 0; stderr: %q", i, p, p.Status(), p.Stderr)
		}
		got := p.Stdout.Bytes()
		if sha256.Sum256(got) != sha256.Sum256(inputs[i]) {
			t.Errorf("client %d: got %d bytes back (sha256 %x), sent %d (sha256 %x)",
				i, len(got), sha256.Sum256(got), size, sha256.Sum256(inputs[i]))
		}
	}
	t.Logf("%d × %d bytes echoed in %v", clients, size, time.Since(start).Round(time.Millisecond))
}

// TestTwoAgentsKillOne runs two echoservers on one relay, then SIGKILLs one.
func TestTwoAgentsKillOne(t *testing.T) {
	requireNC(t)
	e := newEnv(t)
	r := e.startRelay(nil)
	a, pa := e.startEcho("127.0.0.1", r.port)
	_, pb := e.startEcho("127.0.0.1", r.port)
	if pa == pb {
		t.Fatalf("both echoservers got public port %d", pa)
	}

	// Both at once, each with its own data.
	inA := bytes.Repeat([]byte("agent A\n"), 10000)
	inB := bytes.Repeat([]byte("agent B\n"), 10000)
	ncA, ncB := e.nc("127.0.0.1", pa, inA), e.nc("127.0.0.1", pb, inB)
	for _, c := range []struct {
		p  *proc
		in []byte
	}{{ncA, inA}, {ncB, inB}} {
		c.p.mustExit(clientTimeout)
		if c.p.ExitCode() != 0 || !bytes.Equal(c.p.Stdout.Bytes(), c.in) {
			t.Errorf("%s: %s, got %d bytes back, want the %d sent; stderr: %q",
				c.p, c.p.Status(), len(c.p.Stdout.Bytes()), len(c.in), c.p.Stderr)
		}
	}

	a.kill()
	start := time.Now()
	var last string
	if !child.WaitFor(5*time.Second, func() bool {
		var gone bool
		gone, last = publicPortGone(pa)
		return gone
	}) {
		t.Errorf("public port %d of the SIGKILLed echoserver still accepts and holds connections 5s later (last probe: %s); relay stderr:\n%s",
			pa, last, r.Stderr)
	} else {
		t.Logf("public port %d gone %v after SIGKILL: %s", pa, time.Since(start).Round(time.Millisecond), last)
	}
	e.ncEcho("127.0.0.1", pb, []byte("B still echoes\n"))
}

// publicPortGone reports whether port refuses connections or closes them at
// once, and what the probe saw.
func publicPortGone(port int) (bool, string) {
	c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), 500*time.Millisecond)
	if err != nil {
		return errors.Is(err, syscall.ECONNREFUSED), "dial: " + err.Error()
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	n, err := c.Read(make([]byte, 1))
	var ne net.Error
	switch {
	case n > 0:
		return false, "connected and read a byte"
	case errors.As(err, &ne) && ne.Timeout():
		return false, "connected and held open"
	case err != nil:
		return true, "connected, then closed at once: " + err.Error()
	}
	return false, "connected"
}

// TestBadCommandLines checks exit statuses and messages of wrong, help and
// version command lines.
func TestBadCommandLines(t *testing.T) {
	relayUsage := regexp.MustCompile(`(?m)^usage: relay \[flags\] PORT\b`)
	echoUsage := regexp.MustCompile(`(?m)^usage: echoserver \[flags\] RELAYHOST RELAYPORT\b`)
	exposeUsage := regexp.MustCompile(`(?m)^usage: expose \[flags\] RELAYHOST RELAYPORT TARGET\b`)
	for _, tc := range []struct {
		name  string
		bin   string
		args  []string
		usage *regexp.Regexp
	}{
		{"relay_no_args", relayBin, nil, relayUsage},
		{"relay_notaport", relayBin, []string{"notaport"}, relayUsage},
		{"relay_70000", relayBin, []string{"70000"}, relayUsage},
		{"relay_unknown_flag", relayBin, []string{"-nosuchflag", "1234"}, relayUsage},
		{"echoserver_onlyonearg", echoBin, []string{"onlyonearg"}, echoUsage},
		{"echoserver_host_notaport", echoBin, []string{"host", "notaport"}, echoUsage},
		{"echoserver_port_70000", echoBin, []string{"-port", "70000", "host", "1"}, echoUsage},
		{"expose_no_target", exposeBin, []string{"host", "1"}, exposeUsage},
		{"expose_target_without_port", exposeBin, []string{"host", "1", "nohost"}, exposeUsage},
		{"relay_bad_range", relayBin, []string{"-ports", "9000-8000", "1234"}, relayUsage},
		{"relay_range_holds_port", relayBin, []string{"-ports", "1000-2000", "1234"}, relayUsage},
		{"relay_heartbeat_10ms", relayBin, []string{"-heartbeat", "10ms", "1234"}, relayUsage},
		{"relay_cert_without_key", relayBin, []string{"-tls-cert", "x.pem", "1234"}, relayUsage},
		{"relay_link_buffer_1B", relayBin, []string{"-link-buffer", "1B", "1234"}, relayUsage},
		{"relay_link_buffer_10GiB", relayBin, []string{"-link-buffer", "10GiB", "1234"}, relayUsage},
		{"relay_conns_per_tunnel_-2", relayBin, []string{"-max-conns-per-tunnel", "-2", "1234"}, relayUsage},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			p := e.start(tc.bin, tc.args, procOpts{})
			p.mustExit(10 * time.Second)
			if p.ExitCode() != 2 {
				t.Errorf("%s: %s, want exit status 2", p, p.Status())
			}
			if !tc.usage.MatchString(p.Stderr.String()) {
				t.Errorf("%s: stderr has no line matching %s:\n%s", p, tc.usage, p.Stderr)
			}
			if strings.Contains(p.Stderr.String(), "panic") {
				t.Errorf("%s: stderr mentions a panic:\n%s", p, p.Stderr)
			}
			t.Logf("%s: %s; stderr: %q", p, p.Status(), p.Stderr)
		})
	}

	t.Run("relay_-h", func(t *testing.T) {
		e := newEnv(t)
		p := e.start(relayBin, []string{"-h"}, procOpts{})
		p.mustExit(10 * time.Second)
		if p.ExitCode() != 0 {
			t.Errorf("%s: %s, want exit status 0", p, p.Status())
		}
		out := p.Stdout.String() + p.Stderr.String()
		for _, flag := range []string{"bind", "public-host", "ports", "secret", "handshake-timeout",
			"pickup-timeout", "heartbeat", "drain-timeout", "log-level", "version"} {
			if !regexp.MustCompile(`(?m)^\s*-` + regexp.QuoteMeta(flag) + `\b`).MatchString(out) {
				t.Errorf("%s: output does not document -%s:\n%s", p, flag, out)
			}
		}
		if !relayUsage.MatchString(out) {
			t.Errorf("%s: output has no usage line:\n%s", p, out)
		}
	})

	t.Run("relay_-version", func(t *testing.T) {
		e := newEnv(t)
		p := e.start(relayBin, []string{"-version"}, procOpts{})
		p.mustExit(10 * time.Second)
		if p.ExitCode() != 0 {
			t.Errorf("%s: %s, want exit status 0", p, p.Status())
		}
		if out := p.Stdout.String(); !regexp.MustCompile(`^relay \S+\n$`).MatchString(out) {
			t.Errorf("%s: stdout %q, want \"relay VERSION\\n\"", p, out)
		}
	})
}

// TestGarbageOnControlPort sends an HTTP request and random bytes to the
// relay's control port: the relay closes each connection, logs one line for
// it, and keeps serving agents registered before and after.
func TestGarbageOnControlPort(t *testing.T) {
	requireNC(t)
	e := newEnv(t)
	r := e.startRelay(nil)
	_, before := e.startEcho("127.0.0.1", r.port)
	e.ncEcho("127.0.0.1", before, []byte("before the garbage\n"))

	junk := make([]byte, 1024)
	rand.Read(junk)
	var garbage []*proc
	for _, in := range [][]byte{[]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), junk} {
		p := e.start("nc", []string{"-N", "127.0.0.1", strconv.Itoa(r.port)}, procOpts{stdinPipe: true})
		if _, err := p.Stdin.Write(in); err != nil {
			t.Fatalf("write to %s: %v", p, err)
		}
		// nc -N then sends its FIN and reads on: it exits only once the
		// relay closes the connection too.
		p.Stdin.Close()
		garbage = append(garbage, p)
	}
	for _, p := range garbage {
		p.mustExit(5 * time.Second)
		t.Logf("%s: %s; stdout %q, stderr %q", p, p.Status(), p.Stdout, p.Stderr)
	}
	// The HTTP request is told, in HTTP, that this port wants a WebSocket
	// upgrade (or the native protocol).
	if out := garbage[0].Stdout.String(); !strings.HasPrefix(out, "HTTP/1.1 426 ") {
		t.Errorf("an HTTP GET on the control port got %q, want a 426 answer", out)
	}

	drops := func() []string {
		var out []string
	lines:
		for _, l := range strings.Split(r.Stderr.String(), "\n") {
			if !strings.Contains(l, "dropped connection") {
				continue
			}
			for _, a := range r.readyAddrs { // the readiness probes' own connections
				if strings.Contains(l+" ", "remote="+a+" ") {
					continue lines
				}
			}
			out = append(out, l)
		}
		return out
	}
	if !child.WaitFor(5*time.Second, func() bool { return len(drops()) >= 2 }) {
		t.Errorf("relay logged %d \"dropped connection\" lines for the 2 garbage connections within 5s, want 2; stderr:\n%s", len(drops()), r.Stderr)
	}

	e.ncEcho("127.0.0.1", before, []byte("after the garbage, old agent\n"))
	_, after := e.startEcho("127.0.0.1", r.port)
	e.ncEcho("127.0.0.1", after, []byte("after the garbage, new agent\n"))

	if d := drops(); len(d) != 2 {
		t.Errorf("relay logged %d \"dropped connection\" lines, want exactly 2 (one per garbage connection):\n%s", len(d), strings.Join(d, "\n"))
	} else {
		t.Logf("relay logged:\n%s", strings.Join(d, "\n"))
	}
}
