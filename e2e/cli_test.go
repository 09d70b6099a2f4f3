package e2e

import (
	"context"
	"crypto/x509"
	"encoding/pem"
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

	pp "github.com/pires/go-proxyproto"

	"tcprelay/internal/child"
	"tcprelay/internal/testutil"
)

// writeCert writes a self-signed certificate for 127.0.0.1 and its key as
// PEM files, and returns their paths.
func writeCert(t *testing.T) (certFile, keyFile string) {
	t.Helper()
	cert, _ := testutil.SelfSignedCert(t)
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	key, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Certificate[0]}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: key}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}

var fingerprintRE = regexp.MustCompile(`fingerprint=([0-9a-f]{64})`)

// fingerprint waits for the certificate fingerprint the relay logs at
// start, and returns it.
func fingerprint(t *testing.T, r *relay) string {
	t.Helper()
	var fp string
	if !child.WaitFor(5*time.Second, func() bool {
		m := fingerprintRE.FindStringSubmatch(r.Stderr.String())
		if m != nil {
			fp = m[1]
		}
		return m != nil
	}) {
		t.Fatalf("relay did not log its certificate fingerprint; stderr:\n%s", r.Stderr)
	}
	return fp
}

// TestTLSWithBinaries: a relay with -tls-cert/-tls-key, and agents that
// trust it by pinned fingerprint (as the relay logs it) or by CA file. An
// agent without TLS, or with the wrong pin, fails with a clear error.
func TestTLSWithBinaries(t *testing.T) {
	e := newEnv(t)
	certFile, keyFile := writeCert(t)
	r := e.startRelayWith(nil, nil, "-tls-cert", certFile, "-tls-key", keyFile)
	rp := strconv.Itoa(r.port)

	fp := fingerprint(t, r)
	_, pinned := e.startEchoWith("127.0.0.1", r.port, nil, "-tls-fingerprint", fp)
	mustEcho(t, "echoserver -tls-fingerprint", pinned, randomBytes(256<<10))
	_, byCA := e.startEchoWith("127.0.0.1", r.port, nil, "-tls-ca", certFile)
	mustEcho(t, "echoserver -tls-ca", byCA, randomBytes(256<<10))

	wrongPin := strings.Repeat("ab", 32)
	for _, c := range []struct {
		name   string
		flags  []string
		status int
		stderr string
	}{
		{"plain agent", nil, 1, "this relay speaks TLS"},
		{"wrong pin", []string{"-tls-fingerprint", wrongPin}, 1, "fingerprint"},
		{"system roots only", []string{"-tls"}, 1, "certificate"},
		{"pin and CA together", []string{"-tls-fingerprint", fp, "-tls-ca", certFile}, 2, "exclude each other"},
		{"malformed pin", []string{"-tls-fingerprint", "xyz"}, 2, "fingerprint"},
	} {
		p := e.start(echoBin, append(append([]string(nil), c.flags...), "127.0.0.1", rp), procOpts{})
		p.mustExit(15 * time.Second)
		if p.ExitCode() != c.status || !strings.Contains(p.Stderr.String(), c.stderr) || p.Out() != "" {
			t.Errorf("%s: %s, stdout %q, stderr %q; want exit %d, stderr mentioning %q, no announcement",
				c.name, p.Status(), p.Out(), p.Stderr, c.status, c.stderr)
		}
	}
}

// TestProxyProtocolWithBinaries: ./expose -proxy-protocol v1 and v2 in front
// of a server that parses the header with an independent library; the server
// sees the outside client's own address.
func TestProxyProtocolWithBinaries(t *testing.T) {
	e := newEnv(t)
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	testutil.Serve(t, &pp.Listener{Listener: inner}, func(c net.Conn) {
		io.WriteString(c, c.RemoteAddr().String())
	})
	r := e.startRelay(nil)
	for _, v := range []string{"v1", "v2"} {
		_, pub := e.startExpose("127.0.0.1", r.port, inner.Addr().String(), "-proxy-protocol", v)
		c, err := net.DialTimeout("tcp", child.Addr(pub), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		got, err := io.ReadAll(c)
		c.Close()
		if err != nil || string(got) != c.LocalAddr().String() {
			t.Errorf("-proxy-protocol %s: target saw %q (err %v), want the client's %s", v, got, err, c.LocalAddr())
		}
	}
	p := e.start(exposeBin, []string{"-proxy-protocol", "v3", "127.0.0.1", strconv.Itoa(r.port), inner.Addr().String()}, procOpts{})
	p.mustExit(5 * time.Second)
	if p.ExitCode() != 2 || !strings.Contains(p.Stderr.String(), "proxy-protocol") {
		t.Errorf("-proxy-protocol v3: %s, stderr %q; want exit 2 naming the flag", p.Status(), p.Stderr)
	}
}

// TestMetricsWithBinaries: relay -metrics-addr serves Prometheus text at
// /metrics and the status view at /status.
func TestMetricsWithBinaries(t *testing.T) {
	e := newEnv(t)
	maddr := child.Addr(freePort(t))
	r := e.startRelayWith(nil, nil, "-metrics-addr", maddr)
	_, pub := e.startEcho("127.0.0.1", r.port)
	mustEcho(t, "through the relay", pub, randomBytes(10_000))

	get := func(path string) string {
		t.Helper()
		resp, err := http.Get("http://" + maddr + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("GET %s: %s %v", path, resp.Status, err)
		}
		return string(b)
	}
	var metrics string
	if !child.WaitFor(5*time.Second, func() bool {
		metrics = get("/metrics")
		return strings.Contains(metrics, "\ntcprelay_bytes_to_agents_total 10000\n")
	}) {
		t.Fatalf("/metrics does not count the 10000 bytes relayed:\n%s", metrics)
	}
	for _, want := range []string{"# TYPE tcprelay_agents gauge\ntcprelay_agents 1\n", "tcprelay_clients_total 1\n"} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %q:\n%s", want, metrics)
		}
	}
	if status := get("/status"); !strings.Contains(status, "on port "+strconv.Itoa(pub)) {
		t.Errorf("/status lacks the tunnel on port %d:\n%s", pub, status)
	}
}

