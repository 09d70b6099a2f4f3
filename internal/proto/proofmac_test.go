package proto

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"strings"
	"testing"
)

// hmacProof is ProofMAC as crypto/hmac computes it.
func hmacProof(key [MACLen]byte, label string, data ...[]byte) [MACLen]byte {
	m := hmac.New(sha256.New, key[:])
	m.Write([]byte(label))
	m.Write([]byte{0})
	for _, d := range data {
		m.Write(d)
	}
	return [MACLen]byte(m.Sum(nil))
}

// TestProofMACIsHMAC: ProofMAC, computed on the stack, is HMAC-SHA256 as
// crypto/hmac computes it, for the protocol's labels and data, for
// messages up to and past what it computes on the stack, and for no data.
func TestProofMACIsHMAC(t *testing.T) {
	for i := range 500 {
		var key [MACLen]byte
		rand.Read(key[:])
		label := []string{"attach", "pool-join", sessionContext, ""}[i%4]
		var data [][]byte
		for j := range i % 4 {
			d := make([]byte, (i*7+j*13)%70)
			rand.Read(d)
			data = append(data, d)
		}
		if got, want := ProofMAC(key, label, data...), hmacProof(key, label, data...); got != want {
			t.Fatalf("ProofMAC(%x, %q, %d pieces) = %x, want crypto/hmac's %x", key, label, len(data), got, want)
		}
	}
	var key [MACLen]byte
	rand.Read(key[:])
	long := strings.Repeat("x", proofMsgMax) // past the stack's bound
	if got, want := ProofMAC(key, long, []byte{1}), hmacProof(key, long, []byte{1}); got != want {
		t.Fatalf("ProofMAC of a %d-byte label = %x, want %x", len(long), got, want)
	}
}

// TestProofMACAllocatesNothing: the MAC of every data connection leaves
// nothing for the collector.
func TestProofMACAllocatesNothing(t *testing.T) {
	var key [MACLen]byte
	var token [TokenLen]byte
	seq := []byte{0, 0, 0, 0, 0, 0, 0, 1}
	allocs := testing.AllocsPerRun(100, func() {
		m := ProofMAC(key, "attach", token[:])
		CheckProof(key, "pool-join", m, token[:], seq)
	})
	if allocs != 0 {
		t.Errorf("ProofMAC and CheckProof allocate %v times per call, want 0", allocs)
	}
}
