package server

import (
	"net"
	"testing"
)

// tcpPair returns the two ends of a loopback TCP connection, as the relay
// and an agent hold a data connection; both are closed when the test ends.
func tcpPair(t *testing.T) (relaySide, agentSide net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	agentSide, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { agentSide.Close() })
	relaySide, err = ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { relaySide.Close() })
	return relaySide, agentSide
}

// LinkPaths counts the live links of the endpoint on port by how they copy:
// both directions spliced, or neither (a tenant with a Rate).
func LinkPaths(s *Server, port int) (spliced, limited int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for l, info := range s.links {
		if info.member.ep.port != port {
			continue
		}
		switch ab, ba := l.Spliced(); {
		case ab && ba:
			spliced++
		case !ab && !ba:
			limited++
		}
	}
	return spliced, limited
}
