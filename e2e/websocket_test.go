package e2e

// Agents over WebSocket: straight to the relay's control port, through a
// real nginx in front of it (deploy/nginx-relay.conf, as shipped), and
// through tinyproxy's CONNECT. WebSocket does not carry a half-close, so
// every echo here reads back every byte before closing (see roundTrip).

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"tcprelay/internal/child"
)

// startNginx starts nginx in the foreground on 127.0.0.1, with
// deploy/nginx-relay.conf in its http block, set to pass /relay/ to the
// relay's control port relayPort: over TLS with certFile and keyFile if
// they are set, else plain HTTP. Its pid, temporary files and logs stay in
// a temporary directory (the logs on stderr).
func (e *env) startNginx(relayPort int, certFile, keyFile string) (*proc, int) {
	t := e.t
	t.Helper()
	bin := requireProgram(t, "nginx", "nginx")
	shipped, err := os.ReadFile("../deploy/nginx-relay.conf")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	return e.startService(bin, func(port int) []string {
		site := string(shipped)
		for old, new := range map[string]string{
			"server 127.0.0.1:8080;": "server " + child.Addr(relayPort) + ";",
			"listen 443 ssl;":        fmt.Sprintf("listen 127.0.0.1:%d ssl;", port),
			"/etc/letsencrypt/live/relay.example.com/fullchain.pem": certFile,
			"/etc/letsencrypt/live/relay.example.com/privkey.pem":   keyFile,
		} {
			if !strings.Contains(site, old) {
				t.Fatalf("deploy/nginx-relay.conf no longer has %q, which this test replaces", old)
			}
			site = strings.ReplaceAll(site, old, new)
		}
		if certFile == "" {
			var plain []string
			for _, line := range strings.Split(site, "\n") {
				if !strings.Contains(line, "ssl_certificate") {
					plain = append(plain, strings.Replace(line, " ssl;", ";", 1))
				}
			}
			site = strings.Join(plain, "\n")
		}
		sitePath := filepath.Join(dir, "nginx-"+strconv.Itoa(port)+"-relay.conf")
		if err := os.WriteFile(sitePath, []byte(site), 0o600); err != nil {
			t.Fatal(err)
		}
		return nginxArgs(t, dir, port, "include "+sitePath+";")
	}, nil)
}

