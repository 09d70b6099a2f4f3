package proto

import (
	"crypto/ed25519"
	"crypto/rand"
	"strings"
	"testing"
)

func TestSessionKeyAgrees(t *testing.T) {
	a, r := NewEphemeral(), NewEphemeral()
	nonce := seqNonce()
	ka, err := a.SessionKey(r.Public, nonce)
	if err != nil {
		t.Fatal(err)
	}
	kr, err := r.SessionKey(a.Public, nonce)
	if err != nil {
		t.Fatal(err)
	}
	if ka != kr {
		t.Fatal("the two sides derived different session keys")
	}
	// Another nonce, or a third party's key, gives another key.
	if k, _ := a.SessionKey(r.Public, ffNonce()); k == ka {
		t.Fatal("session key does not depend on the nonce")
	}
	if k, _ := NewEphemeral().SessionKey(r.Public, nonce); k == ka {
		t.Fatal("an observer with its own key derived the session key")
	}
	if _, err := a.SessionKey([KeyLen]byte{}, nonce); err == nil {
		t.Fatal("an all-zero peer key was accepted")
	}
	mac := ProofMAC(ka, "attach", []byte("token"))
	if !CheckProof(kr, "attach", mac, []byte("token")) || CheckProof(kr, "pool-join", mac, []byte("token")) {
		t.Fatal("ProofMAC/CheckProof disagree, or ignore the label")
	}
}

func TestKeyText(t *testing.T) {
	pub, _, _ := ed25519.GenerateKey(rand.Reader)
	s := FormatKey(pub)
	if !strings.HasPrefix(s, "ed25519:") || strings.ContainsAny(s, " \t\n") {
		t.Fatalf("FormatKey = %q, want one ed25519: token", s)
	}
	got, err := ParseKey(s)
	if err != nil || !got.Equal(pub) {
		t.Fatalf("ParseKey(%q) = %x, %v", s, got, err)
	}
	for _, bad := range []string{"", "ed25519:", "ed25519:AAAA", "rsa:" + s[8:], s[8:], s + "AA"} {
		if _, err := ParseKey(bad); err == nil {
			t.Errorf("ParseKey(%q) accepted", bad)
		}
	}
}

func TestIdentityMessageBindsEverything(t *testing.T) {
	base := IdentityMessage(seqNonce(), [KeyLen]byte{1}, [KeyLen]byte{2}, nil)
	for name, m := range map[string][]byte{
		"nonce":     IdentityMessage(ffNonce(), [KeyLen]byte{1}, [KeyLen]byte{2}, nil),
		"agent eph": IdentityMessage(seqNonce(), [KeyLen]byte{3}, [KeyLen]byte{2}, nil),
		"relay eph": IdentityMessage(seqNonce(), [KeyLen]byte{1}, [KeyLen]byte{3}, nil),
		"binding":   IdentityMessage(seqNonce(), [KeyLen]byte{1}, [KeyLen]byte{2}, []byte{9}),
	} {
		if string(m) == string(base) {
			t.Errorf("the signed message does not depend on the %s", name)
		}
	}
}
