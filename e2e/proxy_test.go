package e2e

// Agents behind real proxies from Debian, started by the tests in the
// foreground: tinyproxy (HTTP CONNECT, with and without basic auth) and
// microsocks (SOCKS5 with username/password). Both close both directions
// at the first EOF, so nothing here half-closes through them: each echo
// reads back every byte before closing.

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"tcprelay/internal/child"
	"tcprelay/internal/testutil"
)

// startTinyproxy starts tinyproxy -d on 127.0.0.1, allowing CONNECT to the
// given ports only (by default it allows 443 and 563), with basic auth if
// user is set. Tinyproxy takes no port 0: startService picks a free one.
func (e *env) startTinyproxy(connectPorts []int, user, pass string) (*proc, int) {
	t := e.t
	t.Helper()
	bin := requireProgram(t, "tinyproxy", "tinyproxy")
	dir := t.TempDir()
	return e.startService(bin, func(port int) []string {
		var conf strings.Builder
		fmt.Fprintf(&conf, "Port %d\nListen 127.0.0.1\nTimeout 600\nLogLevel Connect\nMaxClients 200\n", port)
		for _, p := range connectPorts {
			fmt.Fprintf(&conf, "ConnectPort %d\n", p)
		}
		if user != "" {
			fmt.Fprintf(&conf, "BasicAuth %s %s\n", user, pass)
		}
		file := filepath.Join(dir, "tinyproxy-"+strconv.Itoa(port)+".conf")
		if err := os.WriteFile(file, []byte(conf.String()), 0o600); err != nil {
			t.Fatal(err)
		}
		return []string{"-d", "-c", file}
	}, nil)
}

// startMicrosocks starts microsocks (foreground by nature) on 127.0.0.1
// with username/password authentication.
func (e *env) startMicrosocks(user, pass string) (*proc, int) {
	t := e.t
	t.Helper()
	bin := requireProgram(t, "microsocks", "microsocks")
	return e.startService(bin, func(port int) []string {
		return []string{"-i", "127.0.0.1", "-p", strconv.Itoa(port), "-u", user, "-P", pass}
	}, nil)
}

// proxied counts the streams to target that a proxy's log shows it
// carried: tinyproxy logs each CONNECT request, microsocks each
// connection it made.
func proxied(p *proc, target string) int {
	log := p.Out() + p.Stderr.String()
	return strings.Count(log, "CONNECT "+target+" HTTP/1.1") + strings.Count(log, "connected to "+target)
}

// waitProxied waits until the proxy's log shows at least n streams to
// target, and returns the count.
func waitProxied(t *testing.T, p *proc, target string, n int) int {
	t.Helper()
	var got int
	if !child.WaitFor(10*time.Second, func() bool { got = proxied(p, target); return got >= n }) {
		t.Fatalf("%s carried %d streams to %s, want at least %d; its log:\n%s%s", p, got, target, n, p.Out(), p.Stderr)
	}
	return got
}

// roundTrip sends data to 127.0.0.1:port and reads it all back before
// closing, without half-closing: the proxies on the way would end both
// directions at the first EOF.
func roundTrip(t *testing.T, what string, port int, data []byte) {
	t.Helper()
	roundTripTo(t, what, "127.0.0.1", port, data)
}

// roundTripTo is roundTrip to host:port.
func roundTripTo(t *testing.T, what, host string, port int, data []byte) {
	t.Helper()
	c, err := net.DialTimeout("tcp", net.JoinHostPort(host, strconv.Itoa(port)), 5*time.Second)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	werr := make(chan error, 1)
	go func() { _, err := c.Write(data); werr <- err }()
	got := make([]byte, len(data))
	n, err := io.ReadFull(c, got)
	c.Close()
	if werr := <-werr; werr != nil && err == nil {
		err = werr
	}
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("%s: echo through %s:%d: %d of %d bytes back (equal: %v), err %v", what, host, port, n, len(data), bytes.Equal(got, data), err)
	}
}

