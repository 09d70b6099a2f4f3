package e2e

// Real, unmodified programs from Debian put behind ./expose and used through
// the public address with their own real clients: redis (redis-server,
// redis-tools), python3's http.server with curl, OpenSSH (sshd, ssh, scp)
// and iperf3.

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"tcprelay/internal/child"
)

// writeRandomFile writes size random bytes (every byte value included) to
// path and returns their sha256.
func writeRandomFile(t *testing.T, path string, size int) [sha256.Size]byte {
	t.Helper()
	data := make([]byte, size)
	rand.Read(data)
	for b := range 256 {
		data[b] = byte(b)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(data)
}

// fileSHA256 returns the sha256 and size of the file at path.
func fileSHA256(t *testing.T, path string) ([sha256.Size]byte, int64) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		t.Fatal(err)
	}
	var sum [sha256.Size]byte
	h.Sum(sum[:0])
	return sum, n
}

// ---------------------------------------------------------------- redis

// TestRedisThroughExpose puts redis-server behind expose and uses it through
// the public address with redis-cli (text and binary values) and
// redis-benchmark (50 connections at once), comparing with the real port.
func TestRedisThroughExpose(t *testing.T) {
	server := requireProgram(t, "redis-server", "redis-server")
	cli := requireProgram(t, "redis-cli", "redis-tools")
	bench := requireProgram(t, "redis-benchmark", "redis-tools")
	dir := t.TempDir() // redis's working dir; nothing is saved there
	e := newEnv(t)

	_, port := e.startService(server, func(port int) []string {
		return []string{"--port", strconv.Itoa(port), "--bind", "127.0.0.1",
			"--save", "", "--appendonly", "no", "--dir", dir}
	}, nil)
	r := e.startRelay(nil)
	ex, pub := e.startExpose("127.0.0.1", r.port, child.Addr(port))

	redis := func(port int, stdin []byte, args ...string) string {
		t.Helper()
		p := e.runOK(cli, append([]string{"-h", "127.0.0.1", "-p", strconv.Itoa(port)}, args...), stdin)
		return p.Stdout.String()
	}
	// Not a terminal: redis-cli prints raw replies, each followed by "\n".
	if got := redis(pub, nil, "SET", "key", "value"); got != "OK\n" {
		t.Errorf("redis-cli -p PUB SET key value printed %q, want %q", got, "OK\n")
	}
	if got := redis(pub, nil, "GET", "key"); got != "value\n" {
		t.Errorf("redis-cli -p PUB GET key printed %q, want %q", got, "value\n")
	}

	// A binary value: SET through the public address (redis-cli -x takes it
	// from stdin, unchanged), read back through both addresses.
	bin := make([]byte, 64<<10)
	rand.Read(bin)
	for b := range 256 {
		bin[b*3] = byte(b) // NUL, CR, LF and 0xff included
	}
	if got := redis(pub, bin, "-x", "SET", "bin"); got != "OK\n" {
		t.Errorf("redis-cli -p PUB -x SET bin <64KiB printed %q, want %q", got, "OK\n")
	}
	if got, want := redis(pub, nil, "STRLEN", "bin"), fmt.Sprintf("%d\n", len(bin)); got != want {
		t.Errorf("redis-cli -p PUB STRLEN bin printed %q, want %q", got, want)
	}
	want := sha256.Sum256(append(bytes.Clone(bin), '\n'))
	for _, c := range []struct {
		name string
		port int
	}{{"public", pub}, {"direct", port}} {
		got := redis(c.port, nil, "GET", "bin")
		if sha256.Sum256([]byte(got)) != want {
			t.Errorf("redis-cli GET bin via the %s port (%d): %d bytes (sha256 %x), want the %d bytes set plus \"\\n\" (sha256 %x)",
				c.name, c.port, len(got), sha256.Sum256([]byte(got)), len(bin), want)
		}
	}
	t.Logf("64 KiB binary value set through port %d, read back identical through it and the real port %d (sha256 %x)",
		pub, port, sha256.Sum256(bin))

	// redis-benchmark, 50 connections at once, through expose and direct.
	benchmark := func(port int) map[string]float64 {
		t.Helper()
		start := time.Now()
		p := e.runOK(bench, []string{"-h", "127.0.0.1", "-p", strconv.Itoa(port),
			"-c", "50", "-n", "20000", "-t", "set,get,incr,lpush", "--csv"}, nil)
		out := p.Stdout.String() + p.Stderr.String()
		if strings.Contains(strings.ToLower(out), "error") {
			t.Errorf("%s: output mentions an error:\n%s", p, clip(out))
		}
		recs, err := csv.NewReader(strings.NewReader(p.Stdout.String())).ReadAll()
		if err != nil || len(recs) < 1 || len(recs[0]) < 2 || recs[0][0] != "test" || recs[0][1] != "rps" {
			t.Fatalf("%s: stdout is not CSV with a \"test\",\"rps\" header (%v):\n%s", p, err, clip(p.Stdout.String()))
		}
		rps := map[string]float64{}
		for _, rec := range recs[1:] {
			v, err := strconv.ParseFloat(rec[1], 64)
			if err != nil || !(v > 0) {
				t.Errorf("%s: test %q reported %q requests per second, want > 0", p, rec[0], rec[1])
			}
			rps[rec[0]] = v
		}
		for _, name := range []string{"SET", "GET", "INCR", "LPUSH"} {
			if _, ok := rps[name]; !ok {
				t.Errorf("%s: no result for %s:\n%s", p, name, p.Stdout)
			}
		}
		t.Logf("%s: %v", p, time.Since(start).Round(time.Millisecond))
		return rps
	}
	relayed := benchmark(pub)
	direct := benchmark(port)
	for _, name := range []string{"SET", "GET", "INCR", "LPUSH"} {
		t.Logf("redis-benchmark %-5s through expose %9.0f req/s, direct %9.0f req/s, ratio %.2f",
			name, relayed[name], direct[name], relayed[name]/direct[name])
	}
	if s := ex.Stderr.String(); strings.Contains(s, "level=WARN") || strings.Contains(s, "level=ERROR") {
		t.Logf("expose stderr:\n%s", clip(s))
	}
}

