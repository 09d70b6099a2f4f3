package expose

import (
	"io"
	"log/slog"
	"net"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	pp "github.com/pires/go-proxyproto"

	"tcprelay/internal/check"
	"tcprelay/internal/testutil"
	"tcprelay/server"
	"tcprelay/tunnel"
)

// setup runs a relay and a tunnel whose connections fw handles; it returns
// the public address.
func setup(t *testing.T, fw *Forwarder) string {
	t.Helper()
	relay := testutil.StartRelay(t, server.Config{})
	cfg := tunnel.Config{Logger: testutil.Logger(t)}
	ln, err := cfg.Listen(testutil.Context(t), relay.Addr)
	if err != nil {
		t.Fatal(err)
	}
	testutil.Serve(t, ln, fw.Handle)
	return ln.Addr().String()
}

func listenLocal(t *testing.T, addr string) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

// roundTrip sends msg, half-closes, and returns all that comes back.
func roundTrip(t *testing.T, addr, msg string) string {
	t.Helper()
	c := testutil.Dial(t, addr)
	defer c.Close()
	c.Write([]byte(msg))
	c.CloseWrite()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	return string(b)
}

func TestForwardHalfClose(t *testing.T) {
	check.Leaks(t)
	target := listenLocal(t, "127.0.0.1:0")
	testutil.Serve(t, target, testutil.Echo)
	pub := setup(t, &Forwarder{Target: target.Addr().String(), Logger: testutil.Logger(t)})
	if got := roundTrip(t, pub, "hello target"); got != "hello target" {
		t.Fatalf("got %q", got)
	}
}

// TestTargetDownThenBack: while the target refuses connections each client
// is closed promptly, and OnDialError hears of each; the log gets one line
// naming the target and the error, not one per client (the others are
// counted in the next line, at most one per unreachableEvery); once it is
// back, clients are served.
func TestTargetDownThenBack(t *testing.T) {
	check.Leaks(t)
	probe := listenLocal(t, "127.0.0.1:0")
	targetAddr := probe.Addr().String()
	probe.Close() // nothing listens there now

	var logs testutil.LockedBuffer
	var dialErrs atomic.Int32
	fw := &Forwarder{Target: targetAddr, Logger: slog.New(slog.NewTextHandler(&logs, nil)),
		OnDialError: func(err error) {
			if strings.Contains(err.Error(), "connection refused") {
				dialErrs.Add(1)
			}
		}}
	pub := setup(t, fw)
	for range 3 {
		if got := roundTrip(t, pub, "anyone?"); got != "" {
			t.Fatalf("got %q from a target that is down", got)
		}
	}
	if n := strings.Count(logs.String(), "target unreachable"); n != 1 {
		t.Fatalf("%d 'target unreachable' log lines for 3 refused clients within %v, want 1:\n%s", n, unreachableEvery, logs.String())
	}
	if !strings.Contains(logs.String(), "target="+targetAddr) || !strings.Contains(logs.String(), "connection refused") {
		t.Errorf("the log line does not name the target %s and the error:\n%s", targetAddr, logs.String())
	}
	if n := dialErrs.Load(); n != 3 {
		t.Errorf("OnDialError heard of %d refused dials, want 3", n)
	}

	target := listenLocal(t, targetAddr)
	testutil.Serve(t, target, testutil.Echo)
	if got := roundTrip(t, pub, "back"); got != "back" {
		t.Fatalf("after the target came back: got %q", got)
	}
}

// hangingListener is a listening socket with a backlog of 0 whose queue we
// fill, so further connection attempts hang in SYN-SENT: a target that is up
// but never answers.
func hangingListener(t *testing.T) string {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, _ := syscall.Getsockname(fd)
	addr := (&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: sa.(*syscall.SockaddrInet4).Port}).String()
	for i := 0; ; i++ {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err != nil {
			return addr // the queue is full: dials hang now
		}
		t.Cleanup(func() { c.Close() })
		if i > 16 {
			t.Skip("could not fill a listen queue of 0 on this kernel")
		}
	}
}

func TestSlowTargetDialTimeout(t *testing.T) {
	check.Leaks(t)
	var logs testutil.LockedBuffer
	fw := &Forwarder{Target: hangingListener(t), DialTimeout: 300 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(&logs, nil))}
	pub := setup(t, fw)
	if got := roundTrip(t, pub, "hello?"); got != "" {
		t.Fatalf("got %q from a target that never answers", got)
	}
	if !strings.Contains(logs.String(), "target unreachable") || !strings.Contains(logs.String(), "timeout") {
		t.Fatalf("want a log line naming the timeout, got:\n%s", logs.String())
	}
}

// TestProxyProtocol: a target that parses PROXY headers with an independent
// library sees the outside client's address as the connection's source.
func TestProxyProtocol(t *testing.T) {
	for _, version := range []int{1, 2} {
		t.Run("v"+string(rune('0'+version)), func(t *testing.T) {
			check.Leaks(t)
			inner := listenLocal(t, "127.0.0.1:0")
			target := &pp.Listener{Listener: inner}
			testutil.Serve(t, target, func(c net.Conn) {
				io.WriteString(c, c.RemoteAddr().String())
				io.Copy(io.Discard, c)
			})
			pub := setup(t, &Forwarder{Target: inner.Addr().String(), ProxyProtocol: version, Logger: testutil.Logger(t)})
			client := testutil.Dial(t, pub)
			client.CloseWrite()
			got := testutil.ReadAllTimeout(t, client, 5*time.Second)
			if want := client.LocalAddr().String(); string(got) != want {
				t.Fatalf("target saw client %q, want %q", got, want)
			}
		})
	}
}
