package server

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"tcprelay/internal/copier"
	"tcprelay/internal/proto"
)

// The operator's controls of a running relay, for the admin API (the
// relay's -admin-addr, and `relay ctl`): what it holds, listed whole, and
// the actions on it. The JSON names are a contract, like the access log's.

// AgentInfo is one agent session.
type AgentInfo struct {
	ID       string    `json:"id"`   // the session's, for DisconnectAgent
	Name     string    `json:"name"` // its name in the agents file, its key, or its address
	Key      string    `json:"key,omitempty"`
	Addr     string    `json:"addr"`     // its control connection's address
	Software string    `json:"software"` // what it says it is
	Since    time.Time `json:"since"`
	Ports    []int     `json:"ports"`  // the public ports it serves
	Parked   int       `json:"parked"` // pre-opened data connections
}

// EndpointInfo is one public port, open or reserved.
type EndpointInfo struct {
	Port     int          `json:"port"`
	Pool     string       `json:"pool,omitempty"`
	Reserved bool         `json:"reserved"` // kept for an owner that left
	Until    time.Time    `json:"until,omitzero"`
	Draining bool         `json:"draining"` // takes no new clients (DrainEndpoint)
	Members  []MemberInfo `json:"members"`
	Clients  int          `json:"clients"` // waiting or relayed
	Waiting  int          `json:"waiting"`
	Denied   int          `json:"denied"` // closed by its access lists
	BytesIn  int64        `json:"bytes_in"`
	BytesOut int64        `json:"bytes_out"`
}

// MemberInfo is one agent session serving an endpoint.
type MemberInfo struct {
	Agent   string `json:"agent"` // the session's id
	Name    string `json:"name"`
	Ready   bool   `json:"ready"`
	Clients int    `json:"clients"`
}

// ClientInfo is one outside client, relayed or waiting for its agent.
type ClientInfo struct {
	Port     int       `json:"port"`
	Client   string    `json:"client"`
	Agent    string    `json:"agent"` // the serving session's id
	Since    time.Time `json:"since"` // when the relay accepted it
	Waiting  bool      `json:"waiting"`
	BytesIn  int64     `json:"bytes_in"`
	BytesOut int64     `json:"bytes_out"`
}

// ErrNotFound is returned by the actions for what the relay does not hold.
var ErrNotFound = errors.New("not found")

// Agents lists the agent sessions, oldest first.
func (s *Server) Agents() []AgentInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := []AgentInfo{}
	for ss := range s.sessions {
		a := AgentInfo{ID: ss.sid, Name: ss.name(), Addr: ss.remote, Software: ss.software, Since: ss.since,
			Ports: []int{}, Parked: len(ss.pool)}
		if ss.id != nil {
			a.Key = proto.FormatKey(ss.id.Key)
		}
		for _, m := range ss.members {
			a.Ports = append(a.Ports, m.ep.port)
		}
		slices.Sort(a.Ports)
		out = append(out, a)
	}
	slices.SortFunc(out, func(a, b AgentInfo) int { return a.Since.Compare(b.Since) })
	return out
}

// Endpoints lists the public ports, open and reserved, by port.
func (s *Server) Endpoints() []EndpointInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := []EndpointInfo{}
	for _, ep := range s.endpoints {
		e := EndpointInfo{Port: ep.port, Pool: ep.pool, Reserved: ep.ln == nil, Until: ep.until, Draining: ep.draining,
			Members: []MemberInfo{}, Clients: ep.conns, Waiting: ep.pending, Denied: ep.denied,
			BytesIn: ep.bytesDone.ToAgents, BytesOut: ep.bytesDone.FromAgents}
		for _, m := range ep.members {
			e.Members = append(e.Members, MemberInfo{Agent: m.sess.sid, Name: m.sess.name(), Ready: m.ready, Clients: m.clients})
		}
		out = append(out, e)
	}
	slices.SortFunc(out, func(a, b EndpointInfo) int { return a.Port - b.Port })
	for l, info := range s.links { // the live links' bytes too
		if i, ok := slices.BinarySearchFunc(out, info.member.ep.port, func(e EndpointInfo, port int) int { return e.Port - port }); ok {
			a, b := l.Progress()
			out[i].BytesIn += a
			out[i].BytesOut += b
		}
	}
	return out
}

