package server

import (
	"bytes"
	"io"
	"math"
	"os"
	"runtime"
	rtmetrics "runtime/metrics"
	"runtime/pprof"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"tcprelay/internal/copier"
	"time"
)

// The metrics are written by hand in the Prometheus text exposition format
// (version 0.0.4): a hundred lines here, and a test that checks the format
// (TestMetricsFormat), instead of the client library and the ten modules
// it brings. The process_ and go_ families use the names of the Prometheus
// client's process and Go collectors, so the usual dashboards work.

// counters are the relay's running totals, exported by WriteMetrics. The
// byte totals are not here: they are read with the live links, under s.mu
// (see linkDone).
type counters struct {
	agents         atomic.Int64 // agent sessions established
	handshakeFails atomic.Int64 // agent handshakes that failed, wrong secret included
	authFails      atomic.Int64 // agents refused for their secret
	authThrottled  atomic.Int64 // connections and Auths refused unchecked by the failed-authentication throttle
	tlsHandshakes  atomic.Int64 // TLS handshakes completed on the control port
	tlsResumed     atomic.Int64 // of those, the resumed sessions
	tlsClassical   atomic.Int64 // and the full ones without a post-quantum key exchange
	dropped        atomic.Int64 // connections dropped on the control port
	clients        atomic.Int64 // outside clients accepted on public ports
	refused        atomic.Int64 // outside clients closed at a limit
	denied         atomic.Int64 // outside clients closed by a tunnel's access lists
	pickupTimeouts atomic.Int64 // outside clients closed because no data connection came
	poolHits       atomic.Int64 // clients joined to a parked data connection
	reused         atomic.Int64 // data connections parked again after a client (feature reuse)
	poolMisses     atomic.Int64 // clients announced with Incoming
	relayed        atomic.Int64 // relayed connections that ended
	relayErrors    atomic.Int64 // relayed connections that ended on an error (a reset)

	stallTimeouts atomic.Int64 // relayed connections closed at the stall timeout
	idleTimeouts  atomic.Int64 // relayed connections closed at the idle timeout
	stalledShed   atomic.Int64 // stalled connections closed to keep their memory under the limit
	reclaimed     atomic.Int64 // relayed connections closed to make room for another tunnel's client

	namesUnknown  atomic.Int64 // connections to the shared port for a name no tunnel has
	namesRejected atomic.Int64 // connections to the shared port closed before their ClientHello was read
}

// maxEndpointSeries bounds the endpoints with series of their own (labelled
// by port), so that a relay with thousands of ports cannot blow up a
// scrape.
const maxEndpointSeries = 100

