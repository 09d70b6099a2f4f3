package server_test

import (
	"io"
	"net"
	"os"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"tcprelay/internal/check"
	"tcprelay/internal/testutil"
	"tcprelay/server"
	"tcprelay/tunnel"
)

// Every relayed socket has its options: the client's from its public
// port's listener (keepalive and receive buffer) and from the relay
// (TCP_NOTSENT_LOWAT); the data connection's set once, and kept when it is
// parked again for the next client.
func TestRelayedSocketsHaveTheirOptions(t *testing.T) {
	check.Leaks(t)
	const linkBuffer = 128 << 10 // under a stock net.core.rmem_max: no CAP_NET_ADMIN needed
	relay := testutil.StartRelay(t, server.Config{LinkBuffer: linkBuffer})
	ln, err := listenAs(t, relay.Addr, newKey(t), "", 0)
	if err != nil {
		t.Fatal(err)
	}
	testutil.WaitParked(t, relay, 4)
	agentEnds := make(chan net.Addr, 2)
	testutil.Serve(t, ln, func(c net.Conn) {
		agentEnds <- c.(*tunnel.Conn).NetConn().LocalAddr()
		testutil.Echo(c)
	})
	var dataConns []string
	for i := range 2 { // the second on the data connection parked again
		c := testutil.Dial(t, ln.Addr().String())
		b := []byte{'x'}
		if _, err := c.Write(b); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, b); err != nil {
			t.Fatal(err)
		}
		agentEnd := <-agentEnds
		dataConns = append(dataConns, agentEnd.String())
		for _, s := range []struct {
			what       string
			local, far string
		}{
			{"the client's socket", c.RemoteAddr().String(), c.LocalAddr().String()},
			{"the data connection's socket", relay.Addr, agentEnd.String()},
		} {
			fd := socketFD(t, s.local, s.far)
			want := map[string][3]int{
				"TCP_NOTSENT_LOWAT": {unix.IPPROTO_TCP, unix.TCP_NOTSENT_LOWAT, 256 << 10},
				"SO_RCVBUF":         {unix.SOL_SOCKET, unix.SO_RCVBUF, 2 * linkBuffer}, // the kernel doubles it
			}
			if s.what == "the client's socket" {
				want["SO_KEEPALIVE"] = [3]int{unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1}
				want["TCP_KEEPIDLE"] = [3]int{unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, 15}
				want["TCP_KEEPINTVL"] = [3]int{unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, 15}
				want["TCP_KEEPCNT"] = [3]int{unix.IPPROTO_TCP, unix.TCP_KEEPCNT, 9}
			}
			for name, o := range want {
				got, err := unix.GetsockoptInt(fd, o[0], o[1])
				if err != nil || got != o[2] {
					t.Errorf("client %d, %s: %s is %d (%v); want %d", i+1, s.what, name, got, err, o[2])
				}
			}
			unix.Close(fd)
		}
		c.CloseWrite() // a clean end both ways: the data connection serves the next client
		if rest, err := io.ReadAll(c); err != nil || len(rest) > 0 {
			t.Fatalf("after the echo: %q, %v; want EOF", rest, err)
		}
		c.Close()
		// The data connection is parked again once both ends are in.
		for deadline := time.Now().Add(5 * time.Second); testutil.Metrics(t, relay.Server)["tcprelay_pool_reused_total"] < int64(i+1); {
			if time.Now().After(deadline) {
				t.Fatal("the data connection was not parked again")
			}
			time.Sleep(time.Millisecond)
		}
	}
	if dataConns[0] != dataConns[1] {
		t.Errorf("the second client had another data connection (%s, then %s); want the first one, parked again", dataConns[0], dataConns[1])
	}
}

// socketFD returns a duplicate of this process's socket whose own address
// is local and whose peer is far.
func socketFD(t *testing.T, local, far string) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		la, err1 := unix.Getsockname(fd)
		ra, err2 := unix.Getpeername(fd)
		if err1 != nil || err2 != nil || addrString(la) != local || addrString(ra) != far {
			continue
		}
		dup, err := unix.Dup(fd)
		if err != nil {
			t.Fatal(err)
		}
		return dup
	}
	t.Fatalf("no socket from %s to %s in this process", local, far)
	return -1
}

func addrString(sa unix.Sockaddr) string {
	if a, ok := sa.(*unix.SockaddrInet4); ok {
		return net.JoinHostPort(net.IP(a.Addr[:]).String(), strconv.Itoa(a.Port))
	}
	return ""
}
