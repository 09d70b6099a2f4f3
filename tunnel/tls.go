package tunnel

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
)

// PinnedTLS returns a TLS configuration that trusts exactly the relay
// certificate whose SHA-256 fingerprint (of its DER encoding) is given, in
// hex with or without colons, as the relay logs it at start-up. Use it for
// a relay with a self-signed certificate.
func PinnedTLS(fingerprint string) (*tls.Config, error) {
	want, err := hex.DecodeString(strings.ReplaceAll(strings.TrimPrefix(fingerprint, "sha256:"), ":", ""))
	if err != nil || len(want) != sha256.Size {
		return nil, fmt.Errorf("bad certificate fingerprint %q: want 64 hex digits (SHA-256)", fingerprint)
	}
	return &tls.Config{
		// Chain verification is replaced by the pin below, which Go runs
		// on every handshake, resumed ones included.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("relay sent no certificate")
			}
			got := sha256.Sum256(cs.PeerCertificates[0].Raw)
			if !bytes.Equal(got[:], want) {
				return fmt.Errorf("relay certificate fingerprint %x does not match the pinned %x", got, want)
			}
			return nil
		},
	}, nil
}

// Fingerprint is the SHA-256 fingerprint of a certificate, as PinnedTLS
// takes it.
func Fingerprint(cert []byte) string {
	sum := sha256.Sum256(cert)
	return hex.EncodeToString(sum[:])
}