// echoTarget is a TCP echo server in the test process, for expose.
func echoTarget(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	testutil.Serve(t, ln, testutil.Echo)
	return ln.Addr().String()
}

// agentPeers lists the remote ends of the established TCP connections of
// the process pid, as ss(8) sees them.
func agentPeers(t *testing.T, pid int) []string {
	t.Helper()
	ss := requireProgram(t, "ss", "iproute2")
	out, err := exec.Command(ss, "-Htnp", "state", "established").Output()
	if err != nil {
		t.Fatalf("ss -Htnp: %v", err)
	}
	var peers []string
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) >= 5 && strings.Contains(line, "pid="+strconv.Itoa(pid)+",") {
			peers = append(peers, f[3])
		}
	}
	return peers
}

// onlyTo fails the test unless every connection of the process goes to one
// of allowed (host:port).
func onlyTo(t *testing.T, p *proc, allowed ...string) {
	t.Helper()
	peers := agentPeers(t, p.Pid())
	if len(peers) == 0 {
		t.Fatalf("%s has no established connection, as ss sees it", p)
	}
	for _, peer := range peers {
		ok := false
		for _, a := range allowed {
			ok = ok || peer == a
		}
		if !ok {
			t.Errorf("%s has a connection to %s, want connections only to %v: %v", p, peer, allowed, peers)
		}
	}
}

// throughProxy runs the agents' journey through one proxy: echoserver and
// expose register through it, serve clients byte for byte, open their
// pooled data connections through it, use TLS pinned end to end with the
// relay, and get their port back after the relay restarts.
// startProxy starts the proxy, allowing the relays' ports, and returns it
// with its URL for the agents.
func throughProxy(t *testing.T, startProxy func(e *env, relayPorts []int) (px *proc, proxyPort int, url string)) {
	e := newEnv(t)
	r := e.startRelay(nil)
	relayAddr := child.Addr(r.port)
	certFile, keyFile := writeCert(t)
	rt := e.startRelayWith(nil, nil, "-tls-cert", certFile, "-tls-key", keyFile)
	fp := fingerprint(t, rt)
	px, proxyPort, proxy := startProxy(e, []int{r.port, rt.port})

	es, pub := e.startEchoWith("127.0.0.1", r.port, nil, "-proxy", proxy)
	// Registered, and then its pool of pre-opened data connections: all
	// through the proxy before any client came.
	before := waitProxied(t, px, relayAddr, 2)
	roundTrip(t, "echoserver -proxy", pub, randomBytes(256<<10))
	// Clients one after another reuse the pooled connections; more at
	// once than are parked make the pool grow, through the proxy.
	var held []net.Conn
	for i := range 6 {
		c, err := net.DialTimeout("tcp", child.Addr(pub), 5*time.Second)
		if err != nil {
			t.Fatalf("echoserver -proxy, client %d of 6 at once: %v", i+2, err)
		}
		defer c.Close()
		held = append(held, c)
	}
	for i, c := range held {
		msg := fmt.Sprintf("hello through the proxy, client %d\n", i+2)
		c.SetDeadline(time.Now().Add(20 * time.Second))
		got := make([]byte, len(msg))
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatalf("echoserver -proxy, client %d of 6 at once: %v", i+2, err)
		}
		if _, err := io.ReadFull(c, got); err != nil || string(got) != msg {
			t.Fatalf("echoserver -proxy, client %d of 6 at once: read %q, %v; want %q", i+2, got, err, msg)
		}
	}
	waitProxied(t, px, relayAddr, before+1) // the pool grew through it
	onlyTo(t, es, child.Addr(proxyPort))

	target := echoTarget(t)
	ex, pubEx := e.startExpose("127.0.0.1", r.port, target, "-proxy", proxy)
	roundTrip(t, "expose -proxy", pubEx, randomBytes(256<<10))
	onlyTo(t, ex, child.Addr(proxyPort), target)

	tlsEcho, pubTLS := e.startEchoWith("127.0.0.1", rt.port, nil, "-proxy", proxy, "-tls-fingerprint", fp)
	roundTrip(t, "echoserver -proxy -tls-fingerprint", pubTLS, randomBytes(256<<10))
	waitProxied(t, px, child.Addr(rt.port), 2)
	onlyTo(t, tlsEcho, child.Addr(proxyPort))

	// The relay restarts; the proxy answers its error while it is down,
	// then carries the reconnection: the agents get their ports back.
	r.kill()
	r2 := e.restartRelay(r)
	for _, a := range []struct {
		p    *proc
		port int
	}{{es, pub}, {ex, pubEx}} {
		if port := a.p.reannounced(15 * time.Second); port != a.port {
			t.Fatalf("%s after the relay's restart: port %d, want its port %d back; relay:\n%s", a.p, port, a.port, r2.Stderr)
		}
	}
	roundTrip(t, "echoserver -proxy after the relay's restart", pub, randomBytes(64<<10))
	roundTrip(t, "expose -proxy after the relay's restart", pubEx, randomBytes(64<<10))
}