// TestTLSSelfSigned: TLS in one command: a relay with -tls-self-signed
// makes a certificate, logs its fingerprint, and keeps it across
// restarts; an agent pins it with -tls-fingerprint.
func TestTLSSelfSigned(t *testing.T) {
	e := newEnv(t)
	r := e.startRelayWith(nil, nil, "-tls-self-signed")
	fp := fingerprint(t, r)
	agent, pub := e.startEchoWith("127.0.0.1", r.port, nil, "-tls-fingerprint", fp)
	mustEcho(t, "echoserver pinning the self-signed certificate", pub, randomBytes(64<<10))

	r.sigterm()
	r.mustExit(10 * time.Second)
	r = e.restartRelay(r)
	if again := fingerprint(t, r); again != fp {
		t.Fatalf("after a restart the fingerprint is %s, was %s: agents would have to pin it again", again, fp)
	}
	// The agent comes back by itself, with the same pin.
	agent.expectLines(2)
	line, ok := agent.waitLine(2, 10*time.Second)
	if !ok {
		t.Fatalf("the agent did not register again after the relay's restart; stderr:\n%s", agent.Stderr)
	}
	pub, _ = child.AnnouncedPort(line, "127.0.0.1")
	mustEcho(t, "the same pin after the relay's restart", pub, randomBytes(64<<10))
}

// TestPrivilegedRangeDenied: a relay whose public ports are all below 1024
// and that may bind none of them says so at start and exits, instead of
// telling each agent there is no free port. It runs as nobody, without
// CAP_NET_BIND_SERVICE.
func TestPrivilegedRangeDenied(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root, to run the relay as nobody")
	}
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_unprivileged_port_start"); err != nil || strings.TrimSpace(string(b)) != "1024" {
		t.Skipf("net.ipv4.ip_unprivileged_port_start is %q: nobody may bind low ports here", b)
	}
	// A copy of the relay that nobody may run.
	dir, err := os.MkdirTemp("", "tcprelay-nobody-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	bin, err := os.ReadFile(relayBin)
	if err != nil {
		t.Fatal(err)
	}
	relay := filepath.Join(dir, "relay")
	if err := os.WriteFile(relay, bin, 0o755); err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, relay, "-bind", "127.0.0.1", "-state-dir", "off", "-ports", "80-90", strconv.Itoa(freePort(t)))
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	b, err := cmd.CombinedOutput()
	out := string(b)
	if err == nil || ctx.Err() != nil {
		t.Fatalf("the relay started with public ports 80-90 it may not bind:\n%s", out)
	}
	if want := "-ports 80-90: permission denied"; !strings.Contains(out, want) {
		t.Fatalf("want %q in:\n%s", want, out)
	}
	t.Logf("%v; the relay said: %s", err, strings.TrimSpace(out))
}

// TestAddressForms: the forms a newcomer types. An IPv6 relay host in
// brackets, RELAYHOST:RELAYPORT as one argument, and a port asked for with
// -port that the agent cannot have: it exits non-zero naming the port and
// the reason, instead of quietly taking another.
func TestAddressForms(t *testing.T) {
	e := newEnv(t)
	r := e.startRelay(nil)
	_, pub := e.startAgent(echoBin, []string{"127.0.0.1:" + strconv.Itoa(r.port)}, "127.0.0.1")
	mustEcho(t, "echoserver 127.0.0.1:PORT", pub, randomBytes(1000))

	for _, tc := range []struct {
		name string
		port int
		want string
	}{
		{"outside the range", 5432, "port 5432 is outside the relay's range"},
		{"taken", pub, "port " + strconv.Itoa(pub) + " is in use"},
	} {
		p := e.start(echoBin, []string{"-port", strconv.Itoa(tc.port), "127.0.0.1", strconv.Itoa(r.port)}, procOpts{})
		p.mustExit(announceTimeout)
		if p.ExitCode() == 0 || !strings.Contains(p.Stderr.String(), tc.want) {
			t.Errorf("-port %d, %s: %s, stderr:\n%s\nwant a non-zero exit and %q", tc.port, tc.name, p.Status(), p.Stderr, tc.want)
		}
		t.Logf("-port %d, %s: %s: %s", tc.port, tc.name, p.Status(), strings.TrimSpace(p.Stderr.String()))
	}

	if ln, err := net.Listen("tcp", "[::1]:0"); err != nil {
		t.Logf("no IPv6 loopback here (%v): the [::1] forms are not tried", err)
		return
	} else {
		ln.Close()
	}
	r6 := e.tryRelay("::1", freePort(t), nil, nil)
	if r6 == nil {
		t.Fatal("relay on [::1]: port taken")
	}
	ctl := strconv.Itoa(r6.port)
	for _, args := range [][]string{{"[::1]", ctl}, {"::1", ctl}, {"[::1]:" + ctl}} {
		_, pub := e.startAgent(echoBin, args, "[::1]")
		if err := testutil.EchoCheck(net.JoinHostPort("::1", strconv.Itoa(pub)), randomBytes(1000), 10*time.Second); err != nil {
			t.Errorf("echoserver %s: echo through [::1]:%d: %v", strings.Join(args, " "), pub, err)
		}
	}
}
