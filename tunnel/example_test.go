package tunnel_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"

	"tcprelay/server"
	"tcprelay/tunnel"
)

// startRelay runs a relay in this process for the examples; in production
// it is ./relay on a public machine, and the agent knows its address.
func startRelay(addr string) (string, func()) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		log.Fatal(err)
	}
	srv, err := server.New(server.Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		log.Fatal(err)
	}
	go srv.Serve(ln)
	return ln.Addr().String(), func() { srv.Close() }
}

// An HTTP server behind the relay: net.Listen becomes tunnel.Listen, and
// http.Serve does the rest. Clients use the public address, ln.Addr().
func Example() {
	relayAddr, stop := startRelay("127.0.0.1:0")
	defer stop()

	cfg := tunnel.Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	ln, err := cfg.Listen(context.Background(), relayAddr)
	if err != nil {
		log.Fatal(err)
	}
	defer ln.Close()
	go http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "hello through the relay")
	}))

	// Any client, anywhere, connects to the public address.
	resp, err := http.Get("http://" + ln.Addr().String())
	if err != nil {
		log.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	fmt.Print(string(body))
	// Output: hello through the relay
}

// One Listener on several relays: it registers with each, on one port,
// and Accept yields the clients of all of them.
func ExampleListener_Addrs() {
	relay1, stop1 := startRelay("127.0.0.1:0")
	defer stop1()
	relay2, stop2 := startRelay("127.0.0.2:0")
	defer stop2()

	cfg := tunnel.Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	ln, err := cfg.Listen(context.Background(), relay1, relay2)
	if err != nil {
		log.Fatal(err)
	}
	defer ln.Close()
	addrs := ln.Addrs()
	a1, a2 := addrs[0].(*tunnel.Addr), addrs[1].(*tunnel.Addr)
	fmt.Println(a1.Host, a2.Host, a1.Port == a2.Port)
	// Output: 127.0.0.1 127.0.0.2 true
}
