package server

// TrackedConns is how many connections the relay tracks outside links and
// sessions (handshaking, parked, waiting): what Close would close. Every
// one of them should be a live connection.
func TrackedConns(s *Server) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}
