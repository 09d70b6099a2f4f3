// Command expose puts an existing, unmodified server behind the relay: it
// registers with the relay and forwards every relayed connection to TARGET.
package main

import (
	"net"
	"os"
	"time"

	"tcprelay/internal/cli"
	"tcprelay/internal/expose"
)

func main() {
	c := cli.New("expose", "RELAYHOST RELAYPORT TARGET",
		"Registers with the relay at RELAYHOST:RELAYPORT, prints\n"+
			"  established relay address: HOST:PORT\n"+
			"on stdout (again after each reconnection), and forwards every connection to\n"+
			"that address to TARGET (host:port), byte for byte in both directions.\n"+
			"TARGET is unmodified: redis, sshd, a web server. RELAYHOST may list\n"+
			"several relays, comma-separated, each HOST or HOST:PORT (RELAYPORT is the\n"+
			"port of those without one): the agent registers with each, on the same\n"+
			"port, and prints one line per relay. A relay that refuses it (a port it\n"+
			"cannot give, a limit) is logged at ERROR, in the relay's words, and asked\n"+
			"again with backoff while the others serve; one that refuses the secret or\n"+
			"key is given up. The agent exits only if no relay registers it.")
	agent := c.Agent()
	dialTimeout := c.FS.Duration("dial-timeout", 5e9, "time to connect to TARGET before the outside client is closed")
	proxyProto := c.FS.String("proxy-protocol", "", "send a PROXY protocol header (v1 or v2) with the client's real address to TARGET (default: none)")
	agent.HealthFlag("TARGET")
	args, log := c.Parse(os.Args[1:], 3)
	relays, rest := agent.Relays(args, 3)
	target := rest[0]
	if host, p, err := net.SplitHostPort(target); err != nil || host == "" {
		c.Usagef("bad TARGET %q: want host:port, e.g. 127.0.0.1:6379", target)
	} else if _, err := cli.Port(p); err != nil {
		c.Usagef("bad TARGET %q: %v", target, err)
	}
	if *dialTimeout <= 0 {
		c.Usagef("-dial-timeout %v: want a positive duration", *dialTimeout)
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
	if !agent.HealthOff() {
		agent.HealthTarget = target
		agent.Health = func() error { return fw.Probe(min(max(agent.HealthEvery, 100*time.Millisecond), 2*time.Second)) }
		fw.OnDialError = agent.Down
	}
	agent.Run(relays, log, fw.Start)
}
