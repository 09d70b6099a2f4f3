// Command echoserver is the example relayed program: it registers with a
// relay, announces its public address, and echoes every byte back.
package main

import (
	"net"
	"os"

	"tcprelay/internal/cli"
	"tcprelay/internal/copier"
)

func main() {
	c := cli.New("echoserver", "RELAYHOST RELAYPORT",
		"Registers with the relay at RELAYHOST:RELAYPORT, prints\n"+
			"  established relay address: HOST:PORT\n"+
			"on stdout (again after each reconnection), and echoes every byte each\n"+
			"client sends, half-closing after it does. RELAYHOST may list several\n"+
			"relays, comma-separated, each HOST or HOST:PORT (RELAYPORT is the port of\n"+
			"those without one): the agent registers with each, on the same port, and\n"+
			"prints one line per relay. A relay that refuses it (a port it cannot give,\n"+
			"a limit) is logged at ERROR, in the relay's words, and asked again with\n"+
			"backoff while the others serve; one that refuses the secret or key is\n"+
			"given up. The agent exits only if no relay registers it.")
	agent := c.Agent()
	args, log := c.Parse(os.Args[1:], 2)
	relays, _ := agent.Relays(args, 2)
	agent.Run(relays, log, echo)
}

// echo writes back everything the client sends; when the client half-closes,
// it half-closes too, after the last byte. The copier splices and holds no
// pipe while the client is quiet, so an idle client costs its socket and
// this goroutine.
func echo(c net.Conn, done func()) {
	defer done()
	defer c.Close()
	if _, err := copier.Copy(c, c); err != nil {
		return
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
}
