package proto

import (
	"strings"
	"testing"
)

func TestFullHostname(t *testing.T) {
	const domain = "Tunnels.Example.com"
	for _, tc := range []struct{ in, want string }{
		{"db", "db.tunnels.example.com"},
		{"DB", "db.tunnels.example.com"},
		{"api.team-a", "api.team-a.tunnels.example.com"},
		{"db.tunnels.example.com", "db.tunnels.example.com"},
		{"db.tunnels.example.com.", "db.tunnels.example.com"},
		{"x1-2", "x1-2.tunnels.example.com"},
		{strings.Repeat("a", 63), strings.Repeat("a", 63) + ".tunnels.example.com"},
	} {
		if got, err := FullHostname(tc.in, domain); err != nil || got != tc.want {
			t.Errorf("FullHostname(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
	for _, bad := range []string{"", ".", "tunnels.example.com", "a b", "bad name!", "-db", "db-", "a..b", "a_b", "db\x00",
		strings.Repeat("a", 64), strings.Repeat("a.", 120) + "a", "é"} {
		if got, err := FullHostname(bad, domain); err == nil {
			t.Errorf("FullHostname(%q) = %q, want an error", bad, got)
		}
	}
}