// TestAgentsThroughTinyproxy: echoserver and expose reach the relay only
// through tinyproxy's CONNECT, without and with basic auth (see
// throughProxy).
func TestAgentsThroughTinyproxy(t *testing.T) {
	for _, auth := range []bool{false, true} {
		t.Run(map[bool]string{false: "open", true: "basic auth"}[auth], func(t *testing.T) {
			throughProxy(t, func(e *env, relayPorts []int) (*proc, int, string) {
				if !auth {
					px, port := e.startTinyproxy(relayPorts, "", "")
					return px, port, "http://" + child.Addr(port)
				}
				px, port := e.startTinyproxy(relayPorts, "alice", "s3cret")
				return px, port, "http://alice:s3cret@" + child.Addr(port)
			})
		})
	}
}

// TestAgentsThroughMicrosocks: the same journey through a SOCKS5 proxy
// with username/password authentication.
func TestAgentsThroughMicrosocks(t *testing.T) {
	throughProxy(t, func(e *env, _ []int) (*proc, int, string) {
		px, port := e.startMicrosocks("bob", "hunter2")
		return px, port, "socks5://bob:hunter2@" + child.Addr(port)
	})
}

// TestProxyRefusesCredentials: a proxy that refuses the agent's password
// ends the agent (exit 1) with an error that names the proxy, without the
// password, and its answer, with -fail-fast or without it: a 407 is not
// going to change, like a refused secret.
func TestProxyRefusesCredentials(t *testing.T) {
	e := newEnv(t)
	r := e.startRelay(nil)
	relayAddr := child.Addr(r.port)
	_, tp := e.startTinyproxy([]int{r.port}, "alice", "s3cret")
	_, ms := e.startMicrosocks("bob", "hunter2")
	for _, c := range []struct {
		proxy, want string
	}{
		// tinyproxy answers a wrong password 401, and no password 407.
		{"http://alice:wrong@" + child.Addr(tp), "proxy http://" + child.Addr(tp) + " refused CONNECT " + relayAddr + ": 401 Unauthorized"},
		{"http://" + child.Addr(tp), "proxy http://" + child.Addr(tp) + " refused CONNECT " + relayAddr + ": 407 Proxy Authentication Required"},
		{"socks5://bob:wrong@" + child.Addr(ms), "proxy socks5://" + child.Addr(ms) + " refused CONNECT " + relayAddr + ": username/password authentication failed"},
	} {
		for _, flags := range [][]string{{"-fail-fast"}, nil} {
			args := append(append([]string{"-proxy", c.proxy}, flags...), "127.0.0.1", strconv.Itoa(r.port))
			p := e.start(echoBin, args, procOpts{})
			p.mustExit(15 * time.Second)
			stderr := p.Stderr.String()
			if p.ExitCode() != 1 || !strings.Contains(stderr, c.want) || strings.Contains(stderr, "wrong@") || p.Out() != "" {
				t.Errorf("%s: %s, stdout %q, stderr:\n%s\nwant exit status 1, no announcement, and stderr saying %q without the password", p, p.Status(), p.Out(), stderr, c.want)
			}
		}
	}
}

