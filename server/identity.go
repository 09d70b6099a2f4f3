package server

import (
	"bufio"
	"crypto/ed25519"
	"fmt"
	"io"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"

	"tcprelay/internal/copier"
	"tcprelay/internal/proto"
)

// Agent is one line of an agents file: who an agent is (its Ed25519 public
// key, and a name for logs) and its scope. Every limit of the scope counts
// over all the agent's sessions: two processes with the same key share it.
type Agent struct {
	Name string
	Key  ed25519.PublicKey

	// Ports are the public ports it may hold. If empty, the relay's range.
	Ports []PortRange
	// Tunnels bounds the endpoints it holds, open or reserved. If zero,
	// Config.MaxTunnelsPerAgent.
	Tunnels int
	// Sessions bounds its control connections at once. If zero, 32.
	Sessions int
	// Parked bounds its pre-opened data connections, over all sessions. If
	// zero, Config.MaxPoolPerAgent.
	Parked int
	// Pools names the pools it may join; "*" is any. If empty, none.
	Pools []string
	// Hosts are the names it may hold on the shared TLS port, under
	// Config.NamesDomain: a name ("db"), "*." and a name ("*.team-a": any
	// name under team-a), or "*" (any). If empty, any.
	Hosts []string

	// Allow and Deny bound who may reach its tunnels: an outside client
	// from a Deny prefix, or from none of a non-empty Allow, is closed at
	// accept, before its agent hears of it. An agent may narrow them
	// further for its own tunnels (Listen.Allow, Listen.Deny), never widen
	// them. If empty, anyone.
	Allow, Deny []netip.Prefix

	// Rate bounds, in bytes per second, what its tunnels' clients send
	// through the relay, and, separately, what they receive: each
	// direction over all its connections at once. A change by SetAgents
	// applies to its limited connections at once, and to its unlimited
	// ones from their next client. If zero, unlimited (and its connections
	// are spliced).
	Rate int64

	// Secret marks the line of the shared secret's tenant (its KEY is the
	// word "secret"; Key is nil): its scope applies to the agents that
	// register with the secret and no key, and its Sessions, Tunnels and
	// Parked count over all of them. Each source address among them has
	// also at most 32 sessions and Config.MaxTunnelsPerAgent tunnels.
	Secret bool
}

// PortRange is an inclusive range of ports.
type PortRange struct{ Lo, Hi int }

func (r PortRange) String() string { return strconv.Itoa(r.Lo) + "-" + strconv.Itoa(r.Hi) }

// defaultSessions is Agent.Sessions when zero.
const defaultSessions = 32

// LoadAgents reads an agents file (see ParseAgents).
func LoadAgents(path string) ([]Agent, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	agents, err := ParseAgents(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return agents, nil
}

// ParseAgents reads an agents file: one agent per line,
//
//	NAME KEY [ports=LO-HI[,LO-HI...]] [tunnels=N] [sessions=N] [parked=N] [pools=NAME[,NAME...]|*]
//	         [hosts=NAME[,NAME...]] [allow=CIDR[,CIDR...]] [deny=CIDR[,CIDR...]] [rate=N[UNIT]]
//
// with KEY as agents print it (ed25519:BASE64), or, on at most one line,
// the word secret: the scope of the shared secret's tenant (see
// Agent.Secret). Blank lines and text after '#' are ignored. Names and
// keys are unique. A rate is bytes per second, each direction (see
// ParseRate). The result is never nil, so an empty file admits no
// agent by key.
func ParseAgents(r io.Reader) ([]Agent, error) {
	agents := []Agent{}
	names, keys := map[string]int{}, map[string]int{}
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		line, _, _ := strings.Cut(sc.Text(), "#")
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		a, err := parseAgent(f)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", n, err)
		}
		if prev, ok := names[a.Name]; ok {
			return nil, fmt.Errorf("line %d: agent %s is already on line %d", n, a.Name, prev)
		}
		if prev, ok := keys[string(a.Key)]; ok {
			if a.Secret {
				return nil, fmt.Errorf("line %d: the secret's tenant is already on line %d", n, prev)
			}
			return nil, fmt.Errorf("line %d: the key of %s is already on line %d", n, a.Name, prev)
		}
		names[a.Name], keys[string(a.Key)] = n, n
		agents = append(agents, a)
	}
	return agents, sc.Err()
}

