//go:build linux

package main

// The same relay path over each transport an agent may use: native plain
// TCP (the default), native TLS, WebSocket (ws://), WebSocket over TLS
// (wss://), and through an HTTP CONNECT and a SOCKS5 proxy. Native plain is the baseline: it is the "direct" column of
// these rows, and the ratio is what the transport costs against it.

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"tcprelay/internal/child"
)

// transport is how the agents reach the relay: relay flags, and agent
// arguments before the agent's own ("RELAYPORT" stands for the relay's).
type transport struct {
	name       string
	relayFlags []string
	agentArgs  []string
}

func benchTransports() ([]*row, error) {
	dir, cert, key, err := tempSelfSigned("tcprelay-bench-tls-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	tls := []string{"-tls-cert", cert, "-tls-key", key}
	trs := []transport{
		{"native plain", nil, []string{"127.0.0.1", "RELAYPORT"}},
		{"native TLS", tls, []string{"-tls-ca", cert, "127.0.0.1", "RELAYPORT"}},
		{"ws://", nil, []string{"ws://127.0.0.1:RELAYPORT/"}},
		{"wss://", tls, []string{"-tls-ca", cert, "wss://127.0.0.1:RELAYPORT/"}},
	}
	// Through the proxies of Debian, if installed: tinyproxy (HTTP CONNECT;
	// with no ConnectPort line it lets every port through) and microsocks
	// (SOCKS5).
	for _, px := range []struct {
		name, bin, scheme string
		args              func(conf string, port int) []string
	}{
		{"HTTP CONNECT (tinyproxy)", "tinyproxy", "http", func(conf string, port int) []string {
			os.WriteFile(conf, []byte(fmt.Sprintf("Port %d\nListen 127.0.0.1\nMaxClients 8000\nTimeout 600\nLogLevel Warning\n", port)), 0o600)
			return []string{"-d", "-c", conf}
		}},
		{"SOCKS5 (microsocks)", "microsocks", "socks5", func(_ string, port int) []string {
			return []string{"-i", "127.0.0.1", "-p", strconv.Itoa(port)}
		}},
	} {
		bin, err := exec.LookPath(px.bin)
		if err != nil {
			fmt.Printf("   %s not in PATH: no %s rows\n", px.bin, px.name)
			continue
		}
		conf := filepath.Join(dir, px.bin+".conf")
		p, port, err := serve(px.bin, bin, func(port int) []string { return px.args(conf, port) }, nil)
		if err != nil {
			return nil, err
		}
		defer p.Kill()
		trs = append(trs, transport{px.name, nil, []string{"-proxy", px.scheme + "://" + child.Addr(port), "127.0.0.1", "RELAYPORT"}})
	}
	var rows []*row
	figure := func(name, unit string) []*row { // one row per transport but the baseline
		var rs []*row
		for _, tr := range trs[1:] {
			rs = append(rs, &row{Section: "transport", Name: tr.name + ": " + name + " (direct: native plain)", Unit: unit})
		}
		rows = append(rows, rs...)
		return rs
	}
	gbps, cpu := figure("iperf3, 1 stream", "Gbit/s"), figure("CPU of relay+expose, 1 stream", "s/GB")
	p50, p99 := figure("new conn + 1-byte echo p50", "µs"), figure("new conn + 1-byte echo p99", "µs")
	rss := figure("relay+echoserver RSS per idle conn", "KiB")
	add := func(rs []*row, i int, v float64) { // transport i's value: the baseline's goes to every row
		if i == 0 {
			for _, r := range rs {
				r.add(true, v)
			}
		} else {
			rs[i-1].add(false, v)
		}
	}

	srv, iperfErr := startIperf()
	if iperfErr != nil && !errors.Is(iperfErr, errSkipped) {
		return rows, iperfErr
	}
	iperfPort := 0
	if iperfErr == nil {
		iperfPort = srv.port
	}
	idleN := min(*idleConns, 1000)
	fmt.Printf("   per transport: %d sequential new connections, iperf3 %v 1 stream, %d idle connections\n", *latencyN, *iperf1Time, idleN)
	err = eachRun(names(trs), func(i int) (string, error) {
		tr := trs[i]
		var specs [][]string
		for _, s := range [][]string{{echoBin}, {exposeBin, child.Addr(iperfPort)}} {
			spec := []string{s[0]}
			for _, a := range tr.agentArgs {
				spec = append(spec, strings.ReplaceAll(a, "RELAYPORT", "{RELAYPORT}"))
			}
			specs = append(specs, append(spec, s[1:]...))
		}
		if iperfErr != nil {
			specs = specs[:1]
		}
		relay, agents, pub, err := startRelayURL(append(limitFlags[:len(limitFlags):len(limitFlags)], tr.relayFlags...), specs...)
		defer func() { // this run's relay and agents; the servers stay for the next
			for _, p := range append(agents, relay) {
				if p != nil {
					p.Kill()
				}
			}
		}()
		if err != nil {
			return "", err
		}
		l50, l99, err := latency(child.Addr(pub[0]))
		if err != nil {
			return "", err
		}
		add(p50, i, l50)
		add(p99, i, l99)
		line := fmt.Sprintf("p50 %.0f µs", l50)

		if iperfErr == nil {
			rate, gb, d, err := srv.test(pub[1], *iperf1Time, 1, relay, agents[1])
			if err != nil {
				return "", err
			}
			add(gbps, i, rate)
			add(cpu, i, (d[0]["cpu"]+d[1]["cpu"])/gb)
			line += fmt.Sprintf(", %.1f Gbit/s, %.2f s CPU/GB", rate, (d[0]["cpu"]+d[1]["cpu"])/gb)
		}

		ps := []*child.Proc{relay, agents[0]}
		var warm, conns []net.Conn
		err = openEchoed(&warm, []string{child.Addr(pub[0])}, 20)
		closeAll(warm)
		if err != nil {
			return "", fmt.Errorf("warm-up: %w", err)
		}
		before, err := settle(ps...)
		if err != nil {
			return "", err
		}
		err = openEchoed(&conns, []string{child.Addr(pub[0])}, idleN)
		defer closeAll(conns)
		if err != nil {
			return "", fmt.Errorf("%v; %s", err, diagnose(ps...))
		}
		after, err := settle(ps...)
		if err != nil {
			return "", err
		}
		d := sub(after, before)
		perConn := (d[0]["rss"] + d[1]["rss"]) / float64(len(conns))
		add(rss, i, perConn)
		return line + fmt.Sprintf(", %.1f KiB idle", perConn), nil
	})
	if err == nil && iperfErr != nil {
		err = fmt.Errorf("%w: no throughput rows", iperfErr)
	}
	return rows, err
}

func names(trs []transport) []string {
	var s []string
	for _, tr := range trs {
		s = append(s, tr.name)
	}
	return s
}

// startRelayURL is startRelay for agents whose arguments say where the
// relay is ({RELAYPORT} stands for its port): they are given them as they
// are, with no "127.0.0.1 PORT" in front.
func startRelayURL(flags []string, specs ...[]string) (relay *child.Proc, agents []*child.Proc, ports []int, err error) {
	relay, rport, err := serve("relay", relayBin, func(port int) []string {
		return append(append([]string{"-bind", "127.0.0.1", "-state-dir", "off"}, flags...), strconv.Itoa(port))
	}, func(p *child.Proc, _ int) bool { return strings.Contains(p.Stderr.String(), "relay listening") })
	for i := 0; i < len(specs) && err == nil; i++ {
		bin := specs[i][0]
		var args []string
		for _, a := range specs[i][1:] {
			args = append(args, strings.ReplaceAll(a, "{RELAYPORT}", strconv.Itoa(rport)))
		}
		var p *child.Proc
		if p, err = start(filepath.Base(bin), bin, args, child.Options{Scan: true}); err != nil {
			break
		}
		line := ""
		if line, err = p.FirstLine(10 * time.Second); err != nil {
			err = fmt.Errorf("%v, want its address: %s", err, clip(p.Stderr.String(), 1000))
		} else if port, ok := child.AnnouncedPort(line, "127.0.0.1"); !ok {
			err = fmt.Errorf("%s: first line %q is not \"established relay address: 127.0.0.1:PORT\"", p.Name, line)
		} else {
			agents, ports = append(agents, p), append(ports, port)
		}
	}
	return relay, agents, ports, err
}

// tempSelfSigned makes a temporary directory (the caller removes it) and
// writes a self-signed certificate and its key there (writeSelfSigned).
func tempSelfSigned(prefix string) (dir, certFile, keyFile string, err error) {
	if dir, err = os.MkdirTemp("", prefix); err != nil {
		return "", "", "", err
	}
	if certFile, keyFile, err = writeSelfSigned(dir); err != nil {
		os.RemoveAll(dir)
		return "", "", "", err
	}
	return dir, certFile, keyFile, nil
}

// writeSelfSigned writes a self-signed CA certificate for 127.0.0.1 and
// its key, as PEM files in dir.
func writeSelfSigned(dir string) (certFile, keyFile string, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "tcprelay bench"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return "", "", err
	}
	pk, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return "", "", err
	}
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	err = errors.Join(
		os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600),
		os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pk}), 0o600))
	return certFile, keyFile, err
}