// WriteMetrics writes the relay's gauges and counters, and the process's,
// in the Prometheus text exposition format. Byte counts are live: they
// include the connections still open.
func (s *Server) WriteMetrics(w io.Writer) error {
	snap := s.takeStatus(false)
	st := snap.Stats
	c := &s.count
	var e expo
	for _, m := range []struct {
		name, kind, help string
		value            int64
	}{
		{"tcprelay_agents", "gauge", "Agents connected now.", int64(st.Agents)},
		{"tcprelay_tunnels", "gauge", "Public ports open now.", int64(st.Tunnels)},
		{"tcprelay_clients_waiting", "gauge", "Outside clients waiting for their agent.", int64(st.Waiting)},
		{"tcprelay_connections_relayed", "gauge", "Connections being relayed now.", int64(st.Relayed)},
		{"tcprelay_pool_parked", "gauge", "Pre-opened data connections waiting for a client.", int64(st.Parked)},
		{"tcprelay_ports_reserved", "gauge", "Public ports reserved for an owner that left.", int64(st.Reserved)},
		{"tcprelay_members", "gauge", "Agent registrations serving the endpoints.", int64(st.Members)},
		{"tcprelay_members_ready", "gauge", "Members that can take clients.", int64(st.Ready)},
		{"tcprelay_budget_fds", "gauge", "File descriptors the relay shares out.", int64(s.budget.fds)},
		{"tcprelay_budget_handshakes", "gauge", "Connections in handshake the budget allows.", int64(s.budget.handshakes)},
		{"tcprelay_budget_agents", "gauge", "Control connections, pre-opened data connections and public listeners the budget allows.", int64(s.budget.agents)},
		{"tcprelay_identities", "gauge", "Agent identities the relay holds: those of the agents file, and keys seen without one that still have a session or a port.", int64(st.Identities)},
		{"tcprelay_budget_clients", "gauge", "Outside clients the budget allows.", int64(s.budget.clients)},
		{"tcprelay_budget_splice_pipes", "gauge", "Splice pipes (two file descriptors each) the budget allows alive at once; past it, bursts go through a buffer.", int64(s.budget.pipes)},
		{"tcprelay_splice_pipes", "gauge", "Splice pipes alive now, moving bytes or kept for reuse.", int64(copier.PipesAlive())},
		{"tcprelay_handshakes", "gauge", "Connections in handshake now.", int64(st.Handshaking)},
		{"tcprelay_clients", "gauge", "Outside clients now, waiting or relayed.", int64(st.Clients)},
		{"tcprelay_stalled_memory_bytes", "gauge", "Kernel memory held by relayed connections whose reader has taken nothing for 2s.", s.stalledMemory.Load()},
		{"tcprelay_stalled_memory_limit_bytes", "gauge", "Past it, the stalled connections stalled longest are closed (0: no limit).", s.set.maxStalledMemory},
		{"tcprelay_clients_reclaimed_total", "counter", "Relayed connections of the tunnel with the most clients closed to make room for a client of another, the budget being spent.", c.reclaimed.Load()},
		{"tcprelay_stalled_closed_total", "counter", "Stalled relayed connections closed to keep their memory under the limit.", c.stalledShed.Load()},
		{"tcprelay_stall_timeouts_total", "counter", "Relayed connections closed at the stall timeout.", c.stallTimeouts.Load()},
		{"tcprelay_idle_timeouts_total", "counter", "Relayed connections closed at the idle timeout.", c.idleTimeouts.Load()},
		{"tcprelay_agent_sessions_total", "counter", "Agent sessions established.", c.agents.Load()},
		{"tcprelay_handshake_failures_total", "counter", "Agent handshakes that failed, wrong secrets included.", c.handshakeFails.Load()},
		{"tcprelay_auth_failures_total", "counter", "Agents refused for a wrong or missing secret.", c.authFails.Load()},
		{"tcprelay_auth_throttled_total", "counter", "Connections and authentications refused unchecked, their address having spent its failed-authentication budget.", c.authThrottled.Load()},
		{"tcprelay_access_log_dropped_total", "counter", "Access log lines dropped because its writer fell too far behind.", s.access.droppedRecords()},
		{"tcprelay_tls_handshakes_total", "counter", "TLS handshakes completed on the control port.", c.tlsHandshakes.Load()},
		{"tcprelay_tls_resumed_total", "counter", "TLS handshakes on the control port that resumed a session (cheaper than a full one).", c.tlsResumed.Load()},
		{"tcprelay_tls_classical_total", "counter", "Full TLS handshakes on the control port without a post-quantum key exchange (an agent without ML-KEM): a future quantum computer could read what they protect, and the sessions resumed from them.", c.tlsClassical.Load()},
		{"tcprelay_control_dropped_total", "counter", "Connections dropped on the control port (garbage, bad tokens, bad pool keys).", c.dropped.Load()},
		{"tcprelay_sni_unknown_total", "counter", "Connections to the shared TLS port closed for a name no tunnel has.", c.namesUnknown.Load()},
		{"tcprelay_sni_rejected_total", "counter", "Connections to the shared TLS port closed without a ClientHello: not TLS, malformed, too slow, or over the handshake budget.", c.namesRejected.Load()},
		{"tcprelay_clients_total", "counter", "Outside clients accepted on public ports.", c.clients.Load()},
		{"tcprelay_clients_refused_total", "counter", "Outside clients closed at a tunnel limit.", c.refused.Load()},
		{"tcprelay_clients_denied_total", "counter", "Outside clients closed by a tunnel's access lists (allow=, deny=).", c.denied.Load()},
		{"tcprelay_pickup_timeouts_total", "counter", "Outside clients closed because no data connection came in time.", c.pickupTimeouts.Load()},
		{"tcprelay_pool_hits_total", "counter", "Outside clients joined to a pre-opened data connection.", c.poolHits.Load()},
		{"tcprelay_pool_reused_total", "counter", "Pre-opened data connections parked again after serving a client.", c.reused.Load()},
		{"tcprelay_pool_misses_total", "counter", "Outside clients announced to their agent instead.", c.poolMisses.Load()},
		{"tcprelay_connections_total", "counter", "Relayed connections that ended.", c.relayed.Load()},
		{"tcprelay_connection_errors_total", "counter", "Relayed connections that ended on an error, such as a reset.", c.relayErrors.Load()},
		{"tcprelay_bytes_to_agents_total", "counter", "Bytes from outside clients to agents, those of connections still open included.", snap.Bytes.ToAgents},
		{"tcprelay_bytes_from_agents_total", "counter", "Bytes from agents to outside clients, those of connections still open included.", snap.Bytes.FromAgents},
	} {
		e.family(m.name, m.kind, m.help)
		e.sample(m.name, nil, float64(m.value))
	}
	e.family("tcprelay_build_info", "gauge", "Always 1; the relay's version is in its label.")
	e.sample("tcprelay_build_info", []string{"version", snap.Version}, 1)
	e.family("tcprelay_start_time_seconds", "gauge", "When the relay started, in seconds since the Unix epoch.")
	e.sample("tcprelay_start_time_seconds", nil, unixSeconds(s.started))
	writeEndpointMetrics(&e, snap)
	writeProcessMetrics(&e)
	_, err := w.Write(e.b.Bytes())
	return err
}

