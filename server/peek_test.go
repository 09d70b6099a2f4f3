//go:build unix

package server

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"math/big"
	"net"
	"testing"
	"time"
)

// TestIdleSeesDeadParkedConns: a parked data connection whose agent went
// away is seen as dead before a client is bound to it, under TLS as with
// plain TCP, so the client goes to a live one instead of being dropped.
func TestIdleSeesDeadParkedConns(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	for _, tc := range []struct {
		name string
		wrap func(relaySide, agentSide net.Conn) (net.Conn, net.Conn)
	}{
		{"tcp", func(r, a net.Conn) (net.Conn, net.Conn) { return r, a }},
		{"tls", func(r, a net.Conn) (net.Conn, net.Conn) {
			rs := tls.Server(r, &tls.Config{Certificates: []tls.Certificate{cert}})
			as := tls.Client(a, &tls.Config{InsecureSkipVerify: true}) // the test's own certificate
			errc := make(chan error, 1)
			go func() { errc <- rs.Handshake() }()
			if err := as.Handshake(); err != nil {
				t.Fatal(err)
			}
			if err := <-errc; err != nil {
				t.Fatal(err)
			}
			return rs, as
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			relay, agent := tcpPair(t)
			r, a := tc.wrap(relay, agent)
			defer r.Close()
			if !idle(r) {
				t.Fatal("an open, silent parked connection was taken for dead")
			}
			a.Close() // the agent dies: a close_notify under TLS, and a FIN
			deadline := time.Now().Add(5 * time.Second)
			for idle(r) {
				if time.Now().After(deadline) {
					t.Fatal("a parked connection whose agent closed it is still taken for idle after 5s")
				}
				time.Sleep(time.Millisecond) // polling: the FIN crosses loopback asynchronously
			}
		})
	}
}