// ---------------------------------------------------------------- HTTP

// python3 is Debian's python3 when installed there, else the first in PATH.
func python3(t *testing.T) string {
	t.Helper()
	if _, err := os.Stat("/usr/bin/python3"); err == nil {
		return "/usr/bin/python3"
	}
	return requireProgram(t, "python3", "python3")
}

// TestHTTPThroughExpose serves a 32 MiB random file with python3 -m
// http.server behind expose and downloads it six times at once with curl
// through the public address; a missing file gives a 404.
func TestHTTPThroughExpose(t *testing.T) {
	py := python3(t)
	curl := requireProgram(t, "curl", "curl")
	root, outDir := t.TempDir(), t.TempDir()
	const size = 32 << 20
	want := writeRandomFile(t, filepath.Join(root, "file"), size)
	e := newEnv(t)

	_, port := e.startService(py, func(port int) []string {
		return []string{"-m", "http.server", strconv.Itoa(port), "--bind", "127.0.0.1", "--directory", root}
	}, nil)
	r := e.startRelay(nil)
	_, pub := e.startExpose("127.0.0.1", r.port, child.Addr(port))
	base := fmt.Sprintf("http://127.0.0.1:%d", pub)

	const clients = 6
	procs := make([]*proc, clients)
	start := time.Now()
	for i := range procs {
		procs[i] = e.start(curl, []string{"-sS", "-f", "--max-time", "60",
			"-o", filepath.Join(outDir, fmt.Sprintf("out%d", i)), base + "/file"}, procOpts{})
	}
	for i, p := range procs {
		p.mustExit(clientTimeout)
		if p.ExitCode() != 0 {
			t.Errorf("download %d: %s: %s, want exit status 0; stderr: %q", i, p, p.Status(), p.Stderr)
			continue
		}
		got, n := fileSHA256(t, filepath.Join(outDir, fmt.Sprintf("out%d", i)))
		if got != want || n != size {
			t.Errorf("download %d: %d bytes, sha256 %x; want %d bytes, sha256 %x", i, n, got, size, want)
		}
	}
	d := time.Since(start)
	t.Logf("%d parallel curl downloads of %d bytes (sha256 %x) through expose in %v: %.0f MiB/s in all",
		clients, size, want, d.Round(time.Millisecond), float64(clients*size)/(1<<20)/d.Seconds())

	p := e.runOK(curl, []string{"-sS", "--max-time", "30", "-o", os.DevNull, "-w", "%{http_code}", base + "/missing"}, nil)
	if got := p.Stdout.String(); got != "404" {
		t.Errorf("%s: HTTP status %q, want 404", p, got)
	}
}

// ---------------------------------------------------------------- SSH

