package server

import (
	"fmt"
	"io"
	"sort"
	"sync/atomic"
	"time"
)

// counters are the relay's running totals, exported by WriteMetrics.
type counters struct {
	agents          atomic.Int64 // agent sessions established
	handshakeFails  atomic.Int64 // agent handshakes that failed, wrong secret included
	authFails       atomic.Int64 // agents refused for their secret
	dropped         atomic.Int64 // connections dropped on the control port
	clients         atomic.Int64 // outside clients accepted on public ports
	refused         atomic.Int64 // outside clients closed at a limit
	pickupTimeouts  atomic.Int64 // outside clients closed because no data connection came
	poolHits        atomic.Int64 // clients joined to a parked data connection
	poolMisses      atomic.Int64 // clients announced with Incoming
	relayed         atomic.Int64 // relayed connections that ended
	relayErrors     atomic.Int64 // relayed connections that ended on an error (a reset)
	bytesToAgents   atomic.Int64 // bytes from outside clients to agents, counted when a connection ends
	bytesFromAgents atomic.Int64 // bytes from agents to outside clients, counted when a connection ends
	stallTimeouts   atomic.Int64 // relayed connections closed at the stall timeout
	idleTimeouts    atomic.Int64 // relayed connections closed at the idle timeout
	stalledShed     atomic.Int64 // stalled connections closed to keep their memory under the limit
}

// WriteMetrics writes the relay's gauges and counters in the Prometheus text
// exposition format. Byte counts grow when a relayed connection ends.
func (s *Server) WriteMetrics(w io.Writer) error {
	st := s.Stats()
	c := &s.count
	metrics := []struct {
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
		{"tcprelay_budget_agents", "gauge", "Control and pre-opened data connections the budget allows.", int64(s.budget.agents)},
		{"tcprelay_budget_clients", "gauge", "Outside clients the budget allows.", int64(s.budget.clients)},
		{"tcprelay_handshakes", "gauge", "Connections in handshake now.", int64(st.Handshaking)},
		{"tcprelay_clients", "gauge", "Outside clients now, waiting or relayed.", int64(st.Clients)},
		{"tcprelay_stalled_memory_bytes", "gauge", "Kernel memory held by relayed connections whose reader has taken nothing for 2s.", s.stalledMemory.Load()},
		{"tcprelay_stalled_memory_limit_bytes", "gauge", "Past it, the stalled connections stalled longest are closed (0: no limit).", s.set.maxStalledMemory},
		{"tcprelay_stalled_closed_total", "counter", "Stalled relayed connections closed to keep their memory under the limit.", c.stalledShed.Load()},
		{"tcprelay_stall_timeouts_total", "counter", "Relayed connections closed at the stall timeout.", c.stallTimeouts.Load()},
		{"tcprelay_idle_timeouts_total", "counter", "Relayed connections closed at the idle timeout.", c.idleTimeouts.Load()},
		{"tcprelay_agent_sessions_total", "counter", "Agent sessions established.", c.agents.Load()},
		{"tcprelay_handshake_failures_total", "counter", "Agent handshakes that failed, wrong secrets included.", c.handshakeFails.Load()},
		{"tcprelay_auth_failures_total", "counter", "Agents refused for a wrong or missing secret.", c.authFails.Load()},
		{"tcprelay_control_dropped_total", "counter", "Connections dropped on the control port (garbage, bad tokens, bad pool keys).", c.dropped.Load()},
		{"tcprelay_clients_total", "counter", "Outside clients accepted on public ports.", c.clients.Load()},
		{"tcprelay_clients_refused_total", "counter", "Outside clients closed at a tunnel limit.", c.refused.Load()},
		{"tcprelay_pickup_timeouts_total", "counter", "Outside clients closed because no data connection came in time.", c.pickupTimeouts.Load()},
		{"tcprelay_pool_hits_total", "counter", "Outside clients joined to a pre-opened data connection.", c.poolHits.Load()},
		{"tcprelay_pool_misses_total", "counter", "Outside clients announced to their agent instead.", c.poolMisses.Load()},
		{"tcprelay_connections_total", "counter", "Relayed connections that ended.", c.relayed.Load()},
		{"tcprelay_connection_errors_total", "counter", "Relayed connections that ended on an error, such as a reset.", c.relayErrors.Load()},
		{"tcprelay_bytes_to_agents_total", "counter", "Bytes from outside clients to agents, counted when each connection ends.", c.bytesToAgents.Load()},
		{"tcprelay_bytes_from_agents_total", "counter", "Bytes from agents to outside clients, counted when each connection ends.", c.bytesFromAgents.Load()},
	}
	for _, m := range metrics {
		if _, err := fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n%s %d\n", m.name, m.help, m.name, m.kind, m.name, m.value); err != nil {
			return err
		}
	}
	return nil
}

// WriteStatus writes a plain-text view of the agents, and of the endpoints
// with their members.
func (s *Server) WriteStatus(w io.Writer) error {
	type agentLine struct {
		name, remote, software string
		since                  time.Time
		parked                 int
	}
	type memberLine struct {
		name    string
		id      uint32
		clients int // waiting for this member or relayed through it
	}
	type endpointLine struct {
		port, conns, waiting int
		until                time.Time // reserved until; zero: open
		members              []memberLine
	}
	s.mu.Lock()
	agents := make([]agentLine, 0, len(s.sessions))
	for ss := range s.sessions {
		agents = append(agents, agentLine{ss.name(), ss.remote, ss.software, ss.since, len(ss.pool)})
	}
	eps := make([]endpointLine, 0, len(s.endpoints))
	for _, ep := range s.endpoints {
		e := endpointLine{port: ep.port, conns: ep.conns, waiting: ep.pending, until: ep.until}
		for _, m := range ep.members {
			e.members = append(e.members, memberLine{m.sess.name(), m.id, m.clients})
		}
		eps = append(eps, e)
	}
	s.mu.Unlock()
	sort.Slice(agents, func(i, j int) bool { return agents[i].since.Before(agents[j].since) })
	sort.Slice(eps, func(i, j int) bool { return eps[i].port < eps[j].port })

	now := time.Now()
	if _, err := fmt.Fprintf(w, "%d agents, %d endpoints\n", len(agents), len(eps)); err != nil {
		return err
	}
	for _, a := range agents {
		fmt.Fprintf(w, "agent %s from %s (%s), connected %s ago, %d parked data connections\n",
			a.name, a.remote, a.software, now.Sub(a.since).Round(time.Second), a.parked)
	}
	for _, e := range eps {
		if !e.until.IsZero() {
			fmt.Fprintf(w, "endpoint on port %d: reserved for its owner for another %s\n", e.port, e.until.Sub(now).Round(time.Second))
			continue
		}
		fmt.Fprintf(w, "endpoint on port %d: %d connections, %d waiting\n", e.port, e.conns, e.waiting)
		for _, m := range e.members {
			fmt.Fprintf(w, "  member: agent %s tunnel %d, %d clients\n", m.name, m.id, m.clients)
		}
	}
	return nil
}