// writeEndpointMetrics writes series labelled by port for the
// maxEndpointSeries endpoints with the most clients now (ties: the most
// bytes relayed, then the lower port).
func writeEndpointMetrics(e *expo, snap *status) {
	eps := append(snap.Open, snap.Reserved...)
	sort.Slice(eps, func(i, j int) bool {
		a, b := eps[i], eps[j]
		if a.Conns != b.Conns {
			return a.Conns > b.Conns
		}
		if ab, bb := a.Bytes.ToAgents+a.Bytes.FromAgents, b.Bytes.ToAgents+b.Bytes.FromAgents; ab != bb {
			return ab > bb
		}
		return a.Port < b.Port
	})
	left := max(len(eps)-maxEndpointSeries, 0)
	eps = eps[:len(eps)-left]
	const which = " Only for the 100 endpoints with the most clients now (ties: the most bytes, then the lower port); see tcprelay_endpoints_unlabelled."
	e.family("tcprelay_endpoints_unlabelled", "gauge", "Endpoints (open or reserved) left out of the per-port series, which show at most 100.")
	e.sample("tcprelay_endpoints_unlabelled", nil, float64(left))
	for _, f := range []struct {
		name, help string
		value      func(*endpointStatus) int
	}{
		{"tcprelay_endpoint_clients", "Outside clients of the endpoint on this port, waiting or relayed.", func(ep *endpointStatus) int { return ep.Conns }},
		{"tcprelay_endpoint_clients_waiting", "Outside clients of the endpoint on this port waiting for their agent.", func(ep *endpointStatus) int { return ep.Pending }},
		{"tcprelay_endpoint_members", "Agent registrations serving the endpoint on this port (0: reserved for its owner).", func(ep *endpointStatus) int { return len(ep.Members) }},
	} {
		e.family(f.name, "gauge", f.help+which)
		for _, ep := range eps {
			e.sample(f.name, ep.labels(), float64(f.value(ep)))
		}
	}
	const deniedName = "tcprelay_endpoint_clients_denied_total"
	e.family(deniedName, "counter", "Outside clients of the endpoint on this port closed by its access lists, since it opened."+which)
	for _, ep := range eps {
		e.sample(deniedName, ep.labels(), float64(ep.Denied))
	}
	const bytesName = "tcprelay_endpoint_bytes_total"
	e.family(bytesName, "counter", "Bytes relayed through the endpoint on this port since it opened, by direction (to_agents, from_agents), connections still open included."+which)
	for _, ep := range eps {
		e.sample(bytesName, append(ep.labels(), "direction", "to_agents"), float64(ep.Bytes.ToAgents))
		e.sample(bytesName, append(ep.labels(), "direction", "from_agents"), float64(ep.Bytes.FromAgents))
	}
}

// labels are the labels of ep's series: its port, and its name if it has
// one (on the shared port).
func (ep *endpointStatus) labels() []string {
	if ep.Host != "" {
		return []string{"port", strconv.Itoa(ep.Port), "host", ep.Host}
	}
	return []string{"port", strconv.Itoa(ep.Port)}
}

// processStart stands for the process's start time where the system does
// not say (outside Linux): the package's initialisation.
var processStart = time.Now()

