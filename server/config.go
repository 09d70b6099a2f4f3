package server

import (
	"io"
	"log/slog"
	"math"
	"net/netip"
	"time"

	"tcprelay/internal/proto"
)

// Config configures a Server. The zero value is a working open relay that
// lets the operating system choose public ports: in every field, zero means
// the default that DefaultConfig shows, and the relay's flags are built
// from DefaultConfig, so a zero means the same on its command line.
type Config struct {
	// Secret is the shared secret agents must prove they know. If empty, any
	// agent is accepted (an open relay), and New logs a warning.
	Secret string

	// Agents, if not nil, lists the agents admitted by key, each with its
	// scope (see ParseAgents): an agent whose key is not listed is refused.
	// With Secret set too, agents without a key may also register with the
	// secret, as one shared tenant. If nil, any agent with the secret (or
	// any agent, without one) is admitted, and one that shows a key gets
	// the default scope for it.
	Agents []Agent

	// PortGrace is how long a public port stays reserved for its owner
	// (its key, or the token its registration was given) after its last
	// session ended without releasing it. If zero, the default (60s); if
	// negative, ports are released at once.
	PortGrace time.Duration

	// StateFile, if set, is where the relay keeps its port reservations, so
	// that they survive a restart, kill -9 included. If empty, they are
	// kept in memory only.
	StateFile string

	// PublicHost is the host announced to agents as their public address.
	// If empty, each agent announces the host it dialed.
	PublicHost string

	// NamesDomain, if set, is the domain under which agents may ask for a
	// name on the shared TLS port (see ServeNames): "db" is then
	// db.NamesDomain. The name NamesDomain itself is the relay's own.
	NamesDomain string

	// NamesPort is the shared port's number that agents are told (a load
	// balancer in front may listen on another than the relay). If zero,
	// that of the listener ServeNames serves, once it does.
	NamesPort int

	// PortMin and PortMax bound the public ports handed out (inclusive).
	// If both are zero, the operating system picks a free ephemeral port for
	// each tunnel and any requested port is tried as is.
	PortMin, PortMax int

	// HandshakeTimeout bounds the time from accepting a connection on the
	// control port to the end of its handshake. If zero or negative, the
	// default (10s).
	HandshakeTimeout time.Duration

	// PickupTimeout is how long an outside client waits for its agent to
	// open the data connection before it is closed. If zero or negative,
	// the default (10s).
	PickupTimeout time.Duration

	// Heartbeat is how often the relay pings each agent. An agent silent for
	// three heartbeats is dropped and its ports freed. If zero, the default
	// (10s); if negative, no pings are sent and silent agents are kept.
	Heartbeat time.Duration

	// WriteTimeout bounds each write on a control connection, so one stuck
	// agent cannot hold up the relay. If zero or negative, the default
	// (10s).
	WriteTimeout time.Duration

	// MaxTunnelsPerAgent bounds the public ports one agent (control
	// connection) may hold. If zero, the default (16); if negative,
	// unlimited.
	MaxTunnelsPerAgent int

	// MaxFDs is the number of file descriptors the relay may hold, which
	// it shares out as its budget: connections in handshake, agents, and
	// outside clients, these by max-min fairness between the tunnels. If
	// zero, the process's limit (RLIMIT_NOFILE) when New runs.
	MaxFDs int

	// MaxConnsPerTunnel bounds the outside clients of one tunnel, waiting or
	// relayed; a client past it is closed at once. If zero or negative, no
	// fixed bound: a tunnel may have every client the relay's budget
	// allows, and once it is spent, tunnels with fewer clients take places
	// from the one with the most, until they hold as many (see Server's
	// budget).
	MaxConnsPerTunnel int

	// MaxClientsPerSource bounds the outside clients one source address
	// may have on one tunnel, waiting or relayed. If zero or negative, no
	// bound.
	MaxClientsPerSource int

	// MaxPendingPerTunnel bounds the outside clients of one tunnel waiting
	// for their agent's data connection. If zero, the default (128); if
	// negative, unlimited.
	MaxPendingPerTunnel int

	// MaxPoolPerAgent bounds the idle data connections an agent may open in
	// advance, so a new client is joined without a round trip to the agent.
	// If zero, the default (32); if negative, agents are not offered a pool.
	MaxPoolPerAgent int

	// LinkBuffer is the receive buffer of each relayed socket (client and
	// data connection). It bounds what a connection whose reader stopped
	// holds in the relay's kernel memory, and sets the window of each hop.
	// The kernel reserves twice the figure, for payload and its overhead;
	// the default, 1.75 MiB, opens a window of some 2.4 MiB on an Ethernet
	// path (1 Gbit/s at 20 ms of round trip), and a client stalled in both
	// directions holds at most about 7.5 MiB. If zero, the default; if
	// negative, the kernel's autotuning (no bound: up to tcp_rmem's maximum
	// per socket).
	LinkBuffer int

	// MaxStalledMemory bounds the kernel memory held by the relayed
	// connections whose reader has taken nothing for 2 s: past it, the
	// relay closes those stalled longest. If zero, half the kernel's TCP
	// pressure level (tcp_mem), so the kernel never reaches the point where
	// it drops other connections' data; if negative, no bound.
	MaxStalledMemory int64

	// StallTimeout, if positive, closes a relayed connection whose reader
	// has taken nothing for that long while bytes wait for it. If zero or
	// negative, none.
	StallTimeout time.Duration

	// IdleTimeout, if positive, closes a relayed connection on which no
	// byte has moved, either way, for that long. If zero or negative, none.
	IdleTimeout time.Duration

	// MaxFrameSize bounds the payload of control frames after the handshake.
	// If zero or negative, the default (proto.DefaultMaxPayload).
	MaxFrameSize int

	// Logger receives the relay's logs. If nil, slog.Default().
	Logger *slog.Logger

	// ProxyProtocolFrom lists the peers (load balancers such as haproxy)
	// whose connections to the public ports start with a PROXY protocol
	// header, v1 or v2: the relay reads it and takes the client it names
	// as the connection's source, for access lists, per-source limits, the
	// access log and the agent. A connection from such a peer without a
	// valid header is closed; anyone else's header is just data. If empty,
	// none.
	ProxyProtocolFrom []netip.Prefix

	// AccessLog, if set, receives one JSON line per outside connection
	// and per agent session when it ends (see ConnRecord and
	// SessionRecord). The lines are written from a goroutine of the
	// relay's: a writer that falls 4,096 lines behind loses the newest,
	// counted in tcprelay_access_log_dropped_total. If nil, none.
	AccessLog io.Writer

	// Version names the relay's build in its status views and the
	// tcprelay_build_info metric. If empty, "unknown".
	Version string

	// ControlTLS tells the status views that the listeners given to Serve
	// speak TLS (the caller wraps them with tls.NewListener). The relay
	// does nothing else with it. If false, they are shown as plain TCP.
	ControlTLS bool
}

