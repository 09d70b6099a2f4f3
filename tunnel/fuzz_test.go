package tunnel

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"flag"
	"io"
	"log/slog"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"

	"tcprelay/internal/check"
	"tcprelay/internal/proto"
	"tcprelay/internal/testutil"
	"tcprelay/server"
)

// hostileRelay plays a relay over net.Pipe: on the control connection (the
// first one dialed) it sends control, and on each later one (a data or
// pre-opened connection) it sends data; it reads and drops whatever the
// agent sends. It closes a data connection once its bytes are read, and
// the control connection once the agent has opened maxDials data
// connections or has been quiet for a moment after reading everything: an
// agent that registered then loses its relay, and, with DisableReconnect,
// gives up.
type hostileRelay struct {
	control, data []byte
	wg            sync.WaitGroup
	mu            sync.Mutex
	dials         int
	ends          []net.Conn
	enough        chan struct{} // closed at maxDials
}

const maxDials = 8

func (h *hostileRelay) dial(ctx context.Context, addr string) (net.Conn, error) {
	agent, relay := net.Pipe()
	h.mu.Lock()
	h.dials++
	first := h.dials == 1
	if h.dials == maxDials+1 {
		close(h.enough)
	}
	h.ends = append(h.ends, relay)
	h.mu.Unlock()
	out := h.data
	if first {
		out = h.control
	}
	drained := make(chan struct{})
	h.wg.Add(2)
	go func() {
		defer h.wg.Done()
		defer close(drained)
		io.Copy(io.Discard, relay)
	}()
	go func() {
		defer h.wg.Done()
		defer relay.Close()
		relay.SetWriteDeadline(time.Now().Add(time.Second))
		if _, err := relay.Write(out); err != nil || !first {
			return
		}
		select {
		case <-drained: // the agent closed it
		case <-h.enough:
		case <-time.After(10 * time.Millisecond):
		}
	}()
	return agent, nil
}

// closeAll closes the relay's ends and waits for its goroutines.
func (h *hostileRelay) closeAll() {
	h.mu.Lock()
	for _, c := range h.ends {
		c.Close()
	}
	h.mu.Unlock()
	h.wg.Wait()
}

// transcript is what a relay sends, frame by frame.
func transcript(ms ...proto.Message) []byte {
	var b []byte
	for _, m := range ms {
		b = proto.Append(b, m)
	}
	return b
}

// recordRelay registers with a real relay and records what the relay sends
// on the control connection and on a pre-opened data connection, up to a
// client's first bytes: a real transcript to seed the fuzzer with.
func recordRelay(f *testing.F) (control, data []byte) {
	discard := slog.New(slog.DiscardHandler) // f must not log once fuzzing starts
	relay := testutil.StartRelay(f, server.Config{Logger: discard})
	defer relay.Close()
	var mu sync.Mutex
	var recs []*testutil.LockedBuffer
	cfg := Config{Logger: discard, dial: func(ctx context.Context, addr string) (net.Conn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, err
		}
		rec := &testutil.LockedBuffer{}
		mu.Lock()
		recs = append(recs, rec)
		mu.Unlock()
		return &recorder{c.(*net.TCPConn), rec}, nil
	}}
	ln, err := cfg.Listen(context.Background(), relay.Addr)
	if err != nil {
		f.Fatal(err)
	}
	defer ln.Close()
	served := make(chan struct{})
	go func() {
		defer close(served)
		if c, err := ln.Accept(); err == nil {
			testutil.Echo(c)
			c.Close()
		}
	}()
	if err := testutil.EchoCheck(ln.Addr().String(), []byte("recorded"), 5*time.Second); err != nil {
		f.Fatal(err)
	}
	<-served
	mu.Lock()
	defer mu.Unlock()
	control = recs[0].Bytes()
	for _, r := range recs[1:] {
		if b := r.Bytes(); bytes.Contains(b, []byte("recorded")) {
			data = b
		}
	}
	if data == nil {
		f.Fatal("no data connection carried the client's bytes")
	}
	return control, data
}

// recorder keeps a copy of what is read from the relay. It does not embed
// the *net.TCPConn, whose ReadFrom, WriteTo and SyscallConn would let a
// copier splice past Read (transport.Dialer's contract).
type recorder struct {
	tc  *net.TCPConn
	rec *testutil.LockedBuffer
}

func (r *recorder) Close() error                       { return r.tc.Close() }
func (r *recorder) CloseWrite() error                  { return r.tc.CloseWrite() }
func (r *recorder) Write(p []byte) (int, error)        { return r.tc.Write(p) }
func (r *recorder) LocalAddr() net.Addr                { return r.tc.LocalAddr() }
func (r *recorder) RemoteAddr() net.Addr               { return r.tc.RemoteAddr() }
func (r *recorder) SetDeadline(t time.Time) error      { return r.tc.SetDeadline(t) }
func (r *recorder) SetReadDeadline(t time.Time) error  { return r.tc.SetReadDeadline(t) }
func (r *recorder) SetWriteDeadline(t time.Time) error { return r.tc.SetWriteDeadline(t) }

