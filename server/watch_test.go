package server

import (
	"io"
	"net"
	"testing"
	"time"

	"tcprelay/internal/transport"
)

// TestPlainSocketUnwrapsOnlyPlainNative: a link holds the socket of a data
// connection that carries the native protocol in the clear once its
// sniffed bytes are read, not the transport's wrapper (which every idle
// link would keep alive); before they are read, or over anything else, the
// wrapper itself.
func TestPlainSocketUnwrapsOnlyPlainNative(t *testing.T) {
	tcp, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := transport.Listen(tcp, nil)
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := plainSocket(c); got != c {
		t.Fatalf("before its first read: plainSocket = %T, want the wrapper", got)
	}
	client.Write([]byte("TCPR and more"))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, make([]byte, 2)); err != nil { // of the 4 sniffed
		t.Fatal(err)
	}
	if got := plainSocket(c); got != c {
		t.Fatalf("with sniffed bytes still to read: plainSocket = %T, want the wrapper", got)
	}
	if _, err := io.ReadFull(c, make([]byte, 11)); err != nil {
		t.Fatal(err)
	}
	got, ok := plainSocket(c).(*net.TCPConn)
	if !ok || got.RemoteAddr().String() != client.LocalAddr().String() {
		t.Fatalf("plain native, everything read: plainSocket = %T, want its *net.TCPConn", plainSocket(c))
	}
	// Conns of other kinds are left as they are.
	for _, other := range []net.Conn{client, struct{ net.Conn }{c}} {
		if plainSocket(other) != other {
			t.Errorf("plainSocket(%T) is not the conn itself", other)
		}
	}
}