func parseAgent(f []string) (Agent, error) {
	if len(f) < 2 {
		return Agent{}, fmt.Errorf("want NAME KEY [options], got %q", strings.Join(f, " "))
	}
	a := Agent{Name: f[0]}
	var err error
	if f[1] == "secret" {
		a.Secret = true
	} else if a.Key, err = proto.ParseKey(f[1]); err != nil {
		return Agent{}, err
	}
	for _, opt := range f[2:] {
		k, v, ok := strings.Cut(opt, "=")
		if !ok || v == "" {
			return Agent{}, fmt.Errorf("option %q: want NAME=VALUE", opt)
		}
		switch k {
		case "ports":
			for _, r := range strings.Split(v, ",") {
				lo, hi, err := parseRange(r)
				if err != nil {
					return Agent{}, fmt.Errorf("ports=%s: %w", v, err)
				}
				a.Ports = append(a.Ports, PortRange{lo, hi})
			}
		case "tunnels", "sessions", "parked":
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 {
				return Agent{}, fmt.Errorf("%s=%s: want a positive number", k, v)
			}
			*map[string]*int{"tunnels": &a.Tunnels, "sessions": &a.Sessions, "parked": &a.Parked}[k] = n
		case "pools":
			a.Pools = strings.Split(v, ",")
			if slices.Contains(a.Pools, "") {
				return Agent{}, fmt.Errorf("pools=%s: an empty pool name", v)
			}
		case "hosts":
			for h := range strings.SplitSeq(v, ",") {
				name := strings.TrimPrefix(strings.ToLower(h), "*.")
				if h != "*" {
					if err := proto.CheckHostname(name); err != nil {
						return Agent{}, fmt.Errorf("hosts=%s: %v (want NAME, *.NAME or *)", v, err)
					}
				}
				a.Hosts = append(a.Hosts, strings.ToLower(h))
			}
		case "allow", "deny":
			ps, err := proto.ParsePrefixes(v)
			if err != nil {
				return Agent{}, fmt.Errorf("%s=%s: %w", k, v, err)
			}
			*map[string]*[]netip.Prefix{"allow": &a.Allow, "deny": &a.Deny}[k] = ps
		case "rate":
			if a.Rate, err = ParseRate(v); err != nil {
				return Agent{}, err
			}
		default:
			return Agent{}, fmt.Errorf("unknown option %q: want ports, tunnels, sessions, parked, pools, hosts, allow, deny or rate", k)
		}
	}
	return a, nil
}

// rateUnits are the units of ParseRate, in bytes (bits: an eighth).
var rateUnits = map[string]float64{
	"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9,
	"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30,
	"Kbit": 1e3 / 8, "Mbit": 1e6 / 8, "Gbit": 1e9 / 8,
}