func (r *recorder) Read(p []byte) (int, error) {
	n, err := r.tc.Read(p)
	r.rec.Write(p[:n])
	return n, err
}

// FuzzHostileRelay feeds arbitrary bytes to the agent as everything a relay
// sends: the handshake (Challenge, Welcome, ListenOK, PoolKey, Error,
// GoAway, unknown frames), the control connection's later frames
// (Incoming, Ping, Error), and the Bind on pre-opened data connections.
// The agent must neither crash nor hang: Listen returns, Close returns, and
// no goroutine or file descriptor is left behind.
func FuzzHostileRelay(f *testing.F) {
	if fl := flag.Lookup("test.fuzz"); fl == nil || fl.Value.String() == "" {
		check.Leaks(f) // after the seeds (fuzzing has goroutines of its own)
	}
	eph := proto.NewEphemeral().Public
	all := proto.FeaturePool | proto.FeatureIdentity | proto.FeatureProof | proto.FeaturePools | proto.FeatureReady
	ch := &proto.Challenge{Nonce: proto.NewNonce(), Features: all, Eph: eph}
	welcome := &proto.Welcome{HeartbeatMillis: 15000}
	ok := &proto.ListenOK{ID: 1, Tunnel: 7, Port: 8081, Resume: proto.NewToken()}
	incoming := &proto.Incoming{Tunnel: 7, Token: proto.NewToken(), Client: "203.0.113.5:51234", Local: "198.51.100.1:8081"}
	bind := transcript(&proto.Bind{Tunnel: 7, Client: "[2001:db8::1]:40000", Local: "198.51.100.1:8081"})
	unknown := proto.AppendFrame(nil, proto.Type(0x7e), []byte("from a newer relay"))

	recControl, recData := recordRelay(f)
	f.Add(recControl, recData, uint8(0))
	f.Add(recControl, recData, uint8(0xff))
	for _, control := range [][]byte{
		transcript(ch, welcome, &proto.PoolKey{Key: proto.NewToken(), Max: 8}, ok, incoming, &proto.Ping{Data: 1}),
		append(transcript(ch, welcome, ok), append(unknown, transcript(incoming, &proto.Error{ID: 3, Code: proto.CodeLimit, Message: "pending"})...)...),
		transcript(ch, welcome, ok, &proto.GoAway{Message: "restarting", RetryMillis: 1}),
		transcript(ch, welcome, ok, &proto.Error{Code: proto.CodeLimit, Message: "bye"}),
		transcript(ch, welcome, &proto.Error{ID: 1, Code: proto.CodePortUnavailable, Message: "port 8081 is in use"}),
		transcript(ch, &proto.Error{Code: proto.CodeAuthFailed, Message: "wrong or missing secret"}),
		transcript(&proto.Error{Code: proto.CodeLimit, Message: "relay busy"}),
		transcript(&proto.Challenge{}, &proto.Welcome{HeartbeatMillis: 1}, ok, &proto.Ping{}),
		transcript(ch, &proto.Incoming{}, welcome),
		[]byte("HTTP/1.1 400 Bad Request\r\n\r\n"),
		{},
	} {
		f.Add(control, bind, uint8(0))
		f.Add(control, bind, uint8(0x0f))
	}

	f.Fuzz(func(t *testing.T, control, data []byte, opts uint8) {
		h := &hostileRelay{control: control, data: data, enough: make(chan struct{})}
		cfg := Config{
			DisablePool:      opts&1 != 0,
			StartUnready:     opts&2 != 0,
			DisableReconnect: true,
			DialTimeout:      time.Second,
			WriteTimeout:     time.Second,
			Logger:           slog.New(slog.DiscardHandler),
			dial:             h.dial,
		}
		if opts&4 != 0 {
			cfg.Port, cfg.PortRequired = 8081, true
		}
		if opts&8 != 0 {
			cfg.Key = fuzzKey
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			ln, err := cfg.Listen(context.Background(), "relay.example:8080")
			if err != nil {
				return
			}
			ln.SetReady(opts&16 != 0)
			ln.Addr()
			ln.Status()
			for {
				c, err := ln.Accept()
				if err != nil {
					break // the relay's end closed: given up, with DisableReconnect
				}
				c.RemoteAddr()
				c.LocalAddr()
				c.Close()
			}
			ln.Close()
		}()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			t.Fatalf("the agent hangs on a relay that sent %q, then %q on data connections (opts %#x); goroutines:\n%s", control, data, opts, buf)
		}
		h.closeAll()
	})
}

var fuzzKey = ed25519.NewKeyFromSeed(make([]byte, ed25519.SeedSize))
