// Command relay is the public relay server: ./relay [flags] PORT.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"tcprelay/internal/cli"
	"tcprelay/internal/proto"
	"tcprelay/internal/transport"
	"tcprelay/server"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "ctl" {
		os.Exit(ctl(os.Args[2:]))
	}
	c := cli.New("relay", "PORT",
		"Listens for agents on PORT. Each agent gets a public port (by default PORT+1\n"+
			"upward) and every connection to it is relayed to the agent, byte for byte.\n"+
			"A zero duration or limit means the default shown.\n"+
			"relay ctl COMMAND talks to a running relay's admin API (relay ctl -h).")
	// Every default comes from server.DefaultConfig, so a flag's zero and
	// a Config field's zero mean the same.
	cfg := server.DefaultConfig()
	fs := c.FS
	bind := fs.String("bind", "", "IP address to listen on, for PORT and the public ports (default: all interfaces)")
	fs.StringVar(&cfg.PublicHost, "public-host", "", "host name announced to agents as their public host (default: the host each agent dialed)")
	ports := fs.String("ports", "", "public port range LO-HI (default: PORT+1-65535)")
	fs.DurationVar(&cfg.HandshakeTimeout, "handshake-timeout", cfg.HandshakeTimeout, "time a new connection has to finish its handshake")
	fs.DurationVar(&cfg.PickupTimeout, "pickup-timeout", cfg.PickupTimeout, "time an outside client waits for its agent before it is closed")
	c.DurationOff(&cfg.Heartbeat, "heartbeat", cfg.Heartbeat, "`interval` of pings to agents, a duration or off; an agent silent for 3 intervals is dropped (off: no pings, and silent agents are kept)")
	drain := fs.Duration("drain-timeout", 10*time.Second, "on SIGINT/SIGTERM, how long relayed connections may finish before they are closed")
	fs.IntVar(&cfg.MaxTunnelsPerAgent, "max-tunnels-per-agent", cfg.MaxTunnelsPerAgent, "public ports one agent may hold (-1: unlimited)")
	fs.IntVar(&cfg.MaxFDs, "max-fds", 0, "file descriptors the relay shares out: handshakes, agents, and outside clients by fair shares between tunnels (0: the process's limit, raised to its hard limit at start)")
	fs.IntVar(&cfg.MaxConnsPerTunnel, "max-conns-per-tunnel", 0, "outside clients one tunnel may have, waiting or relayed; more are closed at once (0 or -1: no fixed bound; once the budget is spent, tunnels with fewer clients take places from the one with the most)")
	fs.IntVar(&cfg.MaxClientsPerSource, "max-clients-per-source", 0, "outside clients one source address may have on one tunnel (0: no bound)")
	fs.IntVar(&cfg.MaxPendingPerTunnel, "max-pending-per-tunnel", cfg.MaxPendingPerTunnel, "outside clients one tunnel may have waiting for its agent; more are closed at once (-1: unlimited)")
	fs.IntVar(&cfg.MaxPoolPerAgent, "max-pool-per-agent", cfg.MaxPoolPerAgent, "idle data connections an agent may open in advance, so new clients skip a round trip (-1: none)")
	fs.IntVar(&cfg.MaxFrameSize, "max-frame-size", cfg.MaxFrameSize, "largest control frame payload accepted from an authenticated agent, in bytes")
	linkBuffer := int64(cfg.LinkBuffer)
	c.Size(&linkBuffer, "link-buffer", linkBuffer, "receive `buffer` of each relayed socket: the window of each hop, and what a connection whose reader stopped may hold in the relay's kernel memory (off: the kernel's autotuning, unbounded)")
	c.Size(&cfg.MaxStalledMemory, "max-stalled-memory", 0, "kernel `memory` the stalled relayed connections (a reader that took nothing for 2s) may hold; past it those stalled longest are closed (0: half the kernel's TCP pressure level, tcp_mem; off: no bound)")
	c.DurationOff(&cfg.StallTimeout, "stall-timeout", 0, "close a relayed connection whose reader has taken nothing for this `duration` while bytes wait for it (0 or off: never)")
	c.DurationOff(&cfg.IdleTimeout, "idle-timeout", 0, "close a relayed connection on which nothing has moved, either way, for this `duration` (0 or off: never)")
	proxyFrom := fs.String("proxy-protocol-from", "", "`CIDRs` (comma-separated) of load balancers, such as haproxy with send-proxy or send-proxy-v2, whose connections to the public ports start with a PROXY protocol header (v1 or v2): the client it names is the connection's source for access lists, per-source limits, the access log and the agent; their connections without one are closed (default: none, every header is data)")
	adminAddr := fs.String("admin-addr", "", "serve the admin API (list agents, endpoints and clients; close a client; drain a port; disconnect an agent; reload the agents file) at http://ADDR/v1/, for `relay ctl`; requests need the token of -admin-token-file; bind it to a private address; the same address as -metrics-addr serves both (default: off)")
	adminTokenFile := fs.String("admin-token-file", "", "`file` whose first line is the admin API's bearer token, at least 16 characters (required with -admin-addr)")
	accessLog := fs.String("access-log", "", "append one JSON line per outside connection and per agent session, when it ends, to this `file`; SIGUSR1 reopens it (for logrotate); the fields are in docs/OPERATING.md (default: none)")
	metricsAddr := fs.String("metrics-addr", "", "serve Prometheus metrics at http://ADDR/metrics, a status page at /, a text status view at /status, and a load balancer's check of each public port at /ready/PORT (200 while it has a ready agent, else 503), e.g. 127.0.0.1:9090 (default: off)")
	agentsFile := fs.String("agents", "", "`file` of the agents admitted by key, one per line: NAME KEY [ports=LO-HI,...] [tunnels=N] [sessions=N] [parked=N] [pools=NAME,...|*] [allow=CIDR,...] [deny=CIDR,...], and at most one NAME secret [options] line for the agents that come with -secret and no key; SIGHUP re-reads it and applies it at once (a removed key's sessions and connections end), and keeps the agents in force if it has an error or is empty (as a file caught mid-write is): to remove every agent, leave only a comment in it, e.g. '# none' (default: none; admit by -secret, or any agent)")
	stateDir := fs.String("state-dir", "", "`directory` for the port reservations file, so that they survive a restart; off: keep them in memory (default: $STATE_DIRECTORY, else $XDG_STATE_HOME/tcprelay, else ~/.local/state/tcprelay)")
	c.DurationOff(&cfg.PortGrace, "port-grace", cfg.PortGrace, "how long a public port stays reserved for its owner after its agent left without releasing it, a `duration` or off")
	tlsCert := fs.String("tls-cert", "", "PEM certificate file: serve agents over TLS (with -tls-key)")
	tlsKey := fs.String("tls-key", "", "PEM private key file for -tls-cert")
	sniAddr := fs.String("sni-addr", "", "serve a shared TLS port at `ADDR` (host:port, e.g. :443) that routes each outside client by the server name (SNI) of its TLS ClientHello to the agent that registered that name with -hostname, passing its TLS through untouched; an agent whose ClientHello names the relay itself (-sni-domain, or -public-host) or offers the ALPN protocol tcprelay is served as on PORT, over the relay's own TLS (-tls-cert or -tls-self-signed), so agents and clients can share the one port (needs -sni-domain; default: off)")
	sniDomain := fs.String("sni-domain", "", "the `DOMAIN` of the names on -sni-addr: an agent's -hostname db is db.DOMAIN; point a wildcard DNS record *.DOMAIN at the relay (DOMAIN itself names the relay)")
	tlsSelf := fs.Bool("tls-self-signed", false, "serve agents over TLS with a self-signed certificate, made once and kept in -state-dir; agents pin it with -tls-fingerprint, which the relay logs")
	args, log := c.Parse(os.Args[1:], 1)

	port, err := cli.Port(args[0])
	if err != nil {
		c.Usagef("%v", err)
	}
	cfg.Secret = c.Secret()
	if linkBuffer > 0 && (linkBuffer < 64<<10 || linkBuffer > 1<<30) {
		c.Usagef("-link-buffer %d: want 64KiB to 1GiB, or off", linkBuffer)
	}
	cfg.LinkBuffer = int(linkBuffer)
	cfg.Logger = log
	cfg.PortMin, cfg.PortMax = port+1, 65535
	for name, d := range map[string]time.Duration{"handshake-timeout": cfg.HandshakeTimeout, "pickup-timeout": cfg.PickupTimeout, "drain-timeout": *drain} {
		if d < 0 {
			c.Usagef("-%s %v: want a positive duration, e.g. 10s", name, d)
		}
	}
	if cfg.Heartbeat > 0 && cfg.Heartbeat < 100*time.Millisecond {
		c.Usagef("-heartbeat %v: want off or at least 100ms", cfg.Heartbeat)
	}
	for name, v := range map[string]int{"max-tunnels-per-agent": cfg.MaxTunnelsPerAgent,
		"max-pending-per-tunnel": cfg.MaxPendingPerTunnel, "max-pool-per-agent": cfg.MaxPoolPerAgent} {
		if v < -1 {
			c.Usagef("-%s %d: want a positive number, or -1 for unlimited", name, v)
		}
	}
	if cfg.MaxConnsPerTunnel < -1 {
		c.Usagef("-max-conns-per-tunnel %d: want a positive number, 0 or -1", cfg.MaxConnsPerTunnel)
	}
	for name, v := range map[string]int{"max-fds": cfg.MaxFDs, "max-clients-per-source": cfg.MaxClientsPerSource} {
		if v < 0 {
			c.Usagef("-%s %d: want a positive number, or 0", name, v)
		}
	}
	if cfg.MaxFrameSize != 0 && cfg.MaxFrameSize < 256 {
		c.Usagef("-max-frame-size %d: want at least 256", cfg.MaxFrameSize)
	}
	if *ports != "" {
		if cfg.PortMin, cfg.PortMax, err = cli.PortRange(*ports); err != nil {
			c.Usagef("%v", err)
		}
	} else if port == 65535 {
		c.Usagef("PORT 65535 leaves no default public ports: set -ports")
	}
	if port >= cfg.PortMin && port <= cfg.PortMax {
		c.Usagef("-ports %d-%d contains the control PORT %d", cfg.PortMin, cfg.PortMax, port)
	}
	if *drain == 0 {
		*drain = 10 * time.Second
	}
	switch {
	case (*sniAddr == "") != (*sniDomain == ""):
		c.Usagef("-sni-addr and -sni-domain go together")
	case *sniAddr != "":
		d := strings.TrimSuffix(strings.ToLower(*sniDomain), ".")
		if err := proto.CheckHostname(d); err != nil {
			c.Usagef("-sni-domain: %v", err)
		}
		if _, p, err := net.SplitHostPort(*sniAddr); err != nil {
			c.Usagef("-sni-addr %q: want HOST:PORT or :PORT: %v", *sniAddr, err)
		} else if _, err := cli.Port(p); err != nil && p != "0" {
			c.Usagef("-sni-addr %q: %v", *sniAddr, err)
		}
		cfg.NamesDomain = d
	}
	if *agentsFile != "" {
		if cfg.Agents, err = loadAgents(*agentsFile); err != nil {
			c.Fatal(fmt.Errorf("-agents: %w", err))
		}
		log.Info("agents admitted by key", "file", *agentsFile, "agents", len(cfg.Agents))
	}
	if cfg.StateFile, err = stateFile(*stateDir, *bind, port); err != nil {
		c.Fatal(fmt.Errorf("-state-dir: %w", err))
	}

	var tlsCfg *tls.Config
	if (*tlsCert == "") != (*tlsKey == "") {
		c.Usagef("-tls-cert and -tls-key go together")
	}
	if *tlsSelf && *tlsCert != "" {
		c.Usagef("-tls-self-signed and -tls-cert exclude each other")
	}
	var cert tls.Certificate
	switch {
	case *tlsCert != "":
		if cert, err = tls.LoadX509KeyPair(*tlsCert, *tlsKey); err != nil {
			c.Fatal(fmt.Errorf("load TLS certificate: %w", err))
		}
		log.Info("serving agents over TLS", "cert", *tlsCert, "fingerprint", cli.Fingerprint(cert.Certificate[0]))
	case *tlsSelf:
		path := ""
		if cfg.StateFile != "" {
			path = strings.TrimSuffix(cfg.StateFile, ".json") + "-tls.pem"
			if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
				c.Fatal(fmt.Errorf("-tls-self-signed: %w", err))
			}
		}
		hostname, _ := os.Hostname()
		var created bool
		cert, created, err = selfSigned(path, []string{cfg.PublicHost, hostname, "localhost", "127.0.0.1", "::1", *bind})
		if err != nil {
			c.Fatal(fmt.Errorf("-tls-self-signed: %w", err))
		}
		if path == "" {
			log.Warn("-state-dir off: the self-signed certificate is new at every start, and agents must pin it again")
		}
		log.Info("serving agents over TLS with a self-signed certificate: agents pin it with -tls-fingerprint",
			"fingerprint", cli.Fingerprint(cert.Certificate[0]), "file", path, "created", created)
	}
	if cert.Certificate != nil {
		tlsCfg = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}

	if n, err := raiseFDLimit(); err != nil {
		log.Warn("could not raise the limit on open files", "err", err)
	} else if n > 0 && cfg.MaxFDs == 0 {
		log.Info("file descriptors", "limit", n)
	}

	// Signals are caught before the port opens, so a SIGTERM right after
	// start-up is a graceful shutdown too.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	var adminToken string
	var closers []func() error
	switch {
	case *adminAddr != "" && *adminTokenFile == "":
		c.Usagef("-admin-addr needs -admin-token-file: the API is never open without a token")
	case *adminAddr == "" && *adminTokenFile != "":
		c.Usagef("-admin-token-file without -admin-addr: give the API an address")
	case *adminTokenFile != "":
		if adminToken, err = readToken(*adminTokenFile); err != nil {
			c.Fatal(fmt.Errorf("-admin-token-file: %w", err))
		}
	}
	if cfg.ProxyProtocolFrom, err = proto.ParsePrefixes(*proxyFrom); err != nil {
		c.Usagef("-proxy-protocol-from: %v", err)
	}
	if *accessLog != "" {
		af, err := openAccessFile(*accessLog)
		if err != nil {
			c.Fatal(fmt.Errorf("-access-log: %w", err))
		}
		defer af.Close() // after the Shutdown below, which writes the last lines
		cfg.AccessLog = af
		usr1 := make(chan os.Signal, 1)
		notifyReopen(usr1)
		go reopenOn(usr1, af, log)
	}
	if err := privilegedRange(*bind, cfg.PortMin, cfg.PortMax); err != nil {
		c.Fatal(err)
	}
	var namesLn net.Listener
	if *sniAddr != "" {
		if host, p, _ := net.SplitHostPort(*sniAddr); p != "0" {
			n, _ := strconv.Atoi(p)
			if err := privilegedRange(host, n, n); err != nil {
				c.Fatal(fmt.Errorf("-sni-addr %s: permission denied: ports below 1024 need root or CAP_NET_BIND_SERVICE (setcap cap_net_bind_service=+ep relay, or AmbientCapabilities= in relay.service)", *sniAddr))
			}
		}
		if namesLn, err = net.Listen("tcp", *sniAddr); err != nil {
			c.Fatal(fmt.Errorf("-sni-addr: %w", err))
		}
		cfg.NamesPort = namesLn.Addr().(*net.TCPAddr).Port
	}
	cfg.Version, cfg.ControlTLS = cli.Version, tlsCfg != nil // for the status views
	srv, err := server.New(cfg)
	if err != nil {
		c.Fatal(err)
	}
	// The control port opens once the state file is read (or set aside):
	// a relay that accepts has its reservations.
	ln, err := net.Listen("tcp", net.JoinHostPort(*bind, strconv.Itoa(port)))
	if err != nil {
		c.Fatal(err)
	}
	// Agents speak the native protocol or WebSocket, over TLS if
	// configured; the server reads the native protocol from either.
	ln = transport.Listen(ln, tlsCfg)
	reload := func() (int, error) { return reloadAgents(srv, *agentsFile, log) }
	serveHTTP := func(what, addr string, h http.Handler) string {
		hln, err := net.Listen("tcp", addr)
		if err != nil {
			ln.Close()
			c.Fatal(fmt.Errorf("%s: %w", what, err))
		}
		hs := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
		go hs.Serve(hln)
		closers = append(closers, hs.Close)
		return hln.Addr().String()
	}
	switch {
	case *adminAddr != "" && *adminAddr == *metricsAddr:
		mux := http.NewServeMux()
		mux.Handle("/v1/", adminHandler(srv, adminToken, reload, log))
		mux.Handle("/", opsHandler(srv))
		a := serveHTTP("metrics and admin API", *metricsAddr, mux)
		log.Info("serving metrics, status and the admin API", "metrics", "http://"+a+"/metrics", "status", "http://"+a+"/", "admin", "http://"+a+"/v1/")
	default:
		if *metricsAddr != "" {
			a := serveHTTP("metrics", *metricsAddr, opsHandler(srv))
			log.Info("serving metrics and status", "metrics", "http://"+a+"/metrics", "status", "http://"+a+"/")
		}
		if *adminAddr != "" {
			a := serveHTTP("admin API", *adminAddr, adminHandler(srv, adminToken, reload, log))
			log.Info("serving the admin API", "admin", "http://"+a+"/v1/")
		}
	}
	defer func() {
		for _, f := range closers {
			f()
		}
	}()
	log.Info("relay listening", "addr", ln.Addr().String(), "public_ports", strconv.Itoa(cfg.PortMin)+"-"+strconv.Itoa(cfg.PortMax),
		"state_file", cfg.StateFile, "version", cli.Version)
	go reloadOnHUP(hup, srv, *agentsFile, log)

	errc := make(chan error, 3)
	go func() { errc <- srv.Serve(ln) }()
	if namesLn != nil {
		go func() { errc <- srv.ServeNames(namesLn) }()
		if tlsCfg != nil {
			// The public ports of the agents that come this way bind where
			// those of PORT's do.
			ctl := srv.NamesControl(&net.TCPAddr{IP: net.ParseIP(*bind), Port: cfg.NamesPort})
			go func() { errc <- srv.Serve(transport.Listen(ctl, tlsCfg)) }()
		}
		log.Info("serving tunnels by name", "addr", namesLn.Addr().String(), "domain", cfg.NamesDomain, "agents_too", tlsCfg != nil)
	}
	select {
	case err := <-errc:
		srv.Close()
		c.Fatal(err)
	case <-ctx.Done():
	}
	stop() // a second signal kills the process at once
	log.Info("shutting down: draining relayed connections", "deadline", *drain)
	dctx, cancel := context.WithTimeout(context.Background(), *drain)
	defer cancel()
	if err := srv.Shutdown(dctx); errors.Is(err, context.DeadlineExceeded) {
		log.Warn("drain deadline reached: closed the remaining connections")
	}
	log.Info("relay stopped")
}