// TestRedisBehindConnectProxy: redis-server's only way out is a CONNECT
// proxy that allows nothing but the relay's port; expose beside it serves
// it through the relay, and an outside redis-cli uses it on the public
// port. ss shows expose's every connection goes to the proxy or to redis.
func TestRedisBehindConnectProxy(t *testing.T) {
	server := requireProgram(t, "redis-server", "redis-server")
	cli := requireProgram(t, "redis-cli", "redis-tools")
	dir := t.TempDir()
	e := newEnv(t)
	_, redisPort := e.startService(server, func(port int) []string {
		return []string{"--port", strconv.Itoa(port), "--bind", "127.0.0.1",
			"--save", "", "--appendonly", "no", "--dir", dir}
	}, nil)
	r := e.startRelay(nil)
	px, proxyPort := e.startTinyproxy([]int{r.port}, "corp", "pa55")
	ex, pub := e.startExpose("127.0.0.1", r.port, child.Addr(redisPort), "-proxy", "http://corp:pa55@"+child.Addr(proxyPort))

	redis := func(stdin []byte, args ...string) string {
		t.Helper()
		p := e.runOK(cli, append([]string{"-h", "127.0.0.1", "-p", strconv.Itoa(pub)}, args...), stdin)
		return p.Stdout.String()
	}
	if got := redis(nil, "SET", "greeting", "through the proxy"); got != "OK\n" {
		t.Errorf("redis-cli SET through the relay printed %q, want OK", got)
	}
	if got := redis(nil, "GET", "greeting"); got != "through the proxy\n" {
		t.Errorf("redis-cli GET through the relay printed %q", got)
	}
	value := bytes.Repeat([]byte("0123456789abcdef"), 4096) // 64 KiB
	if got := redis(value, "-x", "SET", "big"); got != "OK\n" {
		t.Errorf("redis-cli -x SET big printed %q, want OK", got)
	}
	if got, want := redis(nil, "STRLEN", "big"), fmt.Sprintf("%d\n", len(value)); got != want {
		t.Errorf("redis-cli STRLEN big printed %q, want %q", got, want)
	}
	// Three clients: at least the control connection and a data
	// connection for each client through the proxy.
	waitProxied(t, px, child.Addr(r.port), 5)
	onlyTo(t, ex, child.Addr(proxyPort), child.Addr(redisPort))
}

// localIP is an address of this machine that is not loopback: Go programs
// never proxy a loopback relay, so the environment's proxy is tested with
// a relay on it.
func localIP(t *testing.T) string {
	t.Helper()
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() != nil && !ipn.IP.IsLoopback() && !ipn.IP.IsLinkLocalUnicast() {
			return ipn.IP.String()
		}
	}
	missing(t, "no non-loopback IPv4 address on this machine")
	return ""
}