// DefaultConfig returns the configuration a zero Config stands for: every
// default in one place.
func DefaultConfig() Config {
	return Config{
		HandshakeTimeout:    10 * time.Second,
		PickupTimeout:       10 * time.Second,
		Heartbeat:           10 * time.Second,
		WriteTimeout:        10 * time.Second,
		MaxTunnelsPerAgent:  16,
		MaxPendingPerTunnel: 128,
		MaxPoolPerAgent:     32,
		MaxFrameSize:        proto.DefaultMaxPayload,
		PortGrace:           60 * time.Second,
		LinkBuffer:          1792 << 10,
	}
}

// settings are a Config with every default applied: what the Server runs
// with. Limits are math.MaxInt when unlimited; heartbeat and maxPool are 0
// when off.
type settings struct {
	handshakeTimeout, pickupTimeout, writeTimeout time.Duration
	heartbeat, portGrace                          time.Duration
	maxTunnels, maxConns, maxPending, maxPool     int
	maxPerSource, linkBuffer                      int
	maxStalledMemory                              int64
	stallTimeout, idleTimeout                     time.Duration
	maxFrameSize                                  int
}

func (c *Config) settings() settings {
	def := DefaultConfig()
	st := settings{
		handshakeTimeout: positive(c.HandshakeTimeout, def.HandshakeTimeout),
		pickupTimeout:    positive(c.PickupTimeout, def.PickupTimeout),
		writeTimeout:     positive(c.WriteTimeout, def.WriteTimeout),
		maxTunnels:       limit(c.MaxTunnelsPerAgent, def.MaxTunnelsPerAgent),
		maxConns:         positive(c.MaxConnsPerTunnel, math.MaxInt),
		maxPerSource:     positive(c.MaxClientsPerSource, math.MaxInt),
		maxPending:       limit(c.MaxPendingPerTunnel, def.MaxPendingPerTunnel),
		maxFrameSize:     positive(c.MaxFrameSize, def.MaxFrameSize),
	}
	switch {
	case c.Heartbeat == 0:
		st.heartbeat = def.Heartbeat
	case c.Heartbeat > 0:
		// Sent in whole milliseconds.
		st.heartbeat = max(c.Heartbeat.Truncate(time.Millisecond), time.Millisecond)
	}
	switch {
	case c.PortGrace == 0:
		st.portGrace = def.PortGrace
	case c.PortGrace > 0:
		st.portGrace = c.PortGrace
	}
	if c.LinkBuffer >= 0 {
		st.linkBuffer = positive(c.LinkBuffer, def.LinkBuffer)
	}
	switch {
	case c.MaxStalledMemory > 0:
		st.maxStalledMemory = c.MaxStalledMemory
	case c.MaxStalledMemory == 0:
		st.maxStalledMemory = tcpMemPressure() / 2
		if st.maxStalledMemory <= 0 {
			st.maxStalledMemory = 256 << 20
		}
	}
	st.stallTimeout = max(c.StallTimeout, 0)
	st.idleTimeout = max(c.IdleTimeout, 0)
	if c.MaxPoolPerAgent >= 0 {
		// It travels as a u16.
		st.maxPool = min(limit(c.MaxPoolPerAgent, def.MaxPoolPerAgent), math.MaxUint16)
	}
	return st
}

// positive is v, or def if v is zero or negative.
func positive[T int | time.Duration](v, def T) T {
	if v <= 0 {
		return def
	}
	return v
}

// limit applies the zero-means-default, negative-means-unlimited rule.
func limit(v, def int) int {
	switch {
	case v == 0:
		return def
	case v < 0:
		return math.MaxInt
	}
	return v
}
