package e2e

import (
	"bytes"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"tcprelay/internal/child"
)

// TestAccessListsWithNC: an agents file gives a tenant allow= and deny=,
// and its agent narrows them with -deny. Real nc clients from several
// loopback addresses: those allowed are echoed, the others are closed
// without a byte; the relay counts them in /metrics and the access log
// says "denied".
func TestAccessListsWithNC(t *testing.T) {
	requireNC(t)
	e := newEnv(t)
	keyFile, key := e.agentKey("web")
	agents := writeAgents(t, "", "web "+key+" allow=127.0.0.0/29 deny=127.0.0.3\n")
	maddr := child.Addr(freePort(t))
	accessLog := filepath.Join(t.TempDir(), "access.log")
	r := e.startRelayWith(nil, nil, "-agents", agents, "-metrics-addr", maddr, "-access-log", accessLog)
	_, pub := e.startAgent(echoBin, []string{"-key", keyFile, "-deny", "127.0.0.4", "-allow", "127.0.0.0/8",
		"127.0.0.1", strconv.Itoa(r.port)}, "127.0.0.1")

	ncFrom := func(src string) *proc {
		p := e.start("nc", []string{"-N", "-s", src, "127.0.0.1", strconv.Itoa(pub)}, procOpts{stdin: strings.NewReader("hello from " + src + "\n")})
		p.mustExit(clientTimeout)
		return p
	}
	for _, src := range []string{"127.0.0.1", "127.0.0.2"} {
		if p := ncFrom(src); !bytes.Equal(p.Stdout.Bytes(), []byte("hello from "+src+"\n")) {
			t.Errorf("nc from %s, allowed: got %q, want its line echoed", src, p.Stdout.Bytes())
		}
	}
	// Denied by the agents file, by the agent, and outside the file's
	// allow= (which the agent's wider -allow does not widen).
	for _, src := range []string{"127.0.0.3", "127.0.0.4", "127.0.0.9"} {
		if p := ncFrom(src); len(p.Stdout.Bytes()) != 0 {
			t.Errorf("nc from %s, denied: got %q, want nothing", src, p.Stdout.Bytes())
		}
	}
	if n := metric(t, maddr, "tcprelay_clients_denied_total"); n != 3 {
		t.Errorf("tcprelay_clients_denied_total %d, want 3", n)
	}
	r.stop()
	denied := map[string]bool{}
	for _, rec := range readAccessLog(t, accessLog) {
		if rec["reason"] == "denied" {
			denied[strings.Split(rec["client"].(string), ":")[0]] = true
		}
	}
	if len(denied) != 3 || !denied["127.0.0.3"] || !denied["127.0.0.4"] || !denied["127.0.0.9"] {
		t.Errorf("the access log's denied clients: %v, want 127.0.0.3, .4 and .9", denied)
	}
}

// TestAccessListsBehindHAProxy: a relay behind haproxy sees haproxy's
// address on every client; with -proxy-protocol-from it reads the PROXY
// header haproxy sends (v2 with send-proxy-v2, v1 with send-proxy) and the
// access lists and the access log see the true client: nc from an allowed
// address through haproxy is echoed, one from a denied address is closed.
// A peer that is not trusted cannot forge a source: its header is data.
func TestAccessListsBehindHAProxy(t *testing.T) {
	requireNC(t)
	requireProgram(t, "haproxy", "haproxy")
	for _, send := range []string{"send-proxy-v2", "send-proxy"} {
		t.Run(send, func(t *testing.T) {
			e := newEnv(t)
			accessLog := filepath.Join(t.TempDir(), "access.log")
			r := e.startRelayWith(nil, nil, "-proxy-protocol-from", "127.0.0.1/32", "-access-log", accessLog)
			_, pub := e.startEchoWith("127.0.0.1", r.port, nil, "-deny", "127.0.0.4")
			lb := e.startHAProxy("", fmt.Sprintf("  server relay1 127.0.0.1:%d %s\n", pub, send))

			ncFrom := func(src string, port int) *proc {
				p := e.start("nc", []string{"-N", "-s", src, "127.0.0.1", strconv.Itoa(port)}, procOpts{stdin: strings.NewReader("hello from " + src + "\n")})
				p.mustExit(clientTimeout)
				return p
			}
			if p := ncFrom("127.0.0.2", lb); !bytes.Equal(p.Stdout.Bytes(), []byte("hello from 127.0.0.2\n")) {
				t.Errorf("nc from 127.0.0.2 through haproxy: got %q, want its line echoed", p.Stdout.Bytes())
			}
			if p := ncFrom("127.0.0.4", lb); len(p.Stdout.Bytes()) != 0 {
				t.Errorf("nc from 127.0.0.4, denied, through haproxy: got %q, want nothing", p.Stdout.Bytes())
			}
			// Straight to the relay from an untrusted address, with a forged
			// header claiming an allowed source: the header is data, and the
			// real source is denied.
			forged := "PROXY TCP4 127.0.0.2 127.0.0.1 5555 " + strconv.Itoa(pub) + "\r\n"
			p := e.start("nc", []string{"-N", "-s", "127.0.0.4", "127.0.0.1", strconv.Itoa(pub)}, procOpts{stdin: strings.NewReader(forged)})
			p.mustExit(clientTimeout)
			if len(p.Stdout.Bytes()) != 0 {
				t.Errorf("a forged PROXY header from an untrusted 127.0.0.4: got %q, want it closed", p.Stdout.Bytes())
			}
			r.stop()
			clients := map[string]string{}
			for _, rec := range readAccessLog(t, accessLog) {
				if rec["event"] == "connection" {
					clients[strings.Split(rec["client"].(string), ":")[0]] += rec["reason"].(string) + ";"
				}
			}
			if clients["127.0.0.2"] != "client closed;" || clients["127.0.0.4"] != "denied;denied;" {
				t.Errorf("the access log's clients: %v, want 127.0.0.2 relayed and 127.0.0.4 denied twice (through haproxy, and forged)", clients)
			}
		})
	}
}
