package server

import (
	"bytes"
	"cmp"
	"fmt"
	"html/template"
	"io"
	"math"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// The status views: WriteStatus (plain text) and WriteStatusHTML (the
// operator's page in a browser). Both render one status, copied under s.mu
// by takeStatus and sorted, bounded and rendered outside it, so the two
// never disagree and a slow reader never holds the relay's lock. The
// metrics' per-endpoint series come from it too.

// statusRows bounds each list a view shows: agents, endpoints, reserved
// ports, and each endpoint's relayed and waiting clients. Past it a view
// shows the first ones (the oldest, or the lowest ports) and how many more
// there are.
const statusRows = 200

// status is a snapshot of the relay for its status views.
type status struct {
	Time    time.Time // when it was taken
	Started time.Time // when the relay started
	Version string
	Mode    string   // who may register: open, shared secret, agents file
	TLS     bool     // the control listeners speak TLS
	Control []string // control listeners' addresses
	Ports   string   // the public port range
	Limits  []statusLimit

	Bytes     byteCount // relayed by every link, finished and live
	Stats               // the counts, from the same critical section
	Endpoints int       // endpoints, open and reserved

	Agents   []agentStatus
	Open     []*endpointStatus // endpoints with a listener, by port
	Reserved []*endpointStatus // endpoints kept for an owner that left, by port
	// The lists' lengths before bound, and the rows it left out.
	NAgents, NOpen, NReserved          int
	MoreAgents, MoreOpen, MoreReserved int
}

type statusLimit struct{ Name, Value string }

type agentStatus struct {
	Name, Remote, Software string
	Since                  time.Time
	Tunnels, Parked        int
	Ports                  []portStatus // the endpoints its session serves, by port
}

// portStatus is one endpoint a session serves: its port, and its pool.
type portStatus struct {
	Port int
	Host string // its name on the shared port, if it has one
	Pool string
}

// Label is how the views name the endpoint: its port, or its name.
func (p portStatus) Label() string {
	if p.Host != "" {
		return p.Host
	}
	return strconv.Itoa(p.Port)
}

type endpointStatus struct {
	Port  int
	Host  string    // its name on the shared port, if it has one (Port is then that port)
	Pool  string    // the pool it serves, if any
	Until time.Time // reserved until; zero: open

	Members        []memberStatus
	Conns, Pending int             // outside clients, waiting or relayed; waiting
	Clients        []clientStatus  // relayed, oldest first
	Waiting        []waitingStatus // waiting for their agent, oldest first
	MoreClients    int             // relayed clients left out of Clients
	MoreWaiting    int             // waiting clients left out of Waiting
	Bytes          byteCount       // relayed by its links, finished and live
	Denied         int             // outside clients closed by its access lists
	Charts         template.HTML   // its clients and bytes per second over the last hour (history.go)
}

type memberStatus struct {
	Agent   string
	Remote  string // its session's address: two sessions of one agent differ by it
	Tunnel  uint32
	Ready   bool
	Clients int
}

type clientStatus struct {
	Remote, Agent string
	Tunnel        uint32
	Since         time.Time // when it was joined to its agent's data connection
	Bytes         byteCount // so far
}

type waitingStatus struct {
	Remote, Agent string
	Tunnel        uint32
	Since         time.Time // when the relay accepted it
}

// byteCount is bytes relayed each way.
type byteCount struct {
	ToAgents, FromAgents int64
}

func (b *byteCount) add(toAgents, fromAgents int64) {
	b.ToAgents += toAgents
	b.FromAgents += fromAgents
}

// takeStatus copies the relay's state under s.mu. The byte counts are read
// in the same critical section as the finished totals (see linkDone), so
// they never count a link twice or miss one. With clients false it leaves
// out the lists of clients (the metrics need only counts and bytes). The
// lists are neither sorted nor bounded: see bound.
func (s *Server) takeStatus(clients bool) *status {
	st := &status{Started: s.started, Version: s.cfg.Version, TLS: s.cfg.ControlTLS,
		Ports: portRange(s.cfg.PortMin, s.cfg.PortMax), Limits: s.limits()}
	if st.Version == "" {
		st.Version = "unknown"
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	st.Time = time.Now()
	st.Mode = s.modeLocked()
	for ln := range s.listeners {
		st.Control = append(st.Control, ln.Addr().String())
	}
	st.Bytes = s.bytesDone
	st.Stats, st.Endpoints = s.statsLocked(), len(s.endpoints)
	st.Agents = make([]agentStatus, 0, len(s.sessions))
	for ss := range s.sessions {
		a := agentStatus{Name: ss.name(), Remote: ss.remote, Software: peerText(ss.software),
			Since: ss.since, Tunnels: len(ss.members), Parked: len(ss.pool)}
		for _, m := range ss.members {
			a.Ports = append(a.Ports, portStatus{m.ep.port, m.ep.host, peerText(m.ep.pool)})
		}
		st.Agents = append(st.Agents, a)
	}
	byEP := make(map[*endpoint]*endpointStatus, len(s.endpoints))
	for ep := range s.allEndpointsLocked() {
		e := &endpointStatus{Port: ep.port, Host: ep.host, Pool: peerText(ep.pool), Conns: ep.conns, Pending: ep.pending, Bytes: ep.bytesDone, Denied: ep.denied}
		if ep.ln == nil {
			e.Until = ep.until
			st.Reserved = append(st.Reserved, e)
		} else {
			st.Open = append(st.Open, e)
		}
		for _, m := range ep.members {
			e.Members = append(e.Members, memberStatus{Agent: m.sess.name(), Remote: m.sess.remote, Tunnel: m.id, Ready: m.ready, Clients: m.clients})
		}
		byEP[ep] = e
	}
	for l, info := range s.links {
		toAgent, fromAgent := l.Progress() // a is the client, b the data connection
		st.Bytes.add(toAgent, fromAgent)
		e := byEP[info.member.ep]
		if e == nil {
			continue // its endpoint was released; the link drains
		}
		e.Bytes.add(toAgent, fromAgent)
		if clients {
			e.Clients = append(e.Clients, clientStatus{Remote: info.client.RemoteAddr().String(),
				Agent: info.member.sess.name(), Tunnel: info.member.id, Since: info.since,
				Bytes: byteCount{toAgent, fromAgent}})
		}
	}
	if clients {
		for _, p := range s.pending {
			if e := byEP[p.member.ep]; e != nil {
				e.Waiting = append(e.Waiting, waitingStatus{Remote: p.client.RemoteAddr().String(),
					Agent: p.member.sess.name(), Tunnel: p.member.id, Since: p.since})
			}
		}
	}
	return st
}

// bound sorts the lists (agents and clients oldest first, endpoints by
// port) and cuts each to statusRows, counting what it left out.
func (st *status) bound() {
	st.NAgents, st.NOpen, st.NReserved = len(st.Agents), len(st.Open), len(st.Reserved)
	sort.Slice(st.Agents, func(i, j int) bool { return st.Agents[i].Since.Before(st.Agents[j].Since) })
	for _, a := range st.Agents {
		slices.SortFunc(a.Ports, func(x, y portStatus) int { return cmp.Or(x.Port-y.Port, strings.Compare(x.Host, y.Host)) })
	}
	for _, eps := range []*[]*endpointStatus{&st.Open, &st.Reserved} {
		slices.SortFunc(*eps, func(x, y *endpointStatus) int { return cmp.Or(x.Port-y.Port, strings.Compare(x.Host, y.Host)) })
	}
	if n := len(st.Agents); n > statusRows {
		st.Agents, st.MoreAgents = st.Agents[:statusRows], n-statusRows
	}
	if n := len(st.Open); n > statusRows {
		st.Open, st.MoreOpen = st.Open[:statusRows], n-statusRows
	}
	if n := len(st.Reserved); n > statusRows {
		st.Reserved, st.MoreReserved = st.Reserved[:statusRows], n-statusRows
	}
	for _, e := range append(st.Open, st.Reserved...) {
		sort.Slice(e.Clients, func(i, j int) bool { return e.Clients[i].Since.Before(e.Clients[j].Since) })
		sort.Slice(e.Waiting, func(i, j int) bool { return e.Waiting[i].Since.Before(e.Waiting[j].Since) })
		if n := len(e.Clients); n > statusRows {
			e.Clients, e.MoreClients = e.Clients[:statusRows], n-statusRows
		}
		if n := len(e.Waiting); n > statusRows {
			e.Waiting, e.MoreWaiting = e.Waiting[:statusRows], n-statusRows
		}
	}
}

// modeLocked says who may register. s.mu must be held (SetAgents changes
// the agents).
func (s *Server) modeLocked() string {
	switch {
	case s.cfg.Agents != nil && s.cfg.Secret != "":
		return fmt.Sprintf("identities from an agents file (%d keys), and the shared secret", len(s.cfg.Agents))
	case s.cfg.Agents != nil:
		return fmt.Sprintf("identities from an agents file (%d keys)", len(s.cfg.Agents))
	case s.cfg.Secret != "":
		return "shared secret"
	}
	return "open: any agent may register"
}

func portRange(lo, hi int) string {
	if lo == 0 && hi == 0 {
		return "any: chosen by the operating system"
	}
	return strconv.Itoa(lo) + "-" + strconv.Itoa(hi)
}

// limits lists the settings the relay runs with, as an operator reads
// them.
func (s *Server) limits() []statusLimit {
	set, b := s.set, s.budget
	count := func(n int, unlimited string) string {
		if n == math.MaxInt {
			return unlimited
		}
		return strconv.Itoa(n)
	}
	timeout := func(d time.Duration, zero string) string {
		if d <= 0 {
			return zero
		}
		return d.String()
	}
	size := func(n int64, zero string) string {
		if n <= 0 {
			return zero
		}
		return humanBytes(n)
	}
	return []statusLimit{
		{"budget: file descriptors", strconv.Itoa(b.fds)},
		{"budget: connections in handshake", fmt.Sprintf("at most %d (%d per source address), %d kept free", b.handshakes, b.perSource, b.handshakeFloor)},
		{"budget: agents' connections", fmt.Sprintf("at most %d, %d kept free", b.agents, b.agentFloor)},
		{"budget: outside clients", fmt.Sprintf("at most %d, by max-min fairness between tunnels", b.clients)},
		{"tunnels per agent", count(set.maxTunnels, "unlimited")},
		{"clients per tunnel", count(set.maxConns, "no fixed bound")},
		{"clients per source address, per tunnel", count(set.maxPerSource, "unlimited")},
		{"waiting clients per tunnel", count(set.maxPending, "unlimited")},
		{"pre-opened data connections per agent", count(set.maxPool, "unlimited")},
		{"link buffer", size(int64(set.linkBuffer), "the kernel's autotuning")},
		{"stalled memory limit", size(set.maxStalledMemory, "none")},
		{"handshake timeout", set.handshakeTimeout.String()},
		{"pickup timeout", set.pickupTimeout.String()},
		{"control write timeout", set.writeTimeout.String()},
		{"heartbeat", timeout(set.heartbeat, "off")},
		{"port grace", timeout(set.portGrace, "none: released at once")},
		{"stall timeout", timeout(set.stallTimeout, "none")},
		{"idle timeout", timeout(set.idleTimeout, "none")},
		{"control frame size", humanBytes(int64(set.maxFrameSize))},
	}
}

// maxPeerText bounds what the views show of a string a peer chose.
const maxPeerText = 64

// peerText is s, a string a peer chose, cut to maxPeerText bytes (on a
// character's boundary) with "..." if it was longer. The views still quote
// or escape it.
func peerText(s string) string {
	if len(s) <= maxPeerText {
		return s
	}
	n := maxPeerText
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "..."
}

// humanBytes is n in B, KiB, MiB or GiB.
func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return strconv.FormatInt(n, 10) + " B"
	}
	v, suffix := float64(n)/unit, "KiB"
	for _, s := range []string{"MiB", "GiB", "TiB"} {
		if v < unit {
			break
		}
		v, suffix = v/unit, s
	}
	return strconv.FormatFloat(v, 'f', 1, 64) + " " + suffix
}

