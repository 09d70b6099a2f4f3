package server

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
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
	Ports    []int     `json:"ports"`           // the public ports it serves
	Hosts    []string  `json:"hosts,omitempty"` // the names it serves on the shared port
	Parked   int       `json:"parked"`          // pre-opened data connections
}

// EndpointInfo is one public port, or name on the shared port, open or
// reserved.
type EndpointInfo struct {
	Port     int          `json:"port"`           // for a name, the shared port
	Host     string       `json:"host,omitempty"` // its name on the shared port
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
	Host     string    `json:"host,omitempty"` // the name it asked for on the shared port
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
			if m.ep.host != "" {
				a.Hosts = append(a.Hosts, m.ep.host)
			} else {
				a.Ports = append(a.Ports, m.ep.port)
			}
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
	for ep := range s.allEndpointsLocked() {
		e := EndpointInfo{Port: ep.port, Host: ep.host, Pool: ep.pool, Reserved: ep.ln == nil, Until: ep.until, Draining: ep.draining,
			Members: []MemberInfo{}, Clients: ep.conns, Waiting: ep.pending, Denied: ep.denied,
			BytesIn: ep.bytesDone.ToAgents, BytesOut: ep.bytesDone.FromAgents}
		for _, m := range ep.members {
			e.Members = append(e.Members, MemberInfo{Agent: m.sess.sid, Name: m.sess.name(), Ready: m.ready, Clients: m.clients})
		}
		out = append(out, e)
	}
	slices.SortFunc(out, func(a, b EndpointInfo) int { return cmp.Or(a.Port-b.Port, strings.Compare(a.Host, b.Host)) })
	for l, info := range s.links { // the live links' bytes too
		ep := info.member.ep
		if i, ok := slices.BinarySearchFunc(out, ep, func(e EndpointInfo, ep *endpoint) int {
			return cmp.Or(e.Port-ep.port, strings.Compare(e.Host, ep.host))
		}); ok {
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
		out = append(out, ClientInfo{Port: info.member.ep.port, Host: info.member.ep.host, Client: info.client.RemoteAddr().String(),
			Agent: info.member.sess.sid, Since: info.accepted, BytesIn: a, BytesOut: b})
	}
	for _, p := range s.pending {
		out = append(out, ClientInfo{Port: p.member.ep.port, Host: p.member.ep.host, Client: p.client.RemoteAddr().String(),
			Agent: p.member.sess.sid, Since: p.since, Waiting: true})
	}
	slices.SortFunc(out, func(a, b ClientInfo) int {
		return cmp.Or(a.Port-b.Port, strings.Compare(a.Host, b.Host), a.Since.Compare(b.Since))
	})
	return out
}

// CloseClient closes the outside client from address client on endpoint
// (a port, or a name on the shared port), relayed or waiting.
func (s *Server) CloseClient(endpoint, client string) error {
	s.mu.Lock()
	ep := s.endpointLocked(endpoint)
	var link *copier.Link
	var waiting *pending
	for l, info := range s.links {
		if ep != nil && info.member.ep == ep && info.client.RemoteAddr().String() == client {
			link = l
			info.endedBy("closed by the operator")
		}
	}
	for _, p := range s.pending {
		if ep != nil && p.member.ep == ep && p.client.RemoteAddr().String() == client {
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
		return fmt.Errorf("client %s on %s: %w", client, endpoint, ErrNotFound)
	}
	s.log.Info("outside client closed by the operator", "endpoint", endpoint, "client", client)
	return nil
}

// DrainEndpoint stops (drain set) or resumes (drain not set) the taking of
// new clients on endpoint, a port or a name on the shared port: while it
// drains, its clients finish and new ones are refused, and a load
// balancer's check (EndpointReady) says it is not ready, so it routes
// around this relay.
func (s *Server) DrainEndpoint(endpoint string, drain bool) error {
	s.mu.Lock()
	ep := s.endpointLocked(endpoint)
	if ep != nil {
		ep.draining = drain
	}
	s.mu.Unlock()
	if ep == nil {
		return fmt.Errorf("%s: %w", endpoint, ErrNotFound)
	}
	s.log.Info("endpoint drain set by the operator", "endpoint", ep.what(), "draining", drain)
	return nil
}

// endpointLocked returns the endpoint that key names: a port number, or a
// name on the shared port, whole or under Config.NamesDomain ("db"); nil
// if there is none. s.mu must be held.
func (s *Server) endpointLocked(key string) *endpoint {
	if port, err := strconv.Atoi(key); err == nil {
		return s.endpoints[port]
	}
	if s.cfg.NamesDomain == "" {
		return nil
	}
	name, err := proto.FullHostname(key, s.cfg.NamesDomain)
	if err != nil {
		return nil
	}
	return s.names[name]
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
