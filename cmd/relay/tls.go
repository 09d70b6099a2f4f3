package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"time"

	"tcprelay/internal/atomicfile"
)

// selfSigned returns the relay's self-signed certificate, kept in path
// (certificate and key, PEM, mode 0600) so that its fingerprint stays the
// same across restarts; a new one is made, for hosts, if the file is
// missing. An empty path makes one for this run only.
func selfSigned(path string, hosts []string) (cert tls.Certificate, created bool, err error) {
	if path != "" {
		cert, err = tls.LoadX509KeyPair(path, path)
		if err == nil {
			return cert, false, nil
		}
		// Nothing there, or a symbolic link to nothing: made anew below,
		// and the link replaced, not followed.
		if _, statErr := os.Stat(path); !errors.Is(statErr, fs.ErrNotExist) {
			return cert, false, fmt.Errorf("%s: %w", path, err)
		}
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return cert, false, err
	}
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "tcprelay relay"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().AddDate(20, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if h != "" {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return cert, false, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return cert, false, err
	}
	pemBytes := append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})...)
	if path != "" {
		if err := atomicfile.Write(path, pemBytes); err != nil {
			return cert, false, err
		}
	}
	cert, err = tls.X509KeyPair(pemBytes, pemBytes)
	return cert, true, err
}
