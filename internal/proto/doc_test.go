package proto

import (
	"bytes"
	"encoding/hex"
	"os"
	"regexp"
	"strings"
	"testing"
)

// docFrames returns the frames of the worked example in docs/PROTOCOL.md:
// each starts on a line "A→R  hex..." or "R→A  hex..." and goes on over
// indented lines of hex; text after two spaces is a comment.
func docFrames(t *testing.T) (frames [][]byte, section string) {
	t.Helper()
	doc, err := os.ReadFile("../../docs/PROTOCOL.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(doc), "\n## Worked example\n")
	if !ok {
		t.Fatal("PROTOCOL.md has no \"## Worked example\" section")
	}
	section, _, _ = strings.Cut(section, "\n## ")
	hexTok := regexp.MustCompile(`^([0-9a-f]{2})+$`)
	inBlock := false
	for _, line := range strings.Split(section, "\n") {
		if strings.HasPrefix(line, "```") {
			inBlock = !inBlock
			continue
		}
		if !inBlock {
			continue
		}
		rest, start := strings.CutPrefix(line, "A→R")
		if !start {
			rest, start = strings.CutPrefix(line, "R→A")
		}
		if start {
			frames = append(frames, nil)
		}
		chunk := regexp.MustCompile(`\s{2,}`).Split(strings.TrimSpace(rest), 2)[0]
		var b []byte
		for _, tok := range strings.Fields(chunk) {
			if !hexTok.MatchString(tok) {
				b = nil
				break
			}
			v, _ := hex.DecodeString(tok)
			b = append(b, v...)
		}
		if len(b) > 0 && len(frames) > 0 {
			frames[len(frames)-1] = append(frames[len(frames)-1], b...)
		}
	}
	return frames, section
}

// TestProtocolDocExample: the worked example in docs/PROTOCOL.md is what
// this package sends, byte for byte.
func TestProtocolDocExample(t *testing.T) {
	frames, section := docFrames(t)
	var key, token [TokenLen]byte
	copy(key[:], seq(TokenLen + 0xf0)[0xf0:])
	hex.Decode(token[:], []byte("00112233445566778899aabbccddeeff"))
	want := []any{
		"preamble",
		&Hello{Agent: "tcprelay-go", Features: FeaturePool},
		&Challenge{Nonce: seqNonce(), Features: FeaturePool},
		&Auth{MAC: AuthMAC("s3cret", seqNonce())},
		&Welcome{HeartbeatMillis: 10000},
		&PoolKey{Key: key, Max: 32},
		&Listen{ID: 1},
		&ListenOK{ID: 1, Tunnel: 1, Port: 8081},
		&Incoming{Tunnel: 1, Token: token, Client: "203.0.113.7:51234", Local: "198.51.100.1:8081"},
		&Ping{Data: 1},
		&Pong{Data: 1},
		&Error{Code: CodeAuthFailed, Message: "wrong or missing secret"},
		"preamble",
		&Attach{Token: token},
		"preamble",
		&PoolJoin{Key: key},
		&Bind{Tunnel: 1, Client: "203.0.113.7:51235", Local: "198.51.100.1:8081"},
		&Close{Tunnel: 1},
		&GoAway{Message: "relay shutting down"},
	}
	if len(frames) != len(want) {
		t.Fatalf("the example has %d frames, want %d", len(frames), len(want))
	}
	for i, w := range want {
		var b []byte
		if m, ok := w.(Message); ok {
			b = Append(nil, m)
		} else {
			b = Preamble()
		}
		if !bytes.Equal(frames[i], b) {
			t.Errorf("frame %d (%v):\n doc %x\nwant %x", i+1, w, frames[i], b)
		}
	}
	attach := hex.EncodeToString(append(Preamble(), Append(nil, &Attach{Token: token})...))
	if !strings.Contains(section, "As one string: `"+attach+"`") {
		t.Errorf("the example's data connection as one string should be %s", attach)
	}
	for _, m := range []*Listen{{ID: 1}, {ID: 1, Port: 8080, Flags: ListenPortRequired}} {
		b := Append(nil, m)
		spaced := hex.EncodeToString(b[:1]) + " " + hex.EncodeToString(b[1:5]) + " " + hex.EncodeToString(b[5:9]) +
			" " + hex.EncodeToString(b[9:11]) + " " + hex.EncodeToString(b[11:])
		if !strings.Contains(section, "`"+spaced+"`") {
			t.Errorf("the example should show the Listen %+v as `%s`", *m, spaced)
		}
	}
}
