package e2e

import (
	"bytes"
	"fmt"
	"strconv"
	"strings"
	"testing"

	"tcprelay/internal/child"
)

// TestReuseWithRealClients: nc clients, one after another, through
// ./expose to a target, over a plain relay and a TLS one: each gets its
// line back and EOF, and the relay parks the data connection each used
// again (tcprelay_pool_reused_total) instead of ./expose opening new ones.
func TestReuseWithRealClients(t *testing.T) {
	requireNC(t)
	for _, useTLS := range []bool{false, true} {
		t.Run(map[bool]string{false: "tcp", true: "tls"}[useTLS], func(t *testing.T) {
			e := newEnv(t)
			maddr := child.Addr(freePort(t))
			flags := []string{"-metrics-addr", maddr}
			var xflags []string
			if useTLS {
				certFile, keyFile := writeCert(t)
				flags = append(flags, "-tls-cert", certFile, "-tls-key", keyFile)
			}
			r := e.startRelayWith(nil, nil, flags...)
			if useTLS {
				xflags = []string{"-tls-fingerprint", fingerprint(t, r)}
			}
			_, pub := e.startExpose("127.0.0.1", r.port, echoTarget(t), xflags...)
			const n = 20
			for i := range n {
				line := fmt.Sprintf("client %d through ./expose\n", i)
				p := e.start("nc", []string{"-N", "127.0.0.1", strconv.Itoa(pub)}, procOpts{stdin: strings.NewReader(line)})
				p.mustExit(clientTimeout)
				if !bytes.Equal(p.Stdout.Bytes(), []byte(line)) {
					t.Fatalf("nc client %d: got %q, want its line echoed", i, p.Stdout.Bytes())
				}
			}
			if hits := metric(t, maddr, "tcprelay_pool_hits_total"); hits != n {
				t.Errorf("%d of %d clients joined to a parked data connection", hits, n)
			}
			// The last client's connection may not be back yet.
			if reused := metric(t, maddr, "tcprelay_pool_reused_total"); reused < n-1 {
				t.Errorf("tcprelay_pool_reused_total %d after %d clients one after another, want at least %d", reused, n, n-1)
			}
		})
	}
}