// TestSSHThroughExpose runs a throwaway sshd (key-only, as the current user)
// behind expose, runs a command with ssh and copies an 8 MiB file each way
// with scp through the public port.
//
// On CI the tests run as root: the sshd then has PermitRootLogin
// prohibit-password (key only), and needs its privilege-separation
// directory /run/sshd, which this test creates if missing and leaves in
// place (it is the system's, as the openssh-server package would make it).
func TestSSHThroughExpose(t *testing.T) {
	sshd := requireProgram(t, "/usr/sbin/sshd", "openssh-server")
	ssh := requireProgram(t, "ssh", "openssh-client")
	scp := requireProgram(t, "scp", "openssh-client")
	keygen := requireProgram(t, "ssh-keygen", "openssh-client")
	u, err := user.Current()
	if err != nil {
		t.Fatalf("current user: %v", err)
	}
	permitRoot := "no"
	if os.Geteuid() == 0 {
		permitRoot = "prohibit-password"
		if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
			t.Fatalf("sshd's privilege-separation directory: %v", err)
		}
	}
	dir := t.TempDir()
	e := newEnv(t)

	hostKey, clientKey := filepath.Join(dir, "host_key"), filepath.Join(dir, "client_key")
	for _, k := range []string{hostKey, clientKey} {
		e.runOK(keygen, []string{"-q", "-t", "ed25519", "-N", "", "-C", "tcprelay-e2e", "-f", k}, nil)
	}
	pubKey, err := os.ReadFile(clientKey + ".pub")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "authorized_keys"), pubKey, 0o600); err != nil {
		t.Fatal(err)
	}
	config := filepath.Join(dir, "sshd_config")
	_, port := e.startService(sshd, func(port int) []string {
		conf := strings.Join([]string{
			"Port " + strconv.Itoa(port),
			"ListenAddress 127.0.0.1",
			"HostKey " + hostKey,
			"AuthorizedKeysFile " + filepath.Join(dir, "authorized_keys"),
			"PasswordAuthentication no",
			"KbdInteractiveAuthentication no",
			"PubkeyAuthentication yes",
			"PermitRootLogin " + permitRoot,
			"UsePAM no",
			"StrictModes no",
			"PidFile " + filepath.Join(dir, "sshd.pid"),
			"Subsystem sftp internal-sftp", // scp speaks SFTP by default
		}, "\n") + "\n"
		if err := os.WriteFile(config, []byte(conf), 0o600); err != nil {
			t.Fatal(err)
		}
		return []string{"-D", "-e", "-f", config}
	}, func(p *proc, port int) bool {
		return strings.Contains(p.Stderr.String(), fmt.Sprintf("Server listening on 127.0.0.1 port %d.", port))
	})
	r := e.startRelay(nil)
	_, pub := e.startExpose("127.0.0.1", r.port, child.Addr(port))

	opts := []string{"-F", os.DevNull, "-i", clientKey, "-o", "StrictHostKeyChecking=no",
		"-o", "UserKnownHostsFile=" + os.DevNull, "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
		"-o", "LogLevel=ERROR"}
	login := u.Username + "@127.0.0.1"

	p := e.runOK(ssh, append(append([]string{}, opts...), "-p", strconv.Itoa(pub), login, "echo relayed-ok"), nil)
	if got := p.Stdout.String(); got != "relayed-ok\n" {
		t.Errorf("%s printed %q, want %q; stderr: %q", p, got, "relayed-ok\n", p.Stderr)
	}

	// Up with scp's default SFTP protocol, down with the legacy scp
	// protocol (-O): both end to end through the public port.
	const size = 8 << 20
	local, remote := filepath.Join(dir, "up-src"), filepath.Join(dir, "up-dst")
	upSum := writeRandomFile(t, local, size)
	scpOpts := append(append([]string{}, opts...), "-q", "-P", strconv.Itoa(pub))
	start := time.Now()
	e.runOK(scp, append(append([]string{}, scpOpts...), local, login+":"+remote), nil)
	upTime := time.Since(start)
	if got, n := fileSHA256(t, remote); got != upSum || n != size {
		t.Errorf("scp upload: %d bytes arrived, sha256 %x; want %d bytes, sha256 %x", n, got, size, upSum)
	}

	remoteSrc, downDst := filepath.Join(dir, "down-src"), filepath.Join(dir, "down-dst")
	downSum := writeRandomFile(t, remoteSrc, size)
	start = time.Now()
	e.runOK(scp, append(append([]string{}, scpOpts...), "-O", login+":"+remoteSrc, downDst), nil)
	downTime := time.Since(start)
	if got, n := fileSHA256(t, downDst); got != downSum || n != size {
		t.Errorf("scp -O download: %d bytes arrived, sha256 %x; want %d bytes, sha256 %x", n, got, size, downSum)
	}
	t.Logf("as %s (PermitRootLogin %s): ssh echo ok; scp up %d bytes in %v (sha256 %x), scp -O down %d bytes in %v (sha256 %x)",
		u.Username, permitRoot, size, upTime.Round(time.Millisecond), upSum, size, downTime.Round(time.Millisecond), downSum)
}

