// Package cli holds what the three programs share: flag conventions, the
// secret from the environment, logging to stderr, usage errors and the
// announcement line.
package cli

import (
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"tcprelay/internal/proto"
	"tcprelay/internal/transport"
	"tcprelay/tunnel"
)

// Version is set at build time by the Makefile (-ldflags -X).
var Version = "dev"

// SecretEnv names the environment variable that holds the shared secret.
const SecretEnv = "RELAY_SECRET"

// Common are the flags every program has.
type Common struct {
	agent    bool // RELAYHOST RELAYPORT come first
	Name     string
	Args     string // the positional arguments, for the usage line
	About    string // one paragraph under the usage line
	FS       *flag.FlagSet
	secret   *string
	logLevel *string
	version  *bool
	slack    *time.Duration
}

// New creates the flag set with the common flags.
func New(name, args, about string) *Common {
	c := &Common{Name: name, Args: args, About: about, FS: flag.NewFlagSet(name, flag.ContinueOnError)}
	c.secret = c.FS.String("secret", "", "shared secret (default: the "+SecretEnv+" environment variable; empty means an open relay)")
	c.logLevel = c.FS.String("log-level", "info", "log level on stderr: debug, info, warn or error")
	c.version = c.FS.Bool("version", false, "print the version and exit")
	c.slack = c.FS.Duration("timer-slack", DefaultTimerSlack, "how late the kernel may fire this process's timers, to batch wakeups (Linux; 0: leave the kernel's, 50µs): the Go runtime's monitor thread otherwise wakes every 20µs while the process is busy")
	c.FS.Usage = func() {
		out := c.FS.Output()
		fmt.Fprintf(out, "usage: %s [flags] %s\n\n%s\n\n", name, args, about)
		if c.agent {
			fmt.Fprint(out, relayURLHelp)
		}
		fmt.Fprint(out, "flags:\n")
		c.FS.PrintDefaults()
	}
	return c
}

// Parse parses argv, handles -h and -version, checks that there are nargs
// positional arguments (or, for agents, one fewer: RELAYHOST:RELAYPORT in
// one), and returns them with the logger. Flags may come before, between or
// after the positional arguments ("--" ends the flags). It exits on -h
// (status 0), -version (0) and usage errors (2).
func (c *Common) Parse(argv []string, nargs int) ([]string, *slog.Logger) {
	// Help that was asked for goes to stdout (so it pipes into less);
	// usage after a mistake goes to stderr.
	c.FS.SetOutput(os.Stderr)
	for _, a := range argv {
		if a == "--" {
			break
		}
		if a == "-h" || a == "-help" || a == "--h" || a == "--help" {
			c.FS.SetOutput(os.Stdout)
		}
	}
	var args []string
	for {
		if err := c.FS.Parse(argv); err != nil {
			if err == flag.ErrHelp {
				os.Exit(0)
			}
			os.Exit(2) // the flag package already printed the error and usage
		}
		rest := c.FS.Args()
		if len(rest) == 0 {
			break
		}
		if consumed := argv[:len(argv)-len(rest)]; len(consumed) > 0 && consumed[len(consumed)-1] == "--" {
			args = append(args, rest...)
			break
		}
		args, argv = append(args, rest[0]), rest[1:]
	}
	if *c.version {
		fmt.Printf("%s %s\n", c.Name, Version)
		os.Exit(0)
	}
	if len(args) != nargs && !(c.agent && len(args) == nargs-1 && len(args) > 0 && hasPort(args[0])) {
		c.Usagef("%s", argCount(nargs, len(args), c.Args))
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*c.logLevel)); err != nil {
		c.Usagef("bad -log-level %q: want debug, info, warn or error", *c.logLevel)
	}
	if *c.slack < 0 {
		c.Usagef("bad -timer-slack %v: want 0 or more", *c.slack)
	}
	slackNote := applySlack(*c.slack)
	go newTrimmer(trimQuiet).trimForever(trimTick)
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	if slackNote != "" {
		log.Warn(slackNote)
	}
	return args, log
}

// DefaultTimerSlack is the -timer-slack of every program: 1 ms cut the CPU
// of the relay and ./expose per new connection by about a fifth on 2 cores,
// and halved their context switches (docs/PERFORMANCE.md). Nothing of
// theirs needs a timer closer than a few milliseconds.
const DefaultTimerSlack = time.Millisecond

