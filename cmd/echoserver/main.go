// Command echoserver is the example relayed program: it registers with a
// relay, announces its public address, and echoes every byte back.
package main

import (
	"context"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"

	"tcprelay/internal/cli"
	"tcprelay/tunnel"
)

func main() {
	c := cli.New("echoserver", "RELAYHOST RELAYPORT",
		"Registers with the relay at RELAYHOST:RELAYPORT, prints\n"+
			"  established relay address: HOST:PORT\n"+
			"on stdout, and echoes every byte each client sends, half-closing after it does.")
	port := c.FS.Int("port", 0, "public port to ask the relay for (0: any)")
	drain := c.FS.Duration("drain-timeout", 5e9, "on SIGINT/SIGTERM, how long open connections may finish")
	tlsConfig := c.AgentTLS()
	args, log := c.Parse(os.Args[1:], 2)
	relayAddr, err := cli.RelayAddr(args[0], args[1])
	if err != nil {
		c.Usagef("%v", err)
	}

	tlsCfg, err := tlsConfig()
	if err != nil {
		c.Usagef("%v", err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cfg := tunnel.Config{TLS: tlsCfg, Secret: c.Secret(), Port: *port, Agent: "echoserver/" + cli.Version, Logger: log,
		OnAddr: func(a net.Addr) { cli.Announce(os.Stdout, a) }}
	ln, err := cfg.Listen(ctx, relayAddr)
	if err != nil {
		c.Fatal(err)
	}
	cli.Announce(os.Stdout, ln.Addr())
	context.AfterFunc(ctx, func() { ln.Close() })
	if err := cli.Serve(ln, echo, *drain, log); err != nil {
		c.Fatal(err)
	}
}

// echo writes back everything the client sends; when the client half-closes,
// it half-closes too, after the last byte.
func echo(c net.Conn) {
	defer c.Close()
	if _, err := io.Copy(c, c); err != nil {
		return
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
}
