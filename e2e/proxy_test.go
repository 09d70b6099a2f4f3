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
	c, err := net.DialTimeout("tcp", child.Addr(port), 5*time.Second)
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
		t.Fatalf("%s: echo through 127.0.0.1:%d: %d of %d bytes back (equal: %v), err %v", what, port, n, len(data), bytes.Equal(got, data), err)
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
	for i := range 5 {
		roundTrip(t, fmt.Sprintf("echoserver -proxy, client %d", i+2), pub, []byte("hello through the proxy\n"))
	}
	waitProxied(t, px, relayAddr, before+1) // the pool refilled through it
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
		a.p.expectLines(2)
		line, ok := a.p.waitLine(2, 15*time.Second)
		if !ok {
			t.Fatalf("%s printed no second announcement within 15s of the relay's restart; stderr:\n%s\nrelay:\n%s", a.p, a.p.Stderr, r2.Stderr)
		}
		if port, ok := child.AnnouncedPort(line, "127.0.0.1"); !ok || port != a.port {
			t.Fatalf("%s after the relay's restart: %q, want its port %d back", a.p, line, a.port)
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