// Clients lists the outside clients, relayed and waiting, by port and
// then oldest first.
func (s *Server) Clients() []ClientInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := []ClientInfo{}
	for l, info := range s.links {
		a, b := l.Progress()
		out = append(out, ClientInfo{Port: info.member.ep.port, Client: info.client.RemoteAddr().String(),
			Agent: info.member.sess.sid, Since: info.accepted, BytesIn: a, BytesOut: b})
	}
	for _, p := range s.pending {
		out = append(out, ClientInfo{Port: p.member.ep.port, Client: p.client.RemoteAddr().String(),
			Agent: p.member.sess.sid, Since: p.since, Waiting: true})
	}
	slices.SortFunc(out, func(a, b ClientInfo) int {
		if a.Port != b.Port {
			return a.Port - b.Port
		}
		return a.Since.Compare(b.Since)
	})
	return out
}

// CloseClient closes the outside client from address client on port,
// relayed or waiting.
func (s *Server) CloseClient(port int, client string) error {
	s.mu.Lock()
	var link *copier.Link
	var waiting *pending
	for l, info := range s.links {
		if info.member.ep.port == port && info.client.RemoteAddr().String() == client {
			link = l
			info.endedBy("closed by the operator")
		}
	}
	for _, p := range s.pending {
		if p.member.ep.port == port && p.client.RemoteAddr().String() == client {
			waiting = p
		}
	}
	s.mu.Unlock()
	switch {
	case link != nil:
		link.Close()
	case waiting != nil && s.takePending(waiting.token, nil) != nil:
		s.dropClient(waiting, "closed by the operator")
	default:
		return fmt.Errorf("client %s on port %d: %w", client, port, ErrNotFound)
	}
	s.log.Info("outside client closed by the operator", "port", port, "client", client)
	return nil
}

// DrainEndpoint stops (drain set) or resumes (drain not set) the taking of
// new clients on port: while it drains, its clients finish and new ones
// are refused, and a load balancer's check (ReadyPort) says it is not
// ready, so it routes around this relay.
func (s *Server) DrainEndpoint(port int, drain bool) error {
	s.mu.Lock()
	ep := s.endpoints[port]
	if ep != nil {
		ep.draining = drain
	}
	s.mu.Unlock()
	if ep == nil {
		return fmt.Errorf("port %d: %w", port, ErrNotFound)
	}
	s.log.Info("endpoint drain set by the operator", "port", port, "draining", drain)
	return nil
}

// DisconnectAgent ends the agent sessions that id names: a session's id
// (AgentInfo.ID), or an agent's name, for all its sessions. Their agents
// are told, and reconnect as after a lost connection; their relayed
// connections go on. It returns how many sessions it ended.
func (s *Server) DisconnectAgent(id string) (int, error) {
	s.mu.Lock()
	var end []*session
	for ss := range s.sessions {
		if ss.sid == id || ss.name() == id {
			end = append(end, ss)
			ss.ended = "disconnected by the operator"
		}
	}
	s.mu.Unlock()
	if len(end) == 0 {
		return 0, fmt.Errorf("agent %q: %w", id, ErrNotFound)
	}
	endSessions(end, func(ss *session) proto.Message {
		ss.log.Info("agent disconnected by the operator")
		return &proto.GoAway{Message: "disconnected by the relay's operator"}
	})
	return len(end), nil
}

// CheckOperator runs check, a check of an operator's credentials from
// remote, under the same throttle as agents' authentications: a failure
// spends a token of the address's bucket, and with none left check is not
// run. ok reports whether check ran and passed.
func (s *Server) CheckOperator(remote string, check func() bool) (ok, throttled bool) {
	src := netip.Addr{}
	if ap, err := netip.ParseAddrPort(remote); err == nil {
		src = sourceIP(ap.Addr())
	}
	s.mu.Lock()
	allowed := s.auth.takeLocked(src, time.Now())
	s.mu.Unlock()
	if !allowed {
		s.count.authThrottled.Add(1)
		s.quiet.Warn("admin API request refused unchecked: too many failed authentications from the address", "remote", remote)
		return false, true
	}
	if !check() {
		s.count.authFails.Add(1)
		s.quiet.Warn("admin API request with a wrong or missing token", "remote", remote)
		return false, false
	}
	s.mu.Lock()
	s.auth.refundLocked(src, time.Now())
	s.mu.Unlock()
	return true, false
}