// plural is n and the noun one, in the plural unless n is 1: "1 client",
// "2 clients".
func plural(n int, one string) string {
	if n == 1 {
		return "1 " + one
	}
	return strconv.Itoa(n) + " " + one + "s"
}

// pluralBytes is plural for a byte count.
func pluralBytes(n int64) string {
	if n == 1 {
		return "1 byte"
	}
	return strconv.FormatInt(n, 10) + " bytes"
}

// portList is an agent's ports as the text view writes them: 8081, 8082
// (pool "web").
func portList(ports []portStatus) string {
	if len(ports) == 0 {
		return "no ports"
	}
	var b strings.Builder
	for i, p := range ports {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(p.Label())
		if p.Pool != "" {
			fmt.Fprintf(&b, " (pool %q)", p.Pool)
		}
	}
	return b.String()
}

// age is how long ago t was at now, to the second.
func age(now, t time.Time) string {
	return now.Sub(t).Round(time.Second).String()
}

// WriteStatus writes a plain-text view of the relay, its agents, and its
// endpoints with their members and clients. It says what the status page
// says (WriteStatusHTML): both render the same snapshot.
func (s *Server) WriteStatus(w io.Writer) error {
	st := s.takeStatus(true)
	st.bound()
	now := st.Time
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s, %s\n", plural(st.NAgents, "agent"), plural(st.Endpoints, "endpoint"))
	tls := "plain TCP"
	if st.TLS {
		tls = "TLS"
	}
	fmt.Fprintf(&b, "relay %s, up %s; agents: %s; control %v over %s; public ports %s\n",
		st.Version, age(now, st.Started), st.Mode, st.Control, tls, st.Ports)
	fmt.Fprintf(&b, "bytes relayed: %d to agents, %d from agents\n", st.Bytes.ToAgents, st.Bytes.FromAgents)
	// What a peer chose (an agent's software, a pool's name) is quoted: it
	// cannot break a line, nor pass for one of the relay's.
	for _, a := range st.Agents {
		fmt.Fprintf(&b, "agent %s from %s (software %q), connected %s ago, ports %s, %s\n",
			a.Name, a.Remote, a.Software, age(now, a.Since), portList(a.Ports), plural(a.Parked, "parked data connection"))
	}
	if n := st.MoreAgents; n > 0 {
		fmt.Fprintf(&b, "... and %s\n", plural(n, "more agent"))
	}
	for _, e := range st.Open {
		pool := ""
		if e.Pool != "" {
			pool = fmt.Sprintf(" (pool %q)", e.Pool)
		}
		fmt.Fprintf(&b, "endpoint on %s%s: %s, %d waiting\n", e.what(), pool, plural(e.Conns, "connection"), e.Pending)
		for _, m := range e.Members {
			ready := ""
			if !m.Ready {
				ready = " (not ready)"
			}
			fmt.Fprintf(&b, "  member: agent %s from %s tunnel %d, %s%s\n", m.Agent, m.Remote, m.Tunnel, plural(m.Clients, "client"), ready)
		}
		writeClients(&b, now, e)
	}
	if n := st.MoreOpen; n > 0 {
		fmt.Fprintf(&b, "... and %s\n", plural(n, "more endpoint"))
	}
	for _, e := range st.Reserved {
		pool := ""
		if e.Pool != "" {
			pool = fmt.Sprintf(" (pool %q)", e.Pool)
		}
		fmt.Fprintf(&b, "endpoint on %s%s: reserved for its owner for another %s\n", e.what(), pool, e.Until.Sub(now).Round(time.Second))
		writeClients(&b, now, e) // links that outlived their member
	}
	if n := st.MoreReserved; n > 0 {
		fmt.Fprintf(&b, "... and %s\n", plural(n, "more reserved port"))
	}
	_, err := w.Write(b.Bytes())
	return err
}

