// Command expose puts an existing, unmodified server behind the relay: it
// registers with the relay and forwards every relayed connection to TARGET.
package main

import (
	"context"
	"net"
	"os"
	"os/signal"
	"syscall"

	"tcprelay/internal/cli"
	"tcprelay/internal/expose"
	"tcprelay/tunnel"
)

func main() {
	c := cli.New("expose", "RELAYHOST RELAYPORT TARGET",
		"Registers with the relay at RELAYHOST:RELAYPORT, prints\n"+
			"  established relay address: HOST:PORT\n"+
			"on stdout, and forwards every connection to that address to TARGET (host:port),\n"+
			"byte for byte in both directions. TARGET is unmodified: redis, sshd, a web server.")
	port := c.FS.Int("port", 0, "public port to ask the relay for (0: any)")
	dialTimeout := c.FS.Duration("dial-timeout", 5e9, "time to connect to TARGET before the outside client is closed")
	proxyProto := c.FS.String("proxy-protocol", "", "send a PROXY protocol header (v1 or v2) with the client's real address to TARGET (default: none)")
	drain := c.FS.Duration("drain-timeout", 5e9, "on SIGINT/SIGTERM, how long open connections may finish")
	tlsConfig := c.AgentTLS()
	args, log := c.Parse(os.Args[1:], 3)
	relayAddr, err := cli.RelayAddr(args[0], args[1])
	if err != nil {
		c.Usagef("%v", err)
	}
	target := args[2]
	if host, p, err := net.SplitHostPort(target); err != nil || host == "" {
		c.Usagef("bad TARGET %q: want host:port, e.g. 127.0.0.1:6379", target)
	} else if _, err := cli.Port(p); err != nil {
		c.Usagef("bad TARGET %q: %v", target, err)
	}
	fw := &expose.Forwarder{Target: target, DialTimeout: *dialTimeout, Logger: log}
	switch *proxyProto {
	case "":
	case "v1", "1":
		fw.ProxyProtocol = 1
	case "v2", "2":
		fw.ProxyProtocol = 2
	default:
		c.Usagef("bad -proxy-protocol %q: want v1 or v2", *proxyProto)
	}

	tlsCfg, err := tlsConfig()
	if err != nil {
		c.Usagef("%v", err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cfg := tunnel.Config{TLS: tlsCfg, Secret: c.Secret(), Port: *port, Agent: "expose/" + cli.Version, Logger: log,
		OnAddr: func(a net.Addr) { cli.Announce(os.Stdout, a) }}
	ln, err := cfg.Listen(ctx, relayAddr)
	if err != nil {
		c.Fatal(err)
	}
	cli.Announce(os.Stdout, ln.Addr())
	log.Info("forwarding", "public", ln.Addr().String(), "target", target)
	context.AfterFunc(ctx, func() { ln.Close() })
	if err := cli.Serve(ln, fw.Handle, *drain, log); err != nil {
		c.Fatal(err)
	}
}