// opsHandler serves the operator's views of srv.
func opsHandler(srv *server.Server) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		srv.WriteMetrics(w)
	})
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		srv.WriteStatus(w)
	})
	// A load balancer's health check of a public port, or of a name on the
	// shared port (deploy/haproxy.cfg): 200 while its endpoint has a ready
	// member, else 503.
	mux.HandleFunc("GET /ready/{port}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		key := r.PathValue("port")
		what := "name " + key
		if strings.Trim(key, "0123456789") == "" {
			port, err := cli.Port(key)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			key, what = strconv.Itoa(port), "port "+strconv.Itoa(port)
		}
		ok, ready, members := srv.EndpointReady(key)
		switch {
		case ok:
			fmt.Fprintf(w, "%s: ready (%d of %d members)\n", what, ready, members)
		case members > 0:
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintf(w, "%s: no ready member (%d registered)\n", what, members)
		default:
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintf(w, "%s: no endpoint open\n", what)
		}
	})
	// The status page for a browser, at / exactly: any other path is a 404.
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Header().Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")
		w.Header().Set("Cache-Control", "no-store")
		srv.WriteStatusHTML(w)
	})
	return mux
}

// stateFile is where the relay keeps its port reservations: a file of its
// own in dir, named after its control address, so that relays on one host
// do not share one; "" for off.
func stateFile(dir, bind string, port int) (string, error) {
	switch {
	case dir == "off":
		return "", nil
	case dir != "":
	case os.Getenv("STATE_DIRECTORY") != "": // systemd's StateDirectory=
		dir = strings.Split(os.Getenv("STATE_DIRECTORY"), ":")[0]
	case os.Getenv("XDG_STATE_HOME") != "":
		dir = filepath.Join(os.Getenv("XDG_STATE_HOME"), "tcprelay")
	default:
		home, err := os.UserHomeDir()
		if err != nil {
			return "", fmt.Errorf("no home directory for the default (%v): set -state-dir", err)
		}
		dir = filepath.Join(home, ".local", "state", "tcprelay")
	}
	if bind == "" {
		bind = "all"
	}
	name := "relay-" + strings.NewReplacer(":", "_", "/", "_").Replace(bind) + "-" + strconv.Itoa(port) + ".json"
	return filepath.Join(dir, name), nil
}