// relayURLHelp is the agents' help on relay URLs.
const relayURLHelp = `A relay may also be given as a ws:// or wss:// URL, to reach it over
WebSocket where only HTTP gets through (a reverse proxy such as nginx in
front of the relay, a firewall that lets out only HTTPS); its port is the
URL's, else 80 (ws) or 443 (wss), and RELAYPORT may be left out:
  wss://relay.example.com/            TLS verified as -tls, -tls-ca or
                                      -tls-fingerprint say (default: the
                                      system's roots)
  ws://127.0.0.1:8080/                plain
WebSocket does not keep half-close: a client's half-close ends its
connection.

`

// hasPort reports whether every relay in a RELAYHOST argument names its
// port (a URL always does), so that RELAYPORT may be left out.
func hasPort(hosts string) bool {
	for _, h := range strings.Split(hosts, ",") {
		if strings.Contains(h, "://") {
			continue
		}
		if _, _, err := net.SplitHostPort(strings.TrimSpace(h)); err != nil {
			return false
		}
	}
	return true
}

// argCount says, in English, that got positional arguments came where want
// (named in names) were expected.
func argCount(want, got int, names string) string {
	plural := func(n int) string {
		if n == 1 {
			return "1 argument"
		}
		return strconv.Itoa(n) + " arguments"
	}
	if got == 0 {
		return fmt.Sprintf("missing arguments: want %s", names)
	}
	return fmt.Sprintf("expected %s (%s), got %d", plural(want), names, got)
}

// DurationOff defines a duration flag that also takes "off", which it
// stores as -1: the Config convention for "disabled".
func (c *Common) DurationOff(p *time.Duration, name string, value time.Duration, usage string) {
	*p = value
	c.FS.Var(offDuration{p}, name, usage)
}

type offDuration struct{ d *time.Duration }

func (o offDuration) String() string {
	switch {
	case o.d == nil || *o.d == 0:
		return ""
	case *o.d < 0:
		return "off"
	}
	return o.d.String()
}

func (o offDuration) Set(s string) error {
	if s == "off" {
		*o.d = -1
		return nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return errors.New("want a duration such as 10s, or off")
	}
	if d < 0 {
		return errors.New("want a duration such as 10s, or off; not a negative one")
	}
	*o.d = d
	return nil
}

// Size defines a flag of a size in bytes, written as a number of bytes or
// with a unit (KiB, MiB, GiB), or "off", which it stores as -1: the Config
// convention for "disabled".
func (c *Common) Size(p *int64, name string, value int64, usage string) {
	*p = value
	c.FS.Var(sizeFlag{p}, name, usage)
}

type sizeFlag struct{ n *int64 }

var sizeUnits = []struct {
	suffix string
	n      int64
}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"G", 1 << 30}, {"M", 1 << 20}, {"K", 1 << 10}, {"B", 1}}

func (f sizeFlag) String() string {
	switch {
	case f.n == nil || *f.n == 0:
		return ""
	case *f.n < 0:
		return "off"
	}
	for _, u := range sizeUnits[:3] {
		if *f.n >= u.n && *f.n%u.n == 0 {
			return strconv.FormatInt(*f.n/u.n, 10) + u.suffix
		}
	}
	return strconv.FormatInt(*f.n, 10)
}

func (f sizeFlag) Set(s string) error {
	if s == "off" {
		*f.n = -1
		return nil
	}
	num, mult := s, int64(1)
	for _, u := range sizeUnits {
		if v, ok := strings.CutSuffix(s, u.suffix); ok {
			num, mult = v, u.n
			break
		}
	}
	v, err := strconv.ParseInt(strings.TrimSpace(num), 10, 64)
	if err != nil || v < 0 {
		return errors.New("want a size such as 3MiB, 512KiB or 1048576, or off")
	}
	*f.n = v * mult
	return nil
}

// Fingerprint is the SHA-256 fingerprint of a DER certificate, in hex, as
// agents take it in -tls-fingerprint.
func Fingerprint(der []byte) string {
	sum := sha256.Sum256(der)
	return hex.EncodeToString(sum[:])
}

