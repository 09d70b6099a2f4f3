package proto

import (
	"crypto/ecdh"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"strings"
)

// Contexts bind each use of a key to this protocol and to one purpose.
const (
	identityContext = "tcprelay identity v2\x00"
	sessionContext  = "tcprelay session v2\x00"
	exporterLabel   = "EXPORTER-tcprelay-identity"
)

// IdentityMessage is what an agent signs with its Ed25519 key (feature
// identity): the nonce it answers, both sides' ephemeral keys and, over
// TLS, a value exported from the TLS session (binding). A signature is
// therefore good for this handshake on this connection only: a relay that
// forwards it elsewhere has a different nonce or TLS session.
func IdentityMessage(nonce [NonceLen]byte, agentEph, relayEph [KeyLen]byte, binding []byte) []byte {
	m := make([]byte, 0, len(identityContext)+NonceLen+2*KeyLen+len(binding))
	m = append(m, identityContext...)
	m = append(m, nonce[:]...)
	m = append(m, agentEph[:]...)
	m = append(m, relayEph[:]...)
	return append(m, binding...)
}

// TLSBinding returns 32 bytes exported from c's TLS session (RFC 5705 /
// RFC 8446 exporter), which both ends compute alike, or nil if c is not TLS.
// c is TLS if it has a ConnectionState (a *tls.Conn, or a transport's conn
// over one) whose handshake is complete.
func TLSBinding(c net.Conn) []byte {
	tc, ok := c.(interface{ ConnectionState() tls.ConnectionState })
	if !ok {
		return nil
	}
	cs := tc.ConnectionState()
	if !cs.HandshakeComplete {
		return nil // not TLS after all: a transport's conn over WebSocket
	}
	b, err := cs.ExportKeyingMaterial(exporterLabel, nil, 32)
	if err != nil {
		return nil
	}
	return b
}

// Ephemeral is one side's X25519 key for one handshake (feature proof).
type Ephemeral struct {
	priv   *ecdh.PrivateKey
	Public [KeyLen]byte
}

// NewEphemeral returns a fresh key pair.
func NewEphemeral() *Ephemeral {
	priv, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		panic("crypto/rand failed: " + err.Error())
	}
	e := &Ephemeral{priv: priv}
	copy(e.Public[:], priv.PublicKey().Bytes())
	return e
}

// SessionKey derives the key both sides share after the handshake:
// HMAC-SHA256 keyed by the X25519 shared secret, over sessionContext and
// the nonce. A passive observer sees both public keys and the nonce, and
// cannot compute it.
func (e *Ephemeral) SessionKey(peer [KeyLen]byte, nonce [NonceLen]byte) ([MACLen]byte, error) {
	pub, err := ecdh.X25519().NewPublicKey(peer[:])
	if err != nil {
		return [MACLen]byte{}, err
	}
	shared, err := e.priv.ECDH(pub)
	if err != nil {
		return [MACLen]byte{}, err
	}
	return ProofMAC([MACLen]byte(shared), sessionContext, nonce[:]), nil
}

// ProofMAC is HMAC-SHA256 keyed by a session key over label, a zero byte
// and data: what a data connection shows to prove it belongs to the
// session (labels "attach" and "pool-join"). It runs for every data
// connection, at the agent and at the relay, so it is computed as RFC 2104
// defines it on the stack: crypto/hmac allocates some 1 KiB per MAC (two
// SHA-256 states and the pads), which every connection's set-up left for
// the collector, and the relay's and the agent's memory grew with it.
// TestProofMACIsHMAC holds it to crypto/hmac.
func ProofMAC(key [MACLen]byte, label string, data ...[]byte) [MACLen]byte {
	const block = sha256.BlockSize
	var in [block + proofMsgMax]byte
	n := len(label) + 1
	for _, d := range data {
		n += len(d)
	}
	if n > proofMsgMax {
		return proofMACLong(key, label, data)
	}
	// The key is shorter than a block: padded with zeros.
	var pad [block]byte
	copy(pad[:], key[:])
	for i, k := range pad {
		in[i] = k ^ 0x36
	}
	n = block + copy(in[block:], label)
	in[n] = 0
	n++
	for _, d := range data {
		n += copy(in[n:], d)
	}
	inner := sha256.Sum256(in[:n])
	var out [block + sha256.Size]byte
	for i, k := range pad {
		out[i] = k ^ 0x5c
	}
	copy(out[block:], inner[:])
	return sha256.Sum256(out[:])
}

// proofMsgMax bounds the message ProofMAC computes on the stack: the
// protocol's are a label, a zero byte and at most 32 bytes of data.
const proofMsgMax = 128

// proofMACLong is ProofMAC for a longer message, with crypto/hmac.
func proofMACLong(key [MACLen]byte, label string, data [][]byte) [MACLen]byte {
	m := hmac.New(sha256.New, key[:])
	m.Write([]byte(label))
	m.Write([]byte{0})
	for _, d := range data {
		m.Write(d)
	}
	var out [MACLen]byte
	copy(out[:], m.Sum(nil))
	return out
}

// CheckProof reports, in constant time, whether mac is ProofMAC(key,
// label, data...).
func CheckProof(key [MACLen]byte, label string, mac [MACLen]byte, data ...[]byte) bool {
	want := ProofMAC(key, label, data...)
	return hmac.Equal(want[:], mac[:])
}

// keyPrefix starts the text form of an agent's public key.
const keyPrefix = "ed25519:"

// FormatKey is the text form of an agent's public key, one token:
// "ed25519:" and the key in standard base64.
func FormatKey(pub ed25519.PublicKey) string {
	return keyPrefix + base64.StdEncoding.EncodeToString(pub)
}

// ParseKey reads the text form of FormatKey.
func ParseKey(s string) (ed25519.PublicKey, error) {
	b64, ok := strings.CutPrefix(s, keyPrefix)
	if !ok {
		return nil, fmt.Errorf("agent key %q: want %sBASE64", s, keyPrefix)
	}
	b, err := base64.StdEncoding.DecodeString(b64)
	if err != nil || len(b) != ed25519.PublicKeySize {
		return nil, errors.New("agent key " + s + ": want " + keyPrefix + " and 32 bytes in base64")
	}
	return ed25519.PublicKey(b), nil
}