// ParseRate reads a bandwidth, N[UNIT], as bytes per second: N is a
// positive number (a decimal fraction too: 1.5MB), UNIT one of B (the
// default), KB, MB, GB (powers of 1000 bytes), KiB, MiB, GiB (of 1024
// bytes), or Kbit, Mbit, Gbit (powers of 1000 bits). 80Mbit is 10MB.
func ParseRate(s string) (int64, error) {
	i := strings.IndexFunc(s, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	if i < 0 {
		i = len(s)
	}
	num, unit := s[:i], s[i:]
	mult, ok := rateUnits[unit]
	n, err := strconv.ParseFloat(num, 64)
	if !ok || err != nil || n <= 0 || n*mult < 1 || n*mult > 1e15 {
		return 0, fmt.Errorf("rate=%s: want a positive number and a unit, B, KB, MB, GB, KiB, MiB, GiB, Kbit, Mbit or Gbit (rate=10MB, rate=80Mbit)", s)
	}
	return int64(n * mult), nil
}

// parseRange reads LO-HI, or a single port.
func parseRange(s string) (lo, hi int, err error) {
	a, b, isRange := strings.Cut(s, "-")
	if !isRange {
		b = a
	}
	lo, err1 := strconv.Atoi(a)
	hi, err2 := strconv.Atoi(b)
	if err1 != nil || err2 != nil || lo < 1 || hi > 65535 || lo > hi {
		return 0, 0, fmt.Errorf("bad port range %q: want LO-HI within 1-65535", s)
	}
	return lo, hi, nil
}

// identity is who an agent is, for every limit and every port it holds:
// an Agent of the agents file, or, on a relay without one, an agent that
// showed a key (an anonymous identity with the default scope). Agents
// without a key have no identity of their own: their tenant is the shared
// secret's (or the open relay's), with the scope of the agents file's
// secret line, or the default one.
type identity struct {
	Agent
	owner string // the owner of its ports: "key:" and the key in base64; "" for the keyless tenant
	named bool   // from the agents file

	// in and out bound, when Rate is set, what its clients send and what
	// they receive: each shared by all its links, and kept across
	// SetAgents with the identity, so a new rate= reaches live links.
	in, out *copier.Bucket

	// Guarded by s.mu.
	sessions map[*session]struct{}
	revoked  bool
}

func newIdentity(a Agent, named bool) *identity {
	id := &identity{Agent: a, named: named, sessions: make(map[*session]struct{}),
		in: copier.NewBucket(a.Rate), out: copier.NewBucket(a.Rate)}
	if !a.Secret {
		id.owner = ownerKey(a.Key)
	}
	return id
}

// setAgent gives the identity a new scope (SetAgents), its rate included.
// s.mu must be held.
func (id *identity) setAgent(a Agent) {
	id.Agent = a
	id.in.SetRate(a.Rate)
	id.out.SetRate(a.Rate)
}

// buckets returns the rate limits of a new link of the identity's, client
// to agent and agent to client: nil, nil when it has no Rate, so that the
// link splices. s.mu must be held.
func (id *identity) buckets() (in, out *copier.Bucket) {
	if id.Rate <= 0 {
		return nil, nil
	}
	return id.in, id.out
}

// keylessScope is the scope of the agents without a key: the agents
// file's secret line if it has one, else any port of the relay's range and
// any pool (pools of agents of the agents file stay out of their reach all
// the same: see mayJoinLocked).
func keylessScope(agents []Agent) Agent {
	for _, a := range agents {
		if a.Secret {
			return a
		}
	}
	return Agent{Name: "secret", Secret: true, Pools: []string{"*"}}
}

// ownerKey is the owner string of a key's ports.
func ownerKey(k ed25519.PublicKey) string { return "key:" + proto.FormatKey(k) }

// String names the identity in logs and the status view.
func (id *identity) String() string { return id.Name }

// allowsPort reports whether port is within the identity's ranges.
func (id *identity) allowsPort(port int) bool {
	if len(id.Ports) == 0 {
		return true
	}
	for _, r := range id.Ports {
		if port >= r.Lo && port <= r.Hi {
			return true
		}
	}
	return false
}

// allowsHost reports whether the identity may hold name, a full name
// under domain (the relay's Config.NamesDomain): its Hosts match name
// relative to domain, or name whole.
func (id *identity) allowsHost(name, domain string) bool {
	if len(id.Hosts) == 0 {
		return true
	}
	rel := strings.TrimSuffix(name, "."+strings.ToLower(domain))
	for _, h := range id.Hosts {
		sub, wild := strings.CutPrefix(h, "*.")
		switch {
		case h == "*", h == rel, h == name:
			return true
		case wild && (strings.HasSuffix(rel, "."+sub) || strings.HasSuffix(name, "."+sub)):
			return true
		}
	}
	return false
}

// allowsEndpoint reports whether the identity's scope covers ep: its port,
// or its name.
func (id *identity) allowsEndpoint(ep *endpoint) bool {
	if ep.host != "" {
		return id.allowsHost(ep.host, ep.s.cfg.NamesDomain)
	}
	return id.allowsPort(ep.port)
}

// allowsPool reports whether the identity may join pool name.
func (id *identity) allowsPool(name string) bool {
	return slices.Contains(id.Pools, name) || slices.Contains(id.Pools, "*")
}

// forgetLocked drops an anonymous identity (a key seen without an agents
// file) once it has no session and no port: keys cost nothing to make, so
// the relay keeps nothing for one that left. s.mu must be held.
func (s *Server) forgetLocked(id *identity) {
	if id == nil || id.named || len(id.sessions) > 0 || s.ids[string(id.Key)] != id {
		return
	}
	for ep := range s.allEndpointsLocked() {
		if ep.owner == id.owner {
			return
		}
	}
	delete(s.ids, string(id.Key))
}

// admits reports whether a client from ip passes the lists allow and deny:
// it is in no Deny prefix, and in an Allow prefix if there are any.
func admits(allow, deny []netip.Prefix, ip netip.Addr) bool {
	for _, p := range deny {
		if p.Contains(ip) {
			return false
		}
	}
	if len(allow) == 0 {
		return true
	}
	for _, p := range allow {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}
