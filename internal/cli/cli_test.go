package cli

import (
	"slices"
	"strings"
	"testing"
)

// TestRelayAddrs: the relay addresses an agent's RELAYHOST and RELAYPORT
// give: hosts with RELAYPORT, hosts with their own port, IPv6 with or
// without brackets, and ws:// or wss:// URLs, which carry their own; and
// a clear error for each kind of bad one.
func TestRelayAddrs(t *testing.T) {
	for _, tc := range []struct {
		hosts, port string
		want        []string
	}{
		{"relay.example.com", "8080", []string{"relay.example.com:8080"}},
		{"a.example.com,b.example.com:9090", "8080", []string{"a.example.com:8080", "b.example.com:9090"}},
		{"::1", "8080", []string{"[::1]:8080"}},
		{"[2001:db8::1]", "8080", []string{"[2001:db8::1]:8080"}},
		{"[2001:db8::1]:9", "", []string{"[2001:db8::1]:9"}},
		{"wss://relay.example.com/tunnel", "", []string{"wss://relay.example.com/tunnel"}},
		{"ws://127.0.0.1:8080/, 127.0.0.2", "8080", []string{"ws://127.0.0.1:8080/", "127.0.0.2:8080"}},
	} {
		got, err := RelayAddrs(tc.hosts, tc.port)
		if err != nil || !slices.Equal(got, tc.want) {
			t.Errorf("RelayAddrs(%q, %q) = %q, %v; want %q", tc.hosts, tc.port, got, err, tc.want)
		}
	}
	for _, tc := range []struct{ hosts, port, want string }{
		{"relay.example.com", "", "has no port"},
		{"a.example.com,,b", "80", "empty relay host"},
		{"relay.example.com", "70000", "relay"},
		{"2001:db8::zz", "80", "bad relay host"},
		{"http://relay.example.com/", "", "http"},
	} {
		if _, err := RelayAddrs(tc.hosts, tc.port); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("RelayAddrs(%q, %q): %v, want an error saying %q", tc.hosts, tc.port, err, tc.want)
		}
	}
}