// TestProxyFromEnvironment: with no -proxy, the agents take the proxy from
// HTTPS_PROXY, else ALL_PROXY, and dial directly a relay that NO_PROXY
// lists; -proxy direct ignores the environment.
func TestProxyFromEnvironment(t *testing.T) {
	e := newEnv(t)
	ip := localIP(t)
	var r *relay
	for attempt := 0; r == nil && attempt < 5; attempt++ {
		r = e.tryRelay(ip, freePort(t), nil, nil)
	}
	if r == nil {
		t.Fatal("relay: no free port in 5 attempts")
	}
	relayAddr := net.JoinHostPort(ip, strconv.Itoa(r.port))
	tpProc, tp := e.startTinyproxy([]int{r.port}, "", "")
	msProc, ms := e.startMicrosocks("bob", "hunter2")
	clean := []string{"HTTPS_PROXY=", "https_proxy=", "ALL_PROXY=", "all_proxy=", "NO_PROXY=", "no_proxy=", "HTTP_PROXY=", "http_proxy="}
	dead := "http://" + child.Addr(freePort(t)) // nothing listens there
	for _, c := range []struct {
		name  string
		env   []string
		flags []string
		via   *proc // the proxy that must carry it; nil: none
	}{
		{"HTTPS_PROXY", []string{"HTTPS_PROXY=http://" + child.Addr(tp)}, nil, tpProc},
		{"https_proxy", []string{"https_proxy=" + child.Addr(tp)}, nil, tpProc},
		{"ALL_PROXY", []string{"ALL_PROXY=socks5://bob:hunter2@" + child.Addr(ms)}, nil, msProc},
		{"HTTPS_PROXY before ALL_PROXY", []string{"HTTPS_PROXY=http://" + child.Addr(tp), "ALL_PROXY=" + dead}, nil, tpProc},
		{"NO_PROXY", []string{"HTTPS_PROXY=" + dead, "NO_PROXY=example.com," + ip}, nil, nil},
		{"-proxy direct", []string{"HTTPS_PROXY=" + dead, "ALL_PROXY=" + dead}, []string{"-proxy", "direct"}, nil},
		{"-proxy over HTTPS_PROXY", []string{"HTTPS_PROXY=" + dead}, []string{"-proxy", "socks5://bob:hunter2@" + child.Addr(ms)}, msProc},
	} {
		before := map[*proc]int{tpProc: proxied(tpProc, relayAddr), msProc: proxied(msProc, relayAddr)}
		p, pub := e.startEchoWith(ip, r.port, append(append([]string(nil), clean...), c.env...), c.flags...)
		roundTripTo(t, c.name, ip, pub, []byte("hello via "+c.name+"\n"))
		for _, px := range []*proc{tpProc, msProc} {
			got := proxied(px, relayAddr) - before[px]
			if px == c.via && got == 0 {
				t.Errorf("%s: %s carried no stream to the relay, want the agent's", c.name, px)
			}
			if px != c.via && got != 0 {
				t.Errorf("%s: %s carried %d streams to the relay, want none", c.name, px, got)
			}
		}
		if c.via == nil {
			onlyTo(t, p, relayAddr)
		}
		p.stop()
		// A proxy may log a stream the stopped agent asked for after it
		// exited (a pool refill in flight): the next case counts from a
		// log that has held still for 300ms.
		last := -1
		child.WaitFor(5*time.Second, func() bool {
			n := proxied(tpProc, relayAddr) + proxied(msProc, relayAddr)
			if n == last {
				return true
			}
			last = n
			time.Sleep(300 * time.Millisecond)
			return false
		})
	}
}

// TestProxyFlag: both agents' -h documents -proxy, its schemes, the
// environment variables and "direct"; a malformed proxy URL is a usage
// error (exit 2) that says what is wanted, without the password.
func TestProxyFlag(t *testing.T) {
	e := newEnv(t)
	for _, c := range []struct {
		bin  string
		args []string
	}{{echoBin, []string{"relay.example", "8080"}}, {exposeBin, []string{"relay.example", "8080", "127.0.0.1:1"}}} {
		p := e.start(c.bin, []string{"-h"}, procOpts{})
		p.mustExit(10 * time.Second)
		out := p.Out()
		for _, want := range []string{"-proxy URL", "http://", "https://", "socks5://", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", `"direct"`} {
			if !strings.Contains(out, want) {
				t.Errorf("%s: -h does not mention %s:\n%s", p, want, out)
			}
		}
		p = e.start(c.bin, append([]string{"-proxy", "ftp://u:secret@proxy.example"}, c.args...), procOpts{})
		p.mustExit(10 * time.Second)
		if stderr := p.Stderr.String(); p.ExitCode() != 2 || !strings.Contains(stderr, "want http://, https://, socks5://") || strings.Contains(stderr, "secret") {
			t.Errorf("%s: %s, stderr %q; want exit status 2 saying which schemes, without the password", p, p.Status(), stderr)
		}
	}
}