// writeProcessMetrics writes what the Prometheus client's process and Go
// collectors would, under their names; a figure the system does not give
// (outside Linux, most) is left out.
func writeProcessMetrics(e *expo) {
	if v, ok := cpuSeconds(); ok {
		e.family("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.")
		e.sample("process_cpu_seconds_total", nil, v)
	}
	if ents, err := os.ReadDir("/proc/self/fd"); err == nil {
		e.family("process_open_fds", "gauge", "Number of open file descriptors.")
		e.sample("process_open_fds", nil, float64(len(ents)))
	}
	if n, ok := maxFDs(); ok {
		e.family("process_max_fds", "gauge", "Maximum number of open file descriptors.")
		e.sample("process_max_fds", nil, n)
	}
	if vsize, rss, ok := procStatm(); ok {
		e.family("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.")
		e.sample("process_virtual_memory_bytes", nil, vsize)
		e.family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.")
		e.sample("process_resident_memory_bytes", nil, rss)
	}
	start, ok := procStartTime()
	if !ok {
		start = unixSeconds(processStart)
	}
	e.family("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.")
	e.sample("process_start_time_seconds", nil, start)

	e.family("go_goroutines", "gauge", "Number of goroutines that currently exist.")
	e.sample("go_goroutines", nil, float64(runtime.NumGoroutine()))
	e.family("go_threads", "gauge", "Number of OS threads created.")
	e.sample("go_threads", nil, float64(pprof.Lookup("threadcreate").Count()))
	e.family("go_info", "gauge", "Information about the Go environment.")
	e.sample("go_info", []string{"version", runtime.Version()}, 1)
	// runtime/metrics, unlike runtime.ReadMemStats, does not stop the world.
	rm := []rtmetrics.Sample{
		{Name: "/memory/classes/heap/objects:bytes"},
		{Name: "/memory/classes/total:bytes"},
		{Name: "/gc/cycles/total:gc-cycles"},
	}
	rtmetrics.Read(rm)
	for i, m := range []struct{ name, kind, help string }{
		{"go_memstats_heap_alloc_bytes", "gauge", "Number of heap bytes allocated and currently in use."},
		{"go_memstats_sys_bytes", "gauge", "Number of bytes obtained from system."},
		{"go_gc_cycles_total", "counter", "Completed GC cycles."},
	} {
		if rm[i].Value.Kind() == rtmetrics.KindUint64 {
			e.family(m.name, m.kind, m.help)
			e.sample(m.name, nil, float64(rm[i].Value.Uint64()))
		}
	}
}

// procStatm reads the process's virtual and resident memory from
// /proc/self/statm (Linux).
func procStatm() (vsize, rss float64, ok bool) {
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		return 0, 0, false
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return 0, 0, false
	}
	pages, err1 := strconv.ParseUint(f[0], 10, 64)
	resident, err2 := strconv.ParseUint(f[1], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, 0, false
	}
	page := float64(os.Getpagesize())
	return float64(pages) * page, float64(resident) * page, true
}

// procStartTime reads when the process started (Linux): its start in
// clock ticks after boot (/proc/self/stat), plus the boot time
// (/proc/stat). The ticks are USER_HZ, 100 on every Linux the Prometheus
// client knows of, which assumes the same.
func procStartTime() (float64, bool) {
	stat, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return 0, false
	}
	// The command name, in parentheses, may hold spaces: fields count
	// from its end. starttime is field 22; after ")" come fields 3 on.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(string(stat[i+1:]))
	if len(f) < 20 {
		return 0, false
	}
	ticks, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return 0, false
	}
	all, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, false
	}
	for line := range strings.Lines(string(all)) {
		if v, ok := strings.CutPrefix(line, "btime "); ok {
			boot, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
			if err != nil {
				return 0, false
			}
			const userHZ = 100
			return float64(boot) + float64(ticks)/userHZ, true
		}
	}
	return 0, false
}

func unixSeconds(t time.Time) float64 { return float64(t.UnixNano()) / 1e9 }

// expo writes the text exposition format. Each family is written whole:
// its HELP and TYPE, then its samples.
type expo struct{ b bytes.Buffer }

var helpEscaper = strings.NewReplacer(`\`, `\\`, "\n", `\n`)

func (e *expo) family(name, kind, help string) {
	e.b.WriteString("# HELP " + name + " " + helpEscaper.Replace(help) + "\n# TYPE " + name + " " + kind + "\n")
}

var labelEscaper = strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)

// sample writes one sample; labels are name, value pairs.
func (e *expo) sample(name string, labels []string, v float64) {
	e.b.WriteString(name)
	for i := 0; i+1 < len(labels); i += 2 {
		if i == 0 {
			e.b.WriteByte('{')
		} else {
			e.b.WriteByte(',')
		}
		e.b.WriteString(labels[i] + `="` + labelEscaper.Replace(labels[i+1]) + `"`)
	}
	if len(labels) > 0 {
		e.b.WriteByte('}')
	}
	e.b.WriteByte(' ')
	// Whole numbers as integers (a byte count reads 10000, not 1e+04).
	if v == math.Trunc(v) && math.Abs(v) < 1<<53 {
		e.b.WriteString(strconv.FormatInt(int64(v), 10))
	} else {
		e.b.WriteString(strconv.FormatFloat(v, 'g', -1, 64))
	}
	e.b.WriteByte('\n')
}