// reloadOnHUP re-reads the agents file on every SIGHUP (see
// reloadAgents).
func reloadOnHUP(hup <-chan os.Signal, srv *server.Server, path string, log *slog.Logger) {
	for range hup {
		reloadAgents(srv, path, log)
	}
}

// reloadAgents re-reads the agents file at path and applies it, and
// returns how many agents it admits by key. A file with an error, or an
// empty one (caught mid-write, say), leaves the agents in force as they
// were, and the error says why.
func reloadAgents(srv *server.Server, path string, log *slog.Logger) (int, error) {
	if path == "" {
		log.Info("reload: no agents file to reload")
		return 0, errors.New("the relay has no agents file (-agents)")
	}
	agents, err := loadAgents(path)
	if errors.Is(err, errEmptyAgents) {
		log.Warn("agents file is empty: not reloaded, keeping the agents in force (it may have been caught mid-write; to remove every agent, leave only a comment in it)", "file", path)
		return 0, fmt.Errorf("not reloaded, the agents in force are kept: %w", err)
	}
	if err != nil {
		log.Error("agents file not reloaded: keeping the agents in force", "err", err)
		return 0, fmt.Errorf("not reloaded, the agents in force are kept: %w", err)
	}
	srv.SetAgents(agents)
	log.Info("agents file reloaded", "file", path, "agents", len(agents))
	return len(agents), nil
}