// nginxArgs writes the main configuration of an nginx on port, in the
// foreground, with its pid and temporary files in dir and its error log
// on stderr, whose http block holds httpBody; it returns nginx's
// arguments.
func nginxArgs(t *testing.T, dir string, port int, httpBody string) []string {
	t.Helper()
	name := "nginx-" + strconv.Itoa(port)
	conf := fmt.Sprintf(`master_process off;
daemon off;
pid %[1]s/%[2]s.pid;
error_log stderr info;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path %[1]s/%[2]s-body;
    proxy_temp_path %[1]s/%[2]s-proxy;
    fastcgi_temp_path %[1]s/%[2]s-fastcgi;
    uwsgi_temp_path %[1]s/%[2]s-uwsgi;
    scgi_temp_path %[1]s/%[2]s-scgi;
    %[3]s
}
`, dir, name, httpBody)
	path := filepath.Join(dir, name+".conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	return []string{"-e", "stderr", "-p", dir, "-c", path}
}

// TestAgentsOverWebSocket: echoserver and expose given a ws:// URL reach a
// plain relay over WebSocket, and wss:// a TLS relay, pinned; their
// clients are served byte for byte, with no RELAYPORT on the command line.
func TestAgentsOverWebSocket(t *testing.T) {
	e := newEnv(t)
	r := e.startRelay(nil)
	ws := fmt.Sprintf("ws://127.0.0.1:%d/", r.port)
	_, pub := e.startAgent(echoBin, []string{ws}, "127.0.0.1")
	roundTrip(t, "echoserver "+ws, pub, randomBytes(256<<10))
	for i := range 5 {
		roundTrip(t, fmt.Sprintf("echoserver %s, client %d", ws, i+2), pub, []byte("hello over WebSocket\n"))
	}
	_, pubEx := e.startAgent(exposeBin, []string{ws, echoTarget(t)}, "127.0.0.1")
	roundTrip(t, "expose "+ws, pubEx, randomBytes(256<<10))

	certFile, keyFile := writeCert(t)
	rt := e.startRelayWith(nil, nil, "-tls-cert", certFile, "-tls-key", keyFile)
	wss := fmt.Sprintf("wss://127.0.0.1:%d/", rt.port)
	_, pubTLS := e.startAgent(echoBin, []string{"-tls-fingerprint", fingerprint(t, rt), wss}, "127.0.0.1")
	roundTrip(t, "echoserver "+wss, pubTLS, randomBytes(256<<10))

	// The relay's native agents are served as before on the same port.
	_, pubNative := e.startEchoWith("127.0.0.1", rt.port, nil, "-tls-fingerprint", fingerprint(t, rt))
	roundTrip(t, "echoserver -tls-fingerprint, native", pubNative, randomBytes(64<<10))
}

// TestAgentsThroughNginx: nginx, configured with deploy/nginx-relay.conf,
// is the agents' only way to the relay, over plain HTTP and over TLS
// (pinned to nginx's certificate): ss shows every connection of theirs
// goes to nginx. The relay restarts behind nginx, which answers 502 while
// it is down; the agents get their ports back.
func TestAgentsThroughNginx(t *testing.T) {
	e := newEnv(t)
	r := e.startRelay(nil)
	certFile, keyFile := writeCert(t)
	_, plainPort := e.startNginx(r.port, "", "")
	_, tlsPort := e.startNginx(r.port, certFile, keyFile)
	rt := e.startRelayWith(nil, nil, "-tls-cert", certFile, "-tls-key", keyFile) // only for the fingerprint of the test certificate
	fp := fingerprint(t, rt)

	ws := fmt.Sprintf("ws://127.0.0.1:%d/relay/", plainPort)
	es, pub := e.startAgent(echoBin, []string{ws}, "127.0.0.1")
	roundTrip(t, "echoserver through nginx", pub, randomBytes(256<<10))
	onlyTo(t, es, child.Addr(plainPort))

	wss := fmt.Sprintf("wss://127.0.0.1:%d/relay/", tlsPort)
	target := echoTarget(t)
	ex, pubEx := e.startAgent(exposeBin, []string{"-tls-fingerprint", fp, wss, target}, "127.0.0.1")
	roundTrip(t, "expose through nginx over TLS", pubEx, randomBytes(256<<10))
	for i := range 5 {
		roundTrip(t, fmt.Sprintf("expose through nginx, client %d", i+2), pubEx, []byte("hello through nginx\n"))
	}
	onlyTo(t, ex, child.Addr(tlsPort), target)

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
	roundTrip(t, "echoserver through nginx after the relay's restart", pub, randomBytes(64<<10))
	roundTrip(t, "expose through nginx after the relay's restart", pubEx, randomBytes(64<<10))
}

// TestWSSThroughTinyproxy: an agent whose only way out is a CONNECT proxy
// reaches a TLS relay over wss://, pinned end to end: tinyproxy's log shows
// the control and pooled data connections went through it, and ss that
// the agent has no other connection.
func TestWSSThroughTinyproxy(t *testing.T) {
	e := newEnv(t)
	certFile, keyFile := writeCert(t)
	rt := e.startRelayWith(nil, nil, "-tls-cert", certFile, "-tls-key", keyFile)
	px, proxyPort := e.startTinyproxy([]int{rt.port}, "alice", "s3cret")
	wss := fmt.Sprintf("wss://127.0.0.1:%d/", rt.port)
	es, pub := e.startAgent(echoBin, []string{"-proxy", "http://alice:s3cret@" + child.Addr(proxyPort), "-tls-fingerprint", fingerprint(t, rt), wss}, "127.0.0.1")
	before := waitProxied(t, px, child.Addr(rt.port), 2)
	roundTrip(t, "echoserver -proxy "+wss, pub, randomBytes(256<<10))
	roundTrip(t, "echoserver -proxy "+wss+", second client", pub, []byte("hello\n"))
	waitProxied(t, px, child.Addr(rt.port), before+1)
	onlyTo(t, es, child.Addr(proxyPort))
}
