// Command relay is the public relay server: ./relay [flags] PORT.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"tcprelay/internal/cli"
	"tcprelay/server"
	"tcprelay/tunnel"
)

func main() {
	c := cli.New("relay", "PORT",
		"Listens for agents on PORT. Each agent gets a public port (by default PORT+1\n"+
			"upward) and every connection to it is relayed to the agent, byte for byte.")
	bind := c.FS.String("bind", "", "IP address to listen on, for PORT and the public ports (default: all interfaces)")
	publicHost := c.FS.String("public-host", "", "host name announced to agents as their public host (default: the host each agent dialed)")
	ports := c.FS.String("ports", "", "public port range LO-HI (default: PORT+1-65535)")
	handshake := c.FS.Duration("handshake-timeout", 10e9, "time a new connection has to finish its handshake")
	pickup := c.FS.Duration("pickup-timeout", 10e9, "time an outside client waits for its agent before it is closed")
	heartbeat := c.FS.Duration("heartbeat", 10e9, "interval of pings to agents; an agent silent for 3 intervals is dropped (0: never)")
	drain := c.FS.Duration("drain-timeout", 10e9, "on SIGINT/SIGTERM, how long relayed connections may finish before they are closed")
	maxTunnels := c.FS.Int("max-tunnels-per-agent", 16, "public ports one agent may hold (-1: unlimited)")
	maxConns := c.FS.Int("max-conns-per-tunnel", 4096, "outside clients one tunnel may have, waiting or relayed; more are closed at once (-1: unlimited)")
	maxPending := c.FS.Int("max-pending-per-tunnel", 128, "outside clients one tunnel may have waiting for its agent; more are closed at once (-1: unlimited)")
	metricsAddr := c.FS.String("metrics-addr", "", "serve Prometheus metrics at http://ADDR/metrics and a status view at /status, e.g. 127.0.0.1:9090 (default: off)")
	tlsCert := c.FS.String("tls-cert", "", "PEM certificate file: serve agents over TLS (with -tls-key)")
	tlsKey := c.FS.String("tls-key", "", "PEM private key file for -tls-cert")
	maxPool := c.FS.Int("max-pool-per-agent", 32, "idle data connections an agent may open in advance, so new clients skip a round trip (-1: none)")
	maxFrame := c.FS.Int("max-frame-size", 16384, "largest control frame payload accepted from an authenticated agent, in bytes")
	args, log := c.Parse(os.Args[1:], 1)

	port, err := cli.Port(args[0])
	if err != nil {
		c.Usagef("%v", err)
	}
	cfg := server.Config{
		Secret:           c.Secret(),
		PublicHost:       *publicHost,
		PortMin:          port + 1,
		PortMax:          65535,
		HandshakeTimeout: *handshake,
		PickupTimeout:    *pickup,
		Heartbeat:        *heartbeat,
		Logger:           log,

		MaxTunnelsPerAgent:  *maxTunnels,
		MaxConnsPerTunnel:   *maxConns,
		MaxPendingPerTunnel: *maxPending,
		MaxPoolPerAgent:     *maxPool,
		MaxFrameSize:        *maxFrame,
	}
	for name, d := range map[string]time.Duration{"handshake-timeout": *handshake, "pickup-timeout": *pickup, "drain-timeout": *drain} {
		if d <= 0 {
			c.Usagef("-%s %v: want a positive duration, e.g. 10s", name, d)
		}
	}
	if *heartbeat < 0 || *heartbeat > 0 && *heartbeat < 100*time.Millisecond {
		c.Usagef("-heartbeat %v: want 0 (off) or at least 100ms", *heartbeat)
	}
	for name, v := range map[string]int{"max-tunnels-per-agent": *maxTunnels, "max-conns-per-tunnel": *maxConns,
		"max-pending-per-tunnel": *maxPending, "max-pool-per-agent": *maxPool} {
		if v == 0 || v < -1 {
			c.Usagef("-%s %d: want a positive number, or -1 for unlimited", name, v)
		}
	}
	if *maxFrame < 256 {
		c.Usagef("-max-frame-size %d: want at least 256", *maxFrame)
	}
	if *heartbeat == 0 {
		cfg.Heartbeat = -1
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

	var tlsCfg *tls.Config
	if (*tlsCert == "") != (*tlsKey == "") {
		c.Usagef("-tls-cert and -tls-key go together")
	}
	if *tlsCert != "" {
		cert, err := tls.LoadX509KeyPair(*tlsCert, *tlsKey)
		if err != nil {
			c.Fatal(fmt.Errorf("load TLS certificate: %w", err))
		}
		tlsCfg = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
		log.Info("serving agents over TLS", "cert", *tlsCert, "fingerprint", tunnel.Fingerprint(cert.Certificate[0]))
	}

	// Signals are caught before the port opens, so a SIGTERM right after
	// start-up is a graceful shutdown too.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	ln, err := net.Listen("tcp", net.JoinHostPort(*bind, strconv.Itoa(port)))
	if err != nil {
		c.Fatal(err)
	}
	if tlsCfg != nil {
		ln = tls.NewListener(ln, tlsCfg)
	}
	srv := server.New(cfg)
	if *metricsAddr != "" {
		mln, err := net.Listen("tcp", *metricsAddr)
		if err != nil {
			ln.Close()
			c.Fatal(fmt.Errorf("metrics: %w", err))
		}
		hs := &http.Server{Handler: opsHandler(srv), ReadHeaderTimeout: 5 * time.Second}
		go hs.Serve(mln)
		defer hs.Close()
		log.Info("serving metrics and status", "metrics", "http://"+mln.Addr().String()+"/metrics",
			"status", "http://"+mln.Addr().String()+"/status")
	}
	log.Info("relay listening", "addr", ln.Addr().String(), "public_ports", strconv.Itoa(cfg.PortMin)+"-"+strconv.Itoa(cfg.PortMax), "version", cli.Version)

	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
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
	return mux
}