// ---------------------------------------------------------------- iperf3

// TestIperf3ThroughExpose runs iperf3 tests (one stream, reverse, four
// streams) through expose: the control connection and every data
// connection go through the public port. A last one-stream run against the
// real port gives a baseline for the log.
func TestIperf3ThroughExpose(t *testing.T) {
	iperf3 := requireProgram(t, "iperf3", "iperf3")
	e := newEnv(t)

	// The server prints "Server listening on PORT (test #N)" each time it
	// is ready for a new test (--forceflush: at once, though not a tty).
	listening := func(p *proc, port int) int {
		return strings.Count(p.Out(), fmt.Sprintf("Server listening on %d", port))
	}
	srv, port := e.startService(iperf3, func(port int) []string {
		return []string{"-s", "-p", strconv.Itoa(port), "-B", "127.0.0.1", "--forceflush"}
	}, func(p *proc, port int) bool { return listening(p, port) >= 1 })
	r := e.startRelay(nil)
	// iperf3 -s serves one test at a time and takes any connection for
	// the next test's control connection: expose's health check, a
	// connection that sends nothing, would fail that test.
	_, pub := e.startExpose("127.0.0.1", r.port, child.Addr(port), "-health-check", "off")

	var relayedBps, directBps float64
	for i, tc := range []struct {
		name   string
		port   int
		args   []string
		result *float64
	}{
		{"one stream", pub, []string{"-t", "3"}, &relayedBps},
		{"reverse (-R)", pub, []string{"-t", "2", "-R"}, nil},
		{"four streams (-P 4)", pub, []string{"-t", "2", "-P", "4"}, nil},
		{"one stream", port, []string{"-t", "2"}, &directBps},
	} {
		via := "through expose"
		if tc.port == port {
			via = "direct"
		}
		// One test at a time: a client that arrives before the server has
		// finished the previous test is refused as busy.
		if !child.WaitFor(serviceTimeout, func() bool { return listening(srv, port) >= i+1 }) {
			t.Fatalf("iperf3 server not ready for test #%d within %v; stdout:\n%s\nstderr:\n%s",
				i+1, serviceTimeout, clip(srv.Out()), srv.Stderr)
		}
		args := append([]string{"-c", "127.0.0.1", "-p", strconv.Itoa(tc.port), "-J"}, tc.args...)
		p := e.run(iperf3, args, nil)
		out := p.Stdout.Bytes()
		var raw map[string]any
		var res child.IperfResult
		if err := json.Unmarshal(out, &raw); err != nil {
			t.Errorf("%s: %s; stdout is not JSON (%v):\n%s\nstderr:\n%s", p, p.Status(), err, clip(string(out)), p.Stderr)
			continue
		}
		json.Unmarshal(out, &res)
		if p.ExitCode() != 0 {
			t.Errorf("%s: %s, want exit status 0; error %q; stderr:\n%s", p, p.Status(), res.Error, p.Stderr)
		}
		if _, ok := raw["error"]; ok {
			t.Errorf("%s: JSON has an \"error\" key: %q", p, res.Error)
		}
		if res.End.SumReceived.Bytes <= 0 {
			t.Errorf("%s: end.sum_received.bytes = %d, want > 0", p, res.End.SumReceived.Bytes)
		}
		if tc.result != nil {
			*tc.result = res.End.SumReceived.BitsPerSecond
		}
		t.Logf("iperf3 %-19s %s: sent %d bytes at %.0f Mbit/s, received %d bytes at %.0f Mbit/s",
			tc.name, via, res.End.SumSent.Bytes, res.End.SumSent.BitsPerSecond/1e6,
			res.End.SumReceived.Bytes, res.End.SumReceived.BitsPerSecond/1e6)
	}
	if directBps > 0 {
		t.Logf("iperf3 one stream: through expose %.0f Mbit/s, direct %.0f Mbit/s, ratio %.2f",
			relayedBps/1e6, directBps/1e6, relayedBps/directBps)
	}
	// Every test ended cleanly on the server's side too: it got the
	// client's last control message through the relay.
	if out := srv.Out() + srv.Stderr.String(); strings.Contains(strings.ToLower(out), "error") {
		t.Errorf("iperf3 server reported an error:\nstdout:\n%s\nstderr:\n%s", clip(srv.Out()), srv.Stderr)
	}
}