// AgentTLS registers the agents' TLS flags and returns a function that
// builds the tunnel's TLS configuration from them (nil: plain TCP).
func (c *Common) AgentTLS() func() (*tls.Config, error) {
	on := c.FS.Bool("tls", false, "connect to the relay over TLS, verifying its certificate against the system's roots")
	ca := c.FS.String("tls-ca", "", "PEM file of the CA that signed the relay's certificate (implies -tls)")
	pin := c.FS.String("tls-fingerprint", "", "trust only the relay certificate with this SHA-256 fingerprint, as the relay logs it (implies -tls)")
	return func() (*tls.Config, error) {
		switch {
		case *pin != "" && *ca != "":
			return nil, errors.New("-tls-fingerprint and -tls-ca exclude each other")
		case *pin != "":
			return tunnel.PinnedTLS(*pin)
		case *ca != "":
			pem, err := os.ReadFile(*ca)
			if err != nil {
				return nil, fmt.Errorf("-tls-ca: %w", err)
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("-tls-ca %s: no PEM certificate in it", *ca)
			}
			return &tls.Config{RootCAs: pool}, nil
		case *on:
			return &tls.Config{}, nil
		}
		return nil, nil
	}
}

// Secret is the -secret flag, else the environment variable.
func (c *Common) Secret() string {
	if *c.secret != "" {
		return *c.secret
	}
	return os.Getenv(SecretEnv)
}

// Usagef reports a bad command line and exits 2.
func (c *Common) Usagef(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "%s: %s\n", c.Name, fmt.Sprintf(format, a...))
	fmt.Fprintf(os.Stderr, "usage: %s [flags] %s (-h for help)\n", c.Name, c.Args)
	os.Exit(2)
}

// Fatal prints a one-line reason on stderr and exits 1.
func (c *Common) Fatal(err error) {
	fmt.Fprintf(os.Stderr, "%s: %v\n", c.Name, err)
	os.Exit(1)
}

// Port parses a TCP port number argument.
func Port(s string) (int, error) {
	p, err := strconv.Atoi(s)
	if err != nil || p < 1 || p > 65535 {
		return 0, fmt.Errorf("bad port %q: want a number from 1 to 65535", s)
	}
	return p, nil
}

// RelayAddrs reads RELAYHOST and RELAYPORT: one relay or several,
// comma-separated, each a host (an IPv6 address with or without brackets),
// host:port, or a ws:// or wss:// URL (see tunnel.Listen), with port the
// port of hosts without one ("" if each has its own).
func RelayAddrs(hosts, port string) ([]string, error) {
	var addrs []string
	for _, h := range strings.Split(hosts, ",") {
		h = strings.TrimSpace(h)
		if h == "" {
			return nil, fmt.Errorf("empty relay host in %q", hosts)
		}
		if strings.Contains(h, "://") {
			if _, _, err := transport.ParseRelay(h); err != nil {
				return nil, err
			}
			addrs = append(addrs, h)
			continue
		}
		host, p, err := net.SplitHostPort(h)
		if err != nil { // no port of its own
			host, p = strings.TrimSuffix(strings.TrimPrefix(h, "["), "]"), port
			if p == "" {
				return nil, fmt.Errorf("relay %q has no port: give RELAYPORT, or write it as HOST:PORT", h)
			}
		}
		if host == "" || strings.Contains(host, ":") && net.ParseIP(host) == nil {
			return nil, fmt.Errorf("bad relay host %q", h)
		}
		if _, err := Port(p); err != nil {
			return nil, fmt.Errorf("relay %q: %v", h, err)
		}
		addrs = append(addrs, net.JoinHostPort(host, p))
	}
	return addrs, nil
}

// Announce prints the line the relayed programs promise on stdout.
func Announce(w io.Writer, addr net.Addr) {
	fmt.Fprintf(w, "established relay address: %s\n", addr)
}

// PortRange parses LO-HI.
func PortRange(s string) (lo, hi int, err error) {
	a, b, ok := strings.Cut(s, "-")
	if !ok {
		return 0, 0, fmt.Errorf("bad port range %q: want LO-HI, e.g. 20000-29999", s)
	}
	if lo, err = Port(a); err != nil {
		return 0, 0, fmt.Errorf("bad port range %q: %v", s, err)
	}
	if hi, err = Port(b); err != nil {
		return 0, 0, fmt.Errorf("bad port range %q: %v", s, err)
	}
	if lo > hi {
		return 0, 0, fmt.Errorf("bad port range %q: %d > %d", s, lo, hi)
	}
	return lo, hi, nil
}

