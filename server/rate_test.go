package server_test

import (
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/testutil"
	"tcprelay/server"
	"tcprelay/tunnel"
)

func TestParseRate(t *testing.T) {
	for in, want := range map[string]int64{
		"10MB": 10_000_000, "80Mbit": 10_000_000, "1.5MB": 1_500_000, "500": 500, "500B": 500,
		"64KiB": 65536, "2MiB": 2 << 20, "1GiB": 1 << 30, "1GB": 1e9, "3KB": 3000,
		"8Kbit": 1000, "1Gbit": 125_000_000,
	} {
		if got, err := server.ParseRate(in); err != nil || got != want {
			t.Errorf("ParseRate(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "0", "0MB", "-1MB", "10mb", "10 MB", "10Mbps", "MB", "1e6", "1.2.3KB", "4bit", "NaN", "Inf", "99999999GB"} {
		if got, err := server.ParseRate(bad); err == nil {
			t.Errorf("ParseRate(%q) = %d, want an error", bad, got)
		} else if !strings.Contains(err.Error(), "Mbit") {
			t.Errorf("ParseRate(%q): %v; want the units listed", bad, err)
		}
	}
	agents, err := server.ParseAgents(strings.NewReader("slow " + tunnel.PublicKey(newKey(t)) + " rate=40Mbit\nteam secret rate=1MiB\n"))
	if err != nil {
		t.Fatal(err)
	}
	if agents[0].Rate != 5_000_000 || agents[1].Rate != 1<<20 {
		t.Errorf("rates %d and %d, want 5000000 (40Mbit) and 1048576 (1MiB)", agents[0].Rate, agents[1].Rate)
	}
	if _, err := server.ParseAgents(strings.NewReader("slow " + tunnel.PublicKey(newKey(t)) + " rate=fast")); err == nil || !strings.Contains(err.Error(), "line 1: rate=fast") {
		t.Errorf("rate=fast: %v, want an error naming the line and the value", err)
	}
}

// TestRateShapesTenantLinks: a tenant with a Rate gets it on each direction
// of its links, measured from outside (never more than 10% faster), while
// another tenant's links on the same relay still splice and move at least
// twice as fast.
// A new rate from SetAgents reaches the tenant's next transfer on the same
// identity.
func TestRateShapesTenantLinks(t *testing.T) {
	check.Leaks(t)
	const rate = 4_000_000 // bytes per second, each direction
	const n = 2 * rate     // two seconds' worth each way
	slowKey, fastKey := newKey(t), newKey(t)
	slow := agentOf("slow", slowKey)
	slow.Rate = rate
	relay := testutil.StartRelay(t, server.Config{Agents: []server.Agent{slow, agentOf("fast", fastKey)}})

	// The agent reads the upload to EOF, then sends n bytes back.
	sink := func(c net.Conn) {
		if m, err := io.Copy(io.Discard, c); err != nil || m != n {
			t.Errorf("agent: read %d bytes (%v), want %d", m, err, n)
			return
		}
		c.Write(make([]byte, n))
	}
	serve := func(key []byte) string {
		ln, err := listenAs(t, relay.Addr, key, "", 0)
		if err != nil {
			t.Fatal(err)
		}
		testutil.Serve(t, ln, sink)
		return ln.Addr().String()
	}
	slowAddr, fastAddr := serve(slowKey), serve(fastKey)

	// exchange uploads n bytes through addr, then downloads n, and
	// returns how long each took and how the relay copied the link.
	exchange := func(addr string) (up, down time.Duration, spliced, limited int) {
		t.Helper()
		_, p, _ := net.SplitHostPort(addr)
		var port int
		fmt.Sscan(p, &port)
		c := testutil.Dial(t, addr)
		check.Eventually(t, 5*time.Second, func() error {
			if spliced, limited = server.LinkPaths(relay.Server, port); spliced+limited != 1 {
				return fmt.Errorf("%d spliced links and %d limited ones on port %d, want one", spliced, limited, port)
			}
			return nil
		})
		start := time.Now()
		wrote := make(chan error, 1)
		go func() {
			_, err := c.Write(make([]byte, n))
			if err == nil {
				err = c.CloseWrite()
			}
			wrote <- err
		}()
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		buf := make([]byte, 64<<10)
		var got int
		var first time.Time
		for {
			k, err := c.Read(buf)
			if k > 0 && got == 0 {
				first = time.Now()
			}
			got += k
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("download through %s after %d bytes: %v", addr, got, err)
			}
		}
		if err := <-wrote; err != nil || got != n {
			t.Fatalf("through %s: upload %v, downloaded %d bytes, want %d", addr, err, got, n)
		}
		return first.Sub(start), time.Since(first), spliced, limited
	}
	// What n bytes at rate take after a full bucket's burst (a tenth of a
	// second's worth): no faster than 90% of that (the limit holds), no
	// slower than 125% (a loaded machine adds a little).
	want := time.Duration(float64(n-rate/10) / rate * float64(time.Second))
	within := func(what string, d time.Duration) {
		t.Logf("%s: %d bytes in %v: %.2f MB/s after the burst, limit %.2f MB/s", what, n, d.Round(time.Millisecond),
			float64(n-rate/10)/d.Seconds()/1e6, float64(rate)/1e6)
		if d < want*9/10 || d > want*5/4 {
			t.Errorf("%s took %v, want %v (-10%%, +25%%)", what, d.Round(time.Millisecond), want.Round(time.Millisecond))
		}
	}

	up, down, spliced, limited := exchange(slowAddr)
	if limited != 1 {
		t.Errorf("the limited tenant's link: %d spliced, %d limited; want it limited", spliced, limited)
	}
	within("limited tenant, upload", up)
	within("limited tenant, download", down)

	fup, fdown, spliced, limited := exchange(fastAddr)
	if spliced != 1 && runtime.GOOS == "linux" {
		t.Errorf("the unlimited tenant's link: %d spliced, %d limited; want it spliced", spliced, limited)
	}
	t.Logf("unlimited tenant: upload %v, download %v", fup.Round(time.Millisecond), fdown.Round(time.Millisecond))
	// The unlimited link is spliced (checked above); its time is only
	// bounded loosely, since a loaded CI machine slows it, never the
	// limited one, which cannot go faster than its rate.
	if fup > up/2 || fdown > down/2 {
		t.Errorf("unlimited tenant: upload %v, download %v; want each at most half the limited one's (%v, %v)", fup, fdown, up, down)
	}

	// Twice the rate from SetAgents: the same identity's next link moves
	// twice as fast.
	slow.Rate = 2 * rate
	relay.SetAgents([]server.Agent{slow, agentOf("fast", fastKey)})
	up2, down2, _, _ := exchange(slowAddr)
	t.Logf("limited tenant at twice the rate: upload %v, download %v", up2.Round(time.Millisecond), down2.Round(time.Millisecond))
	// Still limited (no faster than the new rate allows), and clearly
	// faster than at the old rate.
	want2 := time.Duration(float64(n-2*rate/10) / (2 * rate) * float64(time.Second))
	if up2 < want2*9/10 || down2 < want2*9/10 {
		t.Errorf("at twice the rate: upload %v, download %v; faster than the limit allows (%v)", up2, down2, want2)
	}
	if up2 > up*3/4 || down2 > down*3/4 {
		t.Errorf("at twice the rate: upload %v, download %v; want about half of %v, %v", up2, down2, up, down)
	}
}