func writeClients(b *bytes.Buffer, now time.Time, e *endpointStatus) {
	for _, c := range e.Clients {
		fmt.Fprintf(b, "  client %s via agent %s tunnel %d, relayed for %s: %s to the agent, %d from it\n",
			c.Remote, c.Agent, c.Tunnel, age(now, c.Since), pluralBytes(c.Bytes.ToAgents), c.Bytes.FromAgents)
	}
	if e.MoreClients > 0 {
		fmt.Fprintf(b, "  ... and %s\n", plural(e.MoreClients, "more client"))
	}
	for _, c := range e.Waiting {
		fmt.Fprintf(b, "  waiting: client %s for agent %s tunnel %d, for %s\n", c.Remote, c.Agent, c.Tunnel, age(now, c.Since))
	}
	if e.MoreWaiting > 0 {
		fmt.Fprintf(b, "  ... and %d more waiting\n", e.MoreWaiting)
	}
}

// WriteStatusHTML writes the status page: what WriteStatus says, as an
// HTML page for a browser that reloads itself every 5 seconds. It has no
// script; every value the agents or clients chose (names, software) is
// escaped, and quoted if it holds a character that does not print.
func (s *Server) WriteStatusHTML(w io.Writer) error {
	st := s.takeStatus(true)
	st.bound()
	ports := make([]int, 0, len(st.Open))
	for _, e := range st.Open {
		if e.Host == "" {
			ports = append(ports, e.Port)
		}
	}
	charts := s.chartsFor(st.Time, ports) // a name has no chart yet
	for _, e := range st.Open {
		if e.Host == "" {
			e.Charts = chartsHTML(charts[e.Port])
		}
	}
	var b bytes.Buffer
	if err := statusPage.Execute(&b, st); err != nil {
		return fmt.Errorf("status page: %w", err)
	}
	_, err := w.Write(b.Bytes())
	return err
}