// Handler serves one relayed connection, in a goroutine of its own, and
// calls done once the connection has ended. It may return before that: a
// handler that hands its connection to a copier.Link returns at once, so an
// idle connection holds no goroutine.
type Handler func(c net.Conn, done func())

// Serve accepts from ln until it is closed, running handle for each conn.
// After the listener closes it waits up to drain for every connection to
// end. It returns nil if the listener was closed (by the
// caller, e.g. on a signal), else the Accept error.
func Serve(ln net.Listener, handle Handler, drain time.Duration, log *slog.Logger) error {
	var wg sync.WaitGroup
	var open atomic.Int64
	var err error
	for {
		var c net.Conn
		c, err = ln.Accept()
		if err != nil {
			break
		}
		wg.Add(1)
		open.Add(1)
		go handle(c, func() { open.Add(-1); wg.Done() })
	}
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	log.Info("stopped accepting: waiting for open connections", "open", open.Load(), "deadline", drain)
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(drain):
		log.Warn("drain deadline reached: exiting, which closes the connections still open", "open", open.Load())
	}
	return err
}

// Agent holds what the relayed programs (echoserver, expose) share: the
// flags -port, -key, -drain-timeout, -fail-fast, -proxy and the TLS flags, and the
// way they register with the relays and serve.
type Agent struct {
	c        *Common
	port     *int
	pool     *string
	hostname *string
	key      *string
	drain    *time.Duration
	failFast *bool
	proxy    *string
	allow    *string
	deny     *string
	tls      func() (*tls.Config, error)

	// Health, if set, checks that what the agent serves is up: nil, or why
	// not (the error names it). Run tells the relays what it finds
	// (tunnel.Listener.SetReady). HealthTarget names what it checks, for
	// the log.
	Health       func() error
	HealthTarget string
	// HealthEvery is how often Health is asked: always if HealthActive,
	// else (passive, the default) only while what the agent serves is down,
	// until it is up again. In both modes a failed dial (Down) makes the
	// agent unready at once. Zero or negative: Health is asked at start
	// only.
	HealthEvery  time.Duration
	HealthActive bool
	down         chan error
}

// Down says that the agent just failed to reach what it serves, with the
// error: the relays are told at once that it takes no new clients (in
// active mode, after Health agrees), and Health is asked every HealthEvery
// until it answers. It does not block.
func (a *Agent) Down(err error) {
	select {
	case a.down <- err:
	default:
	}
}

// HealthFlag registers -health-check: passive (the default), active, off,
// or a duration (active at that interval, as it used to be); and
// -health-interval. what names what is checked, in the help.
func (a *Agent) HealthFlag(what string) {
	a.HealthEvery = 3 * time.Second
	a.c.FS.Var(healthMode{a}, "health-check", "how the agent learns that "+what+" is down, so that the relays send new clients\n"+
		"to other members of its pool, or refuse them, while it is (`mode`): passive (a failed dial of\n"+
		what+" for a client makes the agent unready at once; "+what+" is then dialled every\n"+
		"-health-interval until it answers, and the agent is ready again), active (also dial it\n"+
		"every -health-interval while it is up: two lines in sshd's log each time), or off\n"+
		"(ready always). A duration means active at that interval")
	a.c.FS.DurationVar(&a.HealthEvery, "health-interval", a.HealthEvery, "how often "+what+" is dialled by the health check: while it is down, or always with -health-check active")
}

// healthMode is the value of -health-check.
type healthMode struct{ a *Agent }

func (h healthMode) String() string {
	switch {
	case h.a == nil:
		return ""
	case h.a.HealthEvery < 0:
		return "off"
	case h.a.HealthActive:
		return "active"
	}
	return "passive"
}

func (h healthMode) Set(s string) error {
	switch s {
	case "passive":
		h.a.HealthActive = false
	case "active":
		h.a.HealthActive = true
	case "off":
		h.a.HealthEvery = -1
	default:
		d, err := time.ParseDuration(s)
		if err != nil || d <= 0 {
			return errors.New("want passive, active, off, or a positive duration (active at that interval)")
		}
		h.a.HealthActive, h.a.HealthEvery = true, d
	}
	return nil
}

