//go:build linux

package main

// One TLS service behind ./expose, reached through one relay two ways: by
// a port of its own (port-routed, the "direct" column of these rows) and
// by its name on the relay's shared TLS port (name-routed, the "relay"
// column). The TLS server and its clients are in the bench process, so
// the CPU figures are the relay's and the agent's alone: what routing by
// the ClientHello costs against a port.

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"math/big"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"tcprelay/internal/child"
)

const benchName = "db.bench.test"

func benchNames() ([]*row, error) {
	cert, roots, err := certFor(benchName)
	if err != nil {
		return nil, err
	}
	srv, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}})
	if err != nil {
		return nil, err
	}
	var wg sync.WaitGroup
	defer func() { srv.Close(); wg.Wait() }()
	wg.Add(1)
	go func() {
		defer wg.Done()
		serveTLSBench(srv)
	}()

	relay, relayPort, err := serve("relay", relayBin, func(port int) []string {
		return append([]string{"-bind", "127.0.0.1", "-state-dir", "off", "-sni-addr", "127.0.0.1:0", "-sni-domain", "bench.test"},
			append(limitFlags, strconv.Itoa(port))...)
	}, func(p *child.Proc, _ int) bool { return strings.Contains(p.Stderr.String(), "relay listening") })
	if err != nil {
		return nil, err
	}
	rport := strconv.Itoa(relayPort)
	target := srv.Addr().String()
	var agents []*child.Proc
	var addrs []string // port-routed, name-routed
	for _, args := range [][]string{{"127.0.0.1", rport, target}, {"-hostname", "db", "127.0.0.1", rport, target}} {
		p, err := start("expose", exposeBin, args, child.Options{Scan: true})
		if err != nil {
			return nil, err
		}
		line, err := p.FirstLine(10 * time.Second)
		hostPort, ok := strings.CutPrefix(line, "established relay address: ")
		_, port, perr := net.SplitHostPort(hostPort)
		if err != nil || !ok || perr != nil {
			return nil, fmt.Errorf("expose %v: first line %q (%v): %s", args, line, err, clip(p.Stderr.String(), 500))
		}
		agents = append(agents, p)
		addrs = append(addrs, "127.0.0.1:"+port)
	}

	var rows []*row
	fig := func(name, unit string) *row {
		r := &row{Section: "names", Name: name + " (direct: port-routed)", Unit: unit}
		rows = append(rows, r)
		return r
	}
	p50, p99 := fig("new TLS conn + 1-byte echo p50", "µs"), fig("new TLS conn + 1-byte echo p99", "µs")
	cpuConn := fig("CPU of relay+expose per new TLS conn", "µs")
	gbps, cpuGB := fig("TLS throughput, 1 stream", "Gbit/s"), fig("CPU of relay+expose, 1 stream", "s/GB")
	client := &tls.Config{ServerName: benchName, RootCAs: roots}
	streamFor := min(*iperf1Time, 3*time.Second)
	fmt.Printf("   %d sequential new TLS connections (full handshakes) and one %v stream per path and run\n", *latencyN, streamFor)
	return rows, eachRun([]string{"port-routed", "name-routed"}, func(i int) (string, error) {
		direct := i == 0
		ps := []*child.Proc{relay, agents[i]}
		before, err := snapshot(ps...)
		if err != nil {
			return "", err
		}
		var us []float64
		for k := range *latencyN + latencyWarmup {
			t0 := time.Now()
			if err := tlsEcho(addrs[i], client); err != nil {
				return "", fmt.Errorf("connection %d: %w", k+1, err)
			}
			if k >= latencyWarmup {
				us = append(us, float64(time.Since(t0).Nanoseconds())/1e3)
			}
		}
		after, err := snapshot(ps...)
		if err != nil {
			return "", err
		}
		d := sub(after, before)
		slices.Sort(us)
		rank := func(p float64) float64 { return us[int(math.Ceil(p/100*float64(len(us))))-1] }
		perConn := (d[0]["cpu"] + d[1]["cpu"]) / float64(*latencyN+latencyWarmup) * 1e6
		p50.add(direct, rank(50))
		p99.add(direct, rank(99))
		cpuConn.add(direct, perConn)

		before, err = snapshot(ps...)
		if err != nil {
			return "", err
		}
		n, took, err := tlsStream(addrs[i], client, streamFor)
		if err != nil {
			return "", err
		}
		after, err = snapshot(ps...)
		if err != nil {
			return "", err
		}
		d = sub(after, before)
		gb := float64(n) / 1e9
		gbps.add(direct, gb*8/took.Seconds())
		cpuGB.add(direct, (d[0]["cpu"]+d[1]["cpu"])/gb)
		return fmt.Sprintf("p50 %.0f µs, %.0f µs CPU/conn, %.2f Gbit/s", rank(50), perConn, gb*8/took.Seconds()), nil
	})
}

// serveTLSBench serves the bench's TLS clients until ln closes: a first
// byte 'e' echoes, 's' takes everything to EOF and answers its length.
func serveTLSBench(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			c.SetDeadline(time.Now().Add(time.Minute))
			b := make([]byte, 1)
			if _, err := io.ReadFull(c, b); err != nil {
				return
			}
			switch b[0] {
			case 'e':
				io.Copy(c, c)
			case 's':
				n, _ := io.Copy(io.Discard, c)
				c.Write(binary.BigEndian.AppendUint64(nil, uint64(n)))
			}
		}()
	}
}

// tlsEcho opens a TLS connection to addr, a full handshake, and has one
// byte echoed.
func tlsEcho(addr string, cfg *tls.Config) error {
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: *connTimeout}, "tcp", addr, cfg)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(*connTimeout))
	if _, err := c.Write([]byte("ex")); err != nil {
		return err
	}
	b := make([]byte, 1)
	if _, err := io.ReadFull(c, b); err != nil || b[0] != 'x' {
		return fmt.Errorf("echo: %q, %v", b, err)
	}
	return nil
}

// tlsStream sends to addr over one TLS connection for d and returns the
// bytes the server took and how long it took.
func tlsStream(addr string, cfg *tls.Config, d time.Duration) (int64, time.Duration, error) {
	c, err := tls.DialWithDialer(&net.Dialer{Timeout: *connTimeout}, "tcp", addr, cfg)
	if err != nil {
		return 0, 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(d + time.Minute))
	buf := make([]byte, 256<<10)
	buf[0] = 's'
	t0 := time.Now()
	for time.Since(t0) < d {
		if _, err := c.Write(buf); err != nil {
			return 0, 0, err
		}
		buf[0] = 0
	}
	if err := c.CloseWrite(); err != nil {
		return 0, 0, err
	}
	b := make([]byte, 8)
	if _, err := io.ReadFull(c, b); err != nil {
		return 0, 0, fmt.Errorf("the server's count: %w", err)
	}
	return int64(binary.BigEndian.Uint64(b)), time.Since(t0), nil
}

// certFor makes a self-signed certificate for name, and a pool that
// trusts it.
func certFor(name string) (tls.Certificate, *x509.CertPool, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true,
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool, nil
}
