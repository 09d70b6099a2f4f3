package e2e

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"regexp"
	"sync/atomic"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/child"
	"tcprelay/internal/testutil"
)

// countingTarget is a target server for ./expose that counts the
// connections it accepted (every health check's dial is one) and echoes.
// It can go down (its listener closes) and come back on the same address.
type countingTarget struct {
	t    *testing.T
	tag  byte // if not zero, written first to each connection
	addr string
	n    atomic.Int64
	ln   net.Listener
}

func newCountingTarget(t *testing.T, tag byte) *countingTarget {
	ct := &countingTarget{t: t, tag: tag, addr: "127.0.0.1:0"}
	ct.up()
	ct.addr = ct.ln.Addr().String()
	return ct
}

// up listens on the target's address again and serves.
func (ct *countingTarget) up() {
	ln, err := net.Listen("tcp", ct.addr)
	if err != nil {
		ct.t.Fatal(err)
	}
	ct.ln = ln
	testutil.Serve(ct.t, ln, func(c net.Conn) {
		ct.n.Add(1)
		if ct.tag != 0 {
			c.Write([]byte{ct.tag})
		}
		testutil.Echo(c)
	})
}

// down closes the listener: dials are refused.
func (ct *countingTarget) down() { ct.ln.Close() }

// readyCheck GETs /ready/PORT from a relay's metrics address and returns
// the status code, 0 if the request failed.
func readyCheck(maddr string, port int) int {
	hc := &http.Client{Timeout: 5 * time.Second}
	resp, err := hc.Get(fmt.Sprintf("http://%s/ready/%d", maddr, port))
	if err != nil {
		return 0
	}
	resp.Body.Close()
	return resp.StatusCode
}

// haproxyOpState is the srv_op_state of backend/server on haproxy's stats
// socket: 2 is up, 0 down.
func haproxyOpState(sock, backend, server string) (string, error) {
	c, err := net.DialTimeout("unix", sock, time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("show servers state " + backend + "\n")); err != nil {
		return "", err
	}
	line := regexp.MustCompile(`^\d+ ` + regexp.QuoteMeta(backend) + ` \d+ ` + regexp.QuoteMeta(server) + ` \S+ (\d+) `)
	sc := bufio.NewScanner(c)
	for sc.Scan() {
		if m := line.FindStringSubmatch(sc.Text()); m != nil {
			return m[1], nil
		}
	}
	return "", fmt.Errorf("no server %s/%s in show servers state (%v)", backend, server, sc.Err())
}

// TestHAProxyRoutesAroundUnreadyRelay: two relays behind haproxy, which
// checks each with deploy/haproxy.cfg's HTTP check (GET /ready/PORT on the
// relay's metrics address). Each relay has one ./expose agent on the same
// public port. When agent A's target goes down, A marks itself unready at
// its first failed dial; relay 1's check turns 503, haproxy takes relay 1
// out, and every client goes to relay 2's agent B, none failing. When A's
// target is back, haproxy sends clients to relay 1 again. (A TCP check of
// the public port would pass throughout: relay 1 still accepts on it and
// closes each client, which through haproxy is a client that fails.)
func TestHAProxyRoutesAroundUnreadyRelay(t *testing.T) {
	requireProgram(t, "haproxy", "haproxy")
	deployCfg := readDeploy(t, "haproxy.cfg")
	checkLine := regexp.MustCompile(`(?m)^\s*option httpchk GET /ready/8081$`)
	if !checkLine.MatchString(deployCfg) || !regexp.MustCompile(`(?m)^\s*server relay1 \S+:8081 check port 9090 `).MatchString(deployCfg) {
		t.Fatalf("deploy/haproxy.cfg does not check GET /ready/8081 on each relay's metrics port 9090:\n%s", deployCfg)
	}

	e := newEnv(t)
	ctlPort := freePort(t)
	ips := []string{"127.0.0.1", "127.0.0.2"}
	var maddrs []string
	for _, ip := range ips {
		maddr := net.JoinHostPort(ip, fmt.Sprint(freePort(t)))
		if e.tryRelay(ip, ctlPort, nil, []string{"-metrics-addr", maddr}) == nil {
			t.Skipf("control port %d is taken on %s", ctlPort, ip)
		}
		maddrs = append(maddrs, maddr)
	}
	targetA, targetB := newCountingTarget(t, 'A'), newCountingTarget(t, 'B')
	_, pub := e.startExpose(ips[0], ctlPort, targetA.addr)
	_, pubB := e.startExpose(ips[1], ctlPort, targetB.addr, "-port", fmt.Sprint(pub))
	if pubB != pub {
		t.Fatalf("agents on ports %d and %d, want one", pub, pubB)
	}
	for _, m := range maddrs {
		opsGet(t, m, "/status") // the metrics listener is up
	}

	dir := t.TempDir()
	sock := filepath.Join(dir, "admin.sock")
	servers := fmt.Sprintf("  balance roundrobin\n  option httpchk GET /ready/%d\n", pub)
	for i, ip := range ips {
		_, mport, _ := net.SplitHostPort(maddrs[i])
		servers += fmt.Sprintf("  server relay%d %s:%d check port %s inter 250ms fall 2 rise 2\n", i+1, ip, pub, mport)
	}
	lbPort := e.startHAProxy("  stats socket "+sock+" level admin", servers)
	lb := child.Addr(lbPort)
	state := func(server, want string) func() error {
		return func() error {
			got, err := haproxyOpState(sock, "back", server)
			if err == nil && got != want {
				err = fmt.Errorf("haproxy: %s's srv_op_state %s, want %s", server, got, want)
			}
			return err
		}
	}
	check.Eventually(t, 5*time.Second, state("relay1", "2"))
	check.Eventually(t, 5*time.Second, state("relay2", "2"))
	served := func(n int) map[byte]int {
		seen := map[byte]int{}
		for i := range n {
			a := tryClient(lb)
			if a.err != nil {
				t.Errorf("client %d through haproxy: %v", i, a.err)
				continue
			}
			seen[a.tag]++
		}
		return seen
	}
	if seen := served(20); seen['A'] == 0 || seen['B'] == 0 {
		t.Fatalf("20 clients with both targets up were served by %v: want both agents", seen)
	}

	// A's target goes down. The first client sent to A (here straight to
	// relay 1) fails; A is then unready, relay 1's check is a 503, and
	// haproxy takes relay 1 out.
	targetA.down()
	if a := tryClient(child.Addr(pub)); a.err == nil {
		t.Fatalf("a client of relay 1 was served (by %c) with A's target down", a.tag)
	}
	// The agent's Ready frame reaches relay 1 a moment after the failed
	// client's end.
	check.Eventually(t, 5*time.Second, func() error {
		if got := readyCheck(maddrs[0], pub); got != http.StatusServiceUnavailable {
			return fmt.Errorf("relay 1's GET /ready/%d with its only agent unready: %d, want 503", pub, got)
		}
		return nil
	})
	check.Eventually(t, 5*time.Second, state("relay1", "0"))
	if seen := served(40); seen['B'] != 40 {
		t.Errorf("40 clients through haproxy with relay 1's agent unready were served by %v: want all by B, none failing", seen)
	}

	// A's target is back: A is ready within its probe interval (3 s), and
	// haproxy sends clients to relay 1 again.
	targetA.up()
	check.Eventually(t, 10*time.Second, state("relay1", "2"))
	if seen := served(20); seen['A'] == 0 || seen['B'] == 0 {
		t.Errorf("20 clients once A's target was back were served by %v: want both agents", seen)
	}
}
