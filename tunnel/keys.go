package tunnel

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"tcprelay/internal/proto"
)

// LoadKey reads an agent's Ed25519 private key from path (PKCS #8 in PEM,
// as `openssl genpkey -algorithm ed25519` writes it). If the file does not
// exist, LoadKey creates it with a new key, readable by its owner only, and
// reports created.
func LoadKey(path string) (key ed25519.PrivateKey, created bool, err error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		_, key, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return nil, false, err
		}
		der, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return nil, false, err
		}
		// O_EXCL: two agents starting at once do not overwrite each
		// other's new key; the loser reads the winner's.
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if errors.Is(err, fs.ErrExist) {
			return LoadKey(path)
		}
		if err != nil {
			return nil, false, fmt.Errorf("create key file: %w", err)
		}
		if err := pem.Encode(f, &pem.Block{Type: "PRIVATE KEY", Bytes: der}); err != nil {
			f.Close()
			return nil, false, fmt.Errorf("write key file: %w", err)
		}
		if err := f.Close(); err != nil {
			return nil, false, fmt.Errorf("write key file: %w", err)
		}
		return key, true, nil
	}
	if err != nil {
		return nil, false, err
	}
	block, _ := pem.Decode(b)
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, false, fmt.Errorf("key file %s: want a PEM \"PRIVATE KEY\" block (an Ed25519 key in PKCS #8)", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, false, fmt.Errorf("key file %s: %w", path, err)
	}
	key, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, false, fmt.Errorf("key file %s: a %T, want an Ed25519 key", path, k)
	}
	return key, false, nil
}

// PublicKey is the text form of key's public half, as the relay's agents
// file takes it: one token, "ed25519:" and the key in base64.
func PublicKey(key ed25519.PrivateKey) string {
	return proto.FormatKey(key.Public().(ed25519.PublicKey))
}