// HealthOff reports whether -health-check is off.
func (a *Agent) HealthOff() bool { return a.HealthEvery < 0 }

// Agent registers the agent flags; call it before Parse.
func (c *Common) Agent() *Agent {
	c.agent = true
	return &Agent{
		c:        c,
		port:     c.FS.Int("port", 0, "public port to ask every relay for (0: any, the same on every relay); the agent exits if no relay can give it; a relay that cannot while another can is logged at ERROR in its own words and asked again with backoff"),
		pool:     c.FS.String("pool", "", "join the pool `NAME`: every agent with the same pool name serves one public port, each client going to one of them (default: the port is this agent's alone)"),
		hostname: c.FS.String("hostname", "", "ask every relay for the `NAME` on its shared TLS port (relay -sni-addr, -sni-domain DOMAIN) instead of a port: NAME.DOMAIN, or NAME whole if it ends with DOMAIN; outside clients reach it with TLS and that server name on the shared port, and the relay passes their TLS through untouched, so the server behind the agent must speak TLS with a certificate for the name (excludes -port; default: a port)"),
		key:      c.FS.String("key", "", "Ed25519 private key `file` that identifies this agent to relays with an agents file (created, mode 0600, if missing)"),
		drain:    c.FS.Duration("drain-timeout", 5*time.Second, "on SIGINT/SIGTERM, how long open connections may finish"),
		failFast: c.FS.Bool("fail-fast", false, "exit at once if no relay can be reached at start, or the connection dies during the handshake, instead of retrying with backoff"),
		proxy: c.FS.String("proxy", "", "reach the relays through this proxy `URL`: http://HOST:PORT or https://HOST:PORT (HTTP CONNECT; https: TLS to the proxy), socks5://HOST:PORT or socks5h://HOST:PORT (SOCKS5), each with optional USER:PASSWORD@; every connection to a relay goes through it, and -tls runs end to end on top. "+
			"Default: the environment, as Go programs read it for https: HTTPS_PROXY, else ALL_PROXY, unless NO_PROXY lists the relay (never for localhost or a loopback address). "+
			"\"direct\": no proxy, whatever the environment says. A proxy that refuses the credentials (407, SOCKS5 auth) ends the agent like a refused secret; its other refusals are retried"),
		allow: c.FS.String("allow", "", "only outside clients from these `CIDRs` (comma-separated, e.g. 192.0.2.0/24,2001:db8::/32) may reach this agent: the relay closes the others when they connect; it narrows the relay's agents file (allow=), never widens it (default: anyone the relay lets in)"),
		deny:  c.FS.String("deny", "", "outside clients from these `CIDRs` (comma-separated) may not reach this agent: the relay closes them when they connect (default: none)"),
		tls:   c.AgentTLS(),
		down:  make(chan error, 1),
	}
}

// Relays reads the relay addresses off the positional arguments
// (RELAYHOST [RELAYPORT] ...) of a program that takes nargs of them, and
// returns them with the arguments that follow.
func (a *Agent) Relays(args []string, nargs int) (relays, rest []string) {
	port, rest := "", args[1:]
	if len(args) == nargs {
		port, rest = args[1], args[2:]
	}
	relays, err := RelayAddrs(args[0], port)
	if err != nil {
		a.c.Usagef("%v", err)
	}
	return relays, rest
}

// stillDownEvery bounds the "target still down" lines while it stays down.
const stillDownEvery = time.Minute

// watchHealth tells the relays when what the agent serves goes down and
// comes back, until ctx ends. Passive: it waits for Down, marks the agent
// unready at once, then asks Health every HealthEvery until it answers.
// Active: it asks Health every HealthEvery too, and after Down. While down
// it logs the error at most once per stillDownEvery.
func (a *Agent) watchHealth(ctx context.Context, ln *tunnel.Listener, downErr error, log *slog.Logger) {
	timer := time.NewTimer(a.HealthEvery)
	defer timer.Stop()
	var since, logged time.Time
	if downErr != nil {
		since, logged = time.Now(), time.Now()
	}
	for {
		if downErr == nil && !a.HealthActive {
			timer.Stop() // passive and up: nothing is dialled
		}
		var err error
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
			err = a.Health()
		case err = <-a.down:
			if downErr != nil {
				continue // known; the timer, still running, probes
			}
			if a.HealthActive {
				err = a.Health() // the check decides, as it always did
			}
		}
		switch {
		case err != nil && downErr == nil:
			since, logged = time.Now(), time.Now()
			log.Warn("target down: the relays send new clients to other members of the pool, or refuse them, until it answers",
				"target", a.HealthTarget, "err", err)
			ln.SetReady(false)
		case err != nil && time.Since(logged) >= stillDownEvery:
			logged = time.Now()
			log.Warn("target still down", "target", a.HealthTarget, "for", time.Since(since).Round(time.Second), "err", err)
		case err == nil && downErr != nil:
			log.Info("target up: taking clients again", "target", a.HealthTarget, "was_down_for", time.Since(since).Round(time.Second))
			ln.SetReady(true)
		}
		downErr = err
		if downErr != nil || a.HealthActive {
			timer.Reset(a.HealthEvery)
		}
	}
}

