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
			"client sends, half-closing after it does.")
	agent := c.Agent()
	args, log := c.Parse(os.Args[1:], 2)
	relayAddr, err := cli.RelayAddr(args[0], args[1])
	if err != nil {
		c.Usagef("%v", err)
	}
	agent.Run(relayAddr, log, echo)
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