// errEmptyAgents: the agents file holds nothing, not even a comment.
var errEmptyAgents = errors.New("agents file is empty (to admit no agent by key, leave only a comment in it, e.g. '# none')")

// loadAgents reads the agents file at path (see server.ParseAgents). An
// empty or blank file is an error: it is what a file caught mid-write
// looks like, and taken at its word it would remove every agent at once.
// A file that holds only a comment admits no agent by key, on purpose.
func loadAgents(path string) ([]server.Agent, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if len(bytes.TrimSpace(b)) == 0 {
		return nil, fmt.Errorf("%s: %w", path, errEmptyAgents)
	}
	agents, err := server.ParseAgents(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return agents, nil
}

// privilegedRange fails if the public ports are all below 1024 and none of
// them can be bound for want of the privilege: no agent could ever be
// given one, so the relay says so at start rather than to each agent.
func privilegedRange(bind string, lo, hi int) error {
	if hi >= 1024 {
		return nil
	}
	for p := lo; p <= hi; p++ {
		ln, err := net.Listen("tcp", net.JoinHostPort(bind, strconv.Itoa(p)))
		if err == nil {
			ln.Close()
			return nil
		}
		if !errors.Is(err, syscall.EACCES) {
			return nil // taken, say: the range is usable
		}
	}
	return fmt.Errorf("-ports %d-%d: permission denied: ports below 1024 need root or CAP_NET_BIND_SERVICE (setcap cap_net_bind_service=+ep relay, or AmbientCapabilities= in relay.service)", lo, hi)
}