// Run registers with the relays, prints the announcement line on stdout for
// each registration (again after each reconnection), and runs handle for
// every relayed connection until SIGINT or SIGTERM; then it stops
// accepting and lets open connections drain. Fatal errors exit the program.
func (a *Agent) Run(relays []string, log *slog.Logger, handle Handler) {
	if *a.port < 0 || *a.port > 65535 {
		a.c.Usagef("-port %d: want 0 (any) or 1-65535", *a.port)
	}
	if h := *a.hostname; h != "" {
		if *a.port != 0 {
			a.c.Usagef("-hostname and -port exclude each other: a name's port is the relay's shared one")
		}
		if err := proto.CheckHostname(strings.TrimSuffix(strings.ToLower(h), ".")); err != nil {
			a.c.Usagef("-hostname: %v", err)
		}
	}
	tlsCfg, err := a.tls()
	if err != nil {
		a.c.Usagef("%v", err)
	}
	if p := *a.proxy; p != "" && p != transport.NoProxy {
		if _, err := transport.ParseProxy(p); err != nil {
			a.c.Usagef("-proxy: %v", err)
		}
	}
	var key ed25519.PrivateKey
	if *a.key != "" {
		var created bool
		if key, created, err = tunnel.LoadKey(*a.key); err != nil {
			a.c.Fatal(fmt.Errorf("-key: %w", err))
		}
		fmt.Fprintf(os.Stderr, "agent public key: %s\n", tunnel.PublicKey(key))
		if created {
			log.Info("created a new agent key", "file", *a.key)
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	allow, err := proto.ParsePrefixes(*a.allow)
	if err != nil {
		a.c.Usagef("-allow: %v", err)
	}
	deny, err := proto.ParsePrefixes(*a.deny)
	if err != nil {
		a.c.Usagef("-deny: %v", err)
	}
	cfg := tunnel.Config{
		Allow:        allow,
		Deny:         deny,
		Secret:       a.c.Secret(),
		Key:          key,
		Port:         *a.port,
		PortRequired: *a.port != 0, // a port asked for is never silently replaced
		Pool:         *a.pool,
		Hostname:     *a.hostname,
		TLS:          tlsCfg,
		Proxy:        *a.proxy,
		WaitForRelay: !*a.failFast,
		Agent:        a.c.Name + "/" + Version,
		Logger:       log,
		OnAddr:       func(addr net.Addr) { Announce(os.Stdout, addr) },
	}
	var downErr error
	if a.Health != nil {
		if downErr = a.Health(); downErr != nil {
			log.Warn("target down at start: registering unready; the relays send it no clients until it answers",
				"target", a.HealthTarget, "err", downErr)
		}
	}
	ready := downErr == nil
	cfg.StartUnready = !ready
	ln, err := cfg.Listen(ctx, relays...)
	if err != nil {
		if ctx.Err() != nil {
			return // a signal before any relay registered us
		}
		a.c.Fatal(err)
	}
	registered := 0
	for _, st := range ln.Status() {
		if st.Addr != nil {
			registered++
		}
	}
	log.Info("accepting relayed connections", "ready", ready, "relays", len(relays), "registered", registered)
	if a.Health != nil && a.HealthEvery > 0 {
		go a.watchHealth(ctx, ln, downErr, log)
	}
	context.AfterFunc(ctx, func() { ln.Close() })
	if err := Serve(ln, handle, *a.drain, log); err != nil {
		a.c.Fatal(err)
	}
}
