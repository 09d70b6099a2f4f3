package e2e

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"

	"tcprelay/internal/child"
)

// iperfServer is an iperf3 -s on 127.0.0.1, serving one test at a time.
type iperfServer struct {
	p     *proc
	port  int
	tests int // tests run against it so far
}

// startIperfServer starts iperf3 -s on a free port and waits until it is
// ready for its first test.
func (e *env) startIperfServer(iperf3 string) *iperfServer {
	e.t.Helper()
	s := &iperfServer{}
	s.p, s.port = e.startService(iperf3, func(port int) []string {
		return []string{"-s", "-p", strconv.Itoa(port), "-B", "127.0.0.1", "--forceflush"}
	}, func(p *proc, port int) bool { return s.listening(p, port) >= 1 })
	return s
}

// listening counts the "Server listening on PORT" lines iperf3 -s printed:
// one each time it is ready for a new test.
func (s *iperfServer) listening(p *proc, port int) int {
	return strings.Count(p.Out(), fmt.Sprintf("Server listening on %d", port))
}

// iperfThrough runs iperf3 -c against the server s through pub, with args, and
// returns what the receiving side measured, in bits per second. It waits
// first until the server is ready for the test (it refuses a client while
// it finishes the previous one).
func (e *env) iperfThrough(iperf3 string, s *iperfServer, pub int, args ...string) (float64, error) {
	if !child.WaitFor(serviceTimeout, func() bool { return s.listening(s.p, s.port) >= s.tests+1 }) {
		return 0, fmt.Errorf("iperf3 server not ready for test #%d within %v; stdout:\n%s", s.tests+1, serviceTimeout, clip(s.p.Out()))
	}
	s.tests++
	p := e.run(iperf3, append([]string{"-c", "127.0.0.1", "-p", strconv.Itoa(pub), "-J"}, args...), nil)
	var res child.IperfResult
	if err := json.Unmarshal(p.Stdout.Bytes(), &res); err != nil {
		return 0, fmt.Errorf("%s: %s; stdout is not JSON (%v):\n%s\nstderr:\n%s", p, p.Status(), err, clip(p.Out()), p.Stderr)
	}
	if p.ExitCode() != 0 || res.Error != "" || res.End.SumReceived.Bytes <= 0 {
		return 0, fmt.Errorf("%s: %s, error %q, %d bytes received; stderr:\n%s", p, p.Status(), res.Error, res.End.SumReceived.Bytes, p.Stderr)
	}
	return res.End.SumReceived.BitsPerSecond, nil
}

// TestRatePerTenantWithIperf3: with rate=40Mbit on one identity of the
// agents file, iperf3 through that tenant's ./expose -key measures 40
// Mbit/s within 10%, both ways (-R too), while at the same time iperf3
// through another tenant, without rate=, on the same relay, moves at least
// five times as much.
func TestRatePerTenantWithIperf3(t *testing.T) {
	iperf3 := requireProgram(t, "iperf3", "iperf3")
	e := newEnv(t)
	const limit = 40e6 // bits per second
	slowFile, slowKey := e.agentKey("slow")
	fastFile, fastKey := e.agentKey("fast")
	agents := writeAgents(t, "", "slow "+slowKey+" rate=40Mbit\nfast "+fastKey+"\n")
	r := e.startRelayWith(nil, nil, "-agents", agents)
	// iperf3 -s takes any connection for its next test's control
	// connection: no health check may connect to it.
	slowSrv, fastSrv := e.startIperfServer(iperf3), e.startIperfServer(iperf3)
	_, slowPub := e.startExpose("127.0.0.1", r.port, child.Addr(slowSrv.port), "-key", slowFile, "-health-check", "off")
	_, fastPub := e.startExpose("127.0.0.1", r.port, child.Addr(fastSrv.port), "-key", fastFile, "-health-check", "off")

	for _, dir := range []struct {
		name string
		args []string
	}{
		{"client to server", []string{"-t", "3"}},
		{"server to client (-R)", []string{"-t", "3", "-R"}},
	} {
		// Both tenants at once: the limit of one must not hold the other.
		var wg sync.WaitGroup
		var slow, fast float64
		var slowErr, fastErr error
		wg.Add(2)
		go func() { defer wg.Done(); slow, slowErr = e.iperfThrough(iperf3, slowSrv, slowPub, dir.args...) }()
		go func() { defer wg.Done(); fast, fastErr = e.iperfThrough(iperf3, fastSrv, fastPub, dir.args...) }()
		wg.Wait()
		if slowErr != nil || fastErr != nil {
			t.Fatalf("%s: limited tenant: %v; unlimited tenant: %v", dir.name, slowErr, fastErr)
		}
		t.Logf("%s: tenant with rate=40Mbit %.1f Mbit/s (%+.1f%%), tenant without rate= at the same time %.0f Mbit/s (%.0fx)",
			dir.name, slow/1e6, (slow/limit-1)*100, fast/1e6, fast/slow)
		if slow < limit*0.9 || slow > limit*1.1 {
			t.Errorf("%s: the tenant with rate=40Mbit measured %.1f Mbit/s, want 40 within 10%%", dir.name, slow/1e6)
		}
		if fast < 5*slow {
			t.Errorf("%s: the tenant without rate= measured %.0f Mbit/s, want at least 5 times the limited one's %.1f", dir.name, fast/1e6, slow/1e6)
		}
	}
	for _, s := range []*iperfServer{slowSrv, fastSrv} {
		if out := s.p.Out() + s.p.Stderr.String(); strings.Contains(strings.ToLower(out), "error") {
			t.Errorf("iperf3 server reported an error:\nstdout:\n%s\nstderr:\n%s", clip(s.p.Out()), s.p.Stderr)
		}
	}
}
