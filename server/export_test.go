package server

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