var statusPage = template.Must(template.New("status").Funcs(template.FuncMap{
	"age":    age,
	"bytes":  humanBytes,
	"left":   func(now, t time.Time) string { return t.Sub(now).Round(time.Second).String() },
	"when":   func(t time.Time) string { return t.UTC().Format("2006-01-02 15:04:05 UTC") },
	"peer":   printable,
	"plural": plural,
}).Parse(statusHTML))

// printable is s if every character of it prints, else s quoted (a line
// break shows as \n): for the page, where html/template escapes markup
// but lets a line break through to whoever reads the source.
func printable(s string) string {
	for _, r := range s {
		if !unicode.IsPrint(r) {
			return strconv.Quote(s)
		}
	}
	return s
}

const statusHTML = `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="5">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tcprelay {{.Version}}: {{plural .NAgents "agent"}}, {{plural .NOpen "endpoint"}}</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.4em; margin: 0 0 .2em; }
h2 { font-size: 1.15em; margin: 1.4em 0 .4em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1em; margin: 1em 0 .3em; }
table { border-collapse: collapse; margin: .3em 0 .8em; }
th, td { padding: .2em .7em; border: 1px solid #ddd; text-align: left; vertical-align: top; }
th { background: #f3f3f3; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.muted { color: #777; }
.ok { color: #17702a; }
.warn { color: #a34a00; }
code { font-family: ui-monospace, monospace; }
.more { font-style: italic; color: #555; }
.charts { display: flex; flex-wrap: wrap; gap: .5em 1.5em; margin: .3em 0; }
.charts figure { margin: 0; }
.charts figcaption { font-size: .85em; color: #555; }
</style>
</head>
<body>
<h1>tcprelay relay</h1>
<p class="muted">Version {{.Version}}, up {{age .Time .Started}} (since {{when .Started}}). This page shows the relay at {{when .Time}} and reloads every 5 seconds.</p>

<h2>Relay</h2>
<table>
<tr><th>agents admitted</th><td>{{.Mode}}</td></tr>
<tr><th>control address</th><td>{{range $i, $a := .Control}}{{if $i}}, {{end}}<code>{{$a}}</code>{{else}}<span class="muted">not listening</span>{{end}} {{if .TLS}}<span class="ok">TLS</span>{{else}}<span class="warn">plain TCP</span>{{end}}</td></tr>
<tr><th>public ports</th><td>{{.Ports}}</td></tr>
<tr><th>outside clients</th><td>{{.Clients}} ({{.Relayed}} relayed, {{.Waiting}} waiting)</td></tr>
<tr><th>bytes relayed</th><td>to agents <data value="{{.Bytes.ToAgents}}">{{bytes .Bytes.ToAgents}}</data>, from agents <data value="{{.Bytes.FromAgents}}">{{bytes .Bytes.FromAgents}}</data></td></tr>
</table>

<h2>Agents ({{.NAgents}})</h2>
{{if .Agents}}<table>
<tr><th>agent</th><th>remote address</th><th>software</th><th>connected since</th><th>ports</th><th class="num">parked data connections</th></tr>
{{range .Agents}}<tr><td>{{.Name}}</td><td><code>{{.Remote}}</code></td><td>{{peer .Software}}</td><td>{{when .Since}} <span class="muted">({{age $.Time .Since}} ago)</span></td><td class="ports">{{range $i, $p := .Ports}}{{if $i}}, {{end}}<a href="#{{if $p.Host}}name-{{$p.Host}}{{else}}port-{{$p.Port}}{{end}}">{{$p.Label}}</a>{{with $p.Pool}} <span class="muted">pool {{peer .}}</span>{{end}}{{else}}<span class="muted">none</span>{{end}}</td><td class="num">{{.Parked}}</td></tr>
{{end}}</table>
{{with .MoreAgents}}<p class="more">and {{plural . "more agent"}}</p>{{end}}
{{else}}<p class="muted">No agent is connected.</p>{{end}}

<h2>Endpoints ({{.NOpen}})</h2>
{{range .Open}}<section class="endpoint" id="{{if .Host}}name-{{.Host}}{{else}}port-{{.Port}}{{end}}">
<h3>{{if .Host}}Name {{.Host}} <span class="muted">on port {{.Port}}</span>{{else}}Port {{.Port}}{{end}}{{with .Pool}} <span class="muted">pool {{peer .}}</span>{{end}}: clients {{.Conns}}, waiting {{.Pending}}; to agents <data value="{{.Bytes.ToAgents}}">{{bytes .Bytes.ToAgents}}</data>, from agents <data value="{{.Bytes.FromAgents}}">{{bytes .Bytes.FromAgents}}</data></h3>
{{with .Charts}}<div class="charts">{{.}}</div>
{{end}}<table>
<tr><th>member: agent</th><th>remote address</th><th class="num">tunnel</th><th>state</th><th class="num">clients</th></tr>
{{range .Members}}<tr><td>{{.Agent}}</td><td><code>{{.Remote}}</code></td><td class="num">{{.Tunnel}}</td><td>{{if .Ready}}<span class="ok">ready</span>{{else}}<span class="warn">not ready</span>{{end}}</td><td class="num">{{.Clients}}</td></tr>
{{end}}</table>
{{if .Clients}}<table class="clients">
<tr><th>client</th><th>served by</th><th>relayed since</th><th class="num">bytes to agent</th><th class="num">bytes from agent</th></tr>
{{range .Clients}}<tr><td><code>{{.Remote}}</code></td><td>{{.Agent}} tunnel {{.Tunnel}}</td><td>{{when .Since}} <span class="muted">({{age $.Time .Since}})</span></td><td class="num"><data value="{{.Bytes.ToAgents}}">{{bytes .Bytes.ToAgents}}</data></td><td class="num"><data value="{{.Bytes.FromAgents}}">{{bytes .Bytes.FromAgents}}</data></td></tr>
{{end}}</table>
{{with .MoreClients}}<p class="more">and {{plural . "more client"}}</p>{{end}}
{{else}}<p class="muted">No client is relayed.</p>{{end}}
{{if .Waiting}}<table class="waiting">
<tr><th>waiting client</th><th>for</th><th>waiting since</th></tr>
{{range .Waiting}}<tr><td><code>{{.Remote}}</code></td><td>{{.Agent}} tunnel {{.Tunnel}}</td><td>{{when .Since}} <span class="muted">({{age $.Time .Since}})</span></td></tr>
{{end}}</table>
{{with .MoreWaiting}}<p class="more">and {{.}} more waiting</p>{{end}}
{{end}}</section>
{{else}}<p class="muted">No endpoint is open.</p>
{{end}}{{with .MoreOpen}}<p class="more">and {{plural . "more endpoint"}}</p>{{end}}

<h2>Reserved ports ({{.NReserved}})</h2>
{{if .Reserved}}<table>
<tr><th class="num">port</th><th>pool</th><th>reserved until</th><th class="num">clients still relayed</th></tr>
{{range .Reserved}}<tr><td class="num">{{with .Host}}{{.}}{{else}}{{.Port}}{{end}}</td><td>{{peer .Pool}}</td><td>{{when .Until}} <span class="muted">(another {{left $.Time .Until}})</span></td><td class="num">{{.Conns}}</td></tr>
{{end}}</table>
{{with .MoreReserved}}<p class="more">and {{plural . "more reserved port"}}</p>{{end}}
{{else}}<p class="muted">No port is reserved.</p>{{end}}

<h2>Limits and timeouts</h2>
<table>
{{range .Limits}}<tr><th>{{.Name}}</th><td>{{.Value}}</td></tr>
{{end}}</table>
</body>
</html>
`

// EndpointReady reports whether the endpoint that key names (a public
// port, or a name on the shared port) takes new clients: it is open, not draining, and has a ready member. It also returns how many of
// its members are ready, of how many. An endpoint that is reserved, or no
// endpoint, is not ready. A load balancer's HTTP check asks this (GET
// /ready/PORT on the relay's metrics address): the port itself still
// accepts a client while no member is ready, and closes it, which a TCP
// check takes for up.
func (s *Server) EndpointReady(key string) (ok bool, ready, members int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	ep := s.endpointLocked(key)
	if ep == nil || ep.ln == nil || ep.closed {
		return false, 0, 0
	}
	for _, m := range ep.members {
		if m.ready && !m.cut {
			ready++
		}
	}
	return ready > 0 && !ep.draining, ready, len(ep.members)
}

// what names e in the text view: "port 40000", or "name db.example.com".
func (e *endpointStatus) what() string {
	if e.Host != "" {
		return "name " + e.Host
	}
	return "port " + strconv.Itoa(e.Port)
}
