package e2e

// Issue 19: one public TLS port for every tunnel, routed by the server name
// (SNI) of each client's ClientHello. The relay only peeks at the
// ClientHello: the bytes reach the server behind the agent unchanged, and
// that server does its own TLS with its own certificate. These tests use
// real TLS servers (openssl s_server, nginx) and real clients (curl,
// openssl s_client), with certificates the test makes for itself.

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	pp "github.com/pires/go-proxyproto"

	"tcprelay/internal/child"
	"tcprelay/internal/testutil"
)

// sniDomain is the parent domain of every test relay's names.
const sniDomain = "tunnels.test"

// ---------------------------------------------------------------- certificates

// sniPKI is a test CA, as a PEM file and a pool, that signs leaf
// certificates for names.
type sniPKI struct {
	t      *testing.T
	dir    string
	caFile string
	pool   *x509.CertPool
	ca     *x509.Certificate
	caKey  *ecdsa.PrivateKey
	serial int64
}

// sniLeaf is a server certificate for one name, as PEM files and for Go.
type sniLeaf struct {
	name              string
	certFile, keyFile string
	cert              tls.Certificate
}

// newPKI makes a CA (ECDSA P-256) and writes it as ca.pem in a temporary
// directory.
func newPKI(t *testing.T) *sniPKI {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "tcprelay e2e CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		IsCA:                  true,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	p := &sniPKI{t: t, dir: t.TempDir(), ca: ca, caKey: key, pool: x509.NewCertPool(), serial: 1}
	p.pool.AddCert(ca)
	p.caFile = filepath.Join(p.dir, "ca.pem")
	writePEM(t, p.caFile, "CERTIFICATE", der)
	return p
}

// leaf makes a certificate for name (its common name and only DNS SAN),
// signed by the CA, and writes NAME.pem and NAME.key.
func (p *sniPKI) leaf(name string) sniLeaf {
	t := p.t
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p.serial++
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(p.serial),
		Subject:      pkix.Name{CommonName: name},
		DNSNames:     []string{name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca, &key.PublicKey, p.caKey)
	if err != nil {
		t.Fatal(err)
	}
	pkcs8, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	l := sniLeaf{name: name, certFile: filepath.Join(p.dir, name+".pem"), keyFile: filepath.Join(p.dir, name+".key")}
	writePEM(t, l.certFile, "CERTIFICATE", der)
	writePEM(t, l.keyFile, "PRIVATE KEY", pkcs8)
	l.cert, err = tls.LoadX509KeyPair(l.certFile, l.keyFile)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func writePEM(t *testing.T, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// ---------------------------------------------------------------- relay and agents

// sniRelay is a relay with a shared TLS port.
type sniRelay struct {
	*relay
	sni int // the shared port, on 127.0.0.1
}

// startSNIRelay starts `relay -sni-addr 127.0.0.1:SNI -sni-domain
// tunnels.test FLAGS PORT` on two free ports, retrying with new ones if
// either got taken, and waits until both accept.
func (e *env) startSNIRelay(env []string, flags ...string) *sniRelay {
	t := e.t
	t.Helper()
	for attempt := 1; attempt <= 5; attempt++ {
		sni := freePort(t)
		fl := append([]string{"-sni-addr", child.Addr(sni), "-sni-domain", sniDomain}, flags...)
		if r := e.tryRelay("127.0.0.1", freePort(t), env, fl); r != nil {
			sr := &sniRelay{relay: r, sni: sni}
			sr.waitSNI()
			return sr
		}
		t.Logf("attempt %d: a port got taken; retrying with new ports", attempt)
	}
	t.Fatal("relay: could not get two free ports in 5 attempts")
	return nil
}

// restartSNIRelay restarts old on the same ports and flags (see
// restartRelay) and waits until its shared port accepts.
func (e *env) restartSNIRelay(old *sniRelay) *sniRelay {
	e.t.Helper()
	sr := &sniRelay{relay: e.restartRelay(old.relay), sni: old.sni}
	sr.waitSNI()
	return sr
}

// waitSNI waits until the shared port accepts a connection (the relay may
// open it a moment after its control port). Each probe is a connection
// that sends nothing, which the relay may count and log as rejected.
func (r *sniRelay) waitSNI() {
	r.t.Helper()
	if !child.WaitFor(readyTimeout, func() bool { return child.TCPReady(r.sni) }) {
		r.t.Fatalf("the shared port 127.0.0.1:%d does not accept within %v; relay stderr:\n%s", r.sni, readyTimeout, r.Stderr)
	}
}

// fqdn is name under the test domain.
func fqdn(name string) string { return name + "." + sniDomain }

// startNamed starts an agent (bin with args, which end with RELAYHOST
// RELAYPORT [TARGET]) and checks that it announces exactly
// "established relay address: HOST:SNIPORT".
func (e *env) startNamed(bin string, r *sniRelay, host string, env []string, args ...string) *proc {
	e.t.Helper()
	p, port := e.startAgentWith(bin, args, host, env)
	if port != r.sni {
		e.t.Fatalf("%s announced %s:%d, want the shared port %d", p, host, port, r.sni)
	}
	return p
}

// refusedAgent runs an agent that must be refused: it exits non-zero with
// nothing on stdout. It returns the process, for its stderr.
func (e *env) refusedAgent(bin string, env []string, args ...string) *proc {
	t := e.t
	t.Helper()
	p := e.start(bin, args, procOpts{env: env})
	p.mustExit(20 * time.Second)
	if p.ExitCode() == 0 || p.Out() != "" {
		t.Fatalf("%s: %s, stdout %q, want a non-zero exit and no announcement; stderr:\n%s", p, p.Status(), p.Out(), p.Stderr)
	}
	t.Logf("%s: %s: %s", p, p.Status(), lastLine(p.Stderr.String()))
	return p
}

// notAllowed checks that a refused agent's stderr gives the relay's words
// for a name it may not have, naming the name and none of others (the
// holder), and returns those words with the name replaced by NAME, to
// compare refusals for different names.
func notAllowed(t *testing.T, p *proc, name string, others ...string) string {
	t.Helper()
	stderr := p.Stderr.String()
	var words string
	for _, l := range linesWith(stderr, "is not allowed for this agent") {
		words = l
	}
	if words == "" || !strings.Contains(words, name) {
		t.Errorf("%s: stderr does not say %s \"is not allowed for this agent\":\n%s", p, name, stderr)
	}
	for _, w := range others {
		if strings.Contains(stderr, w) {
			t.Errorf("%s: stderr names %q, which a refusal must not tell:\n%s", p, w, stderr)
		}
	}
	if _, after, ok := strings.Cut(words, "relay says: "); ok {
		words = after
	}
	words = strings.ReplaceAll(words, fqdn(name), "NAME")
	return regexp.MustCompile(`\b`+regexp.QuoteMeta(name)+`\b`).ReplaceAllString(words, "NAME")
}

// ---------------------------------------------------------------- clients and servers

// helloFor returns the first record a Go TLS client sends for name: a
// ClientHello with that server name.
func helloFor(t *testing.T, name string) []byte {
	t.Helper()
	c1, c2 := net.Pipe()
	defer c1.Close()
	defer c2.Close()
	go tls.Client(c1, &tls.Config{ServerName: name}).Handshake() // fails when c1 closes
	c2.SetReadDeadline(time.Now().Add(5 * time.Second))
	hdr := make([]byte, 5)
	if _, err := io.ReadFull(c2, hdr); err != nil {
		t.Fatalf("capture ClientHello: %v", err)
	}
	body := make([]byte, int(hdr[3])<<8|int(hdr[4]))
	if _, err := io.ReadFull(c2, body); err != nil {
		t.Fatalf("capture ClientHello: %v", err)
	}
	if hdr[0] != 0x16 || body[0] != 0x01 {
		t.Fatalf("captured record % x... is not a ClientHello", hdr)
	}
	return append(hdr, body...)
}

// helloRoute sends a ClientHello for name to the shared port, half-closes,
// and reads everything back. Behind the name must be taggedEcho: the
// answer is its tag and then the hello, byte for byte, which shows the
// relay passed the very bytes it peeked at. It returns the tag.
func helloRoute(t *testing.T, sni int, name string) (byte, error) {
	t.Helper()
	hello := helloFor(t, name)
	c, err := net.DialTimeout("tcp", child.Addr(sni), 5*time.Second)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(hello); err != nil {
		return 0, err
	}
	c.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(c)
	switch {
	case err != nil:
		return 0, fmt.Errorf("read after %d bytes: %w", len(got), err)
	case len(got) == 0:
		return 0, errors.New("closed with no byte")
	case !bytes.Equal(got[1:], hello):
		return got[0], fmt.Errorf("tag %q, then %d bytes that are not the %d-byte ClientHello sent", got[0], len(got)-1, len(hello))
	}
	return got[0], nil
}

// tlsEchoResult is what the TLS echo server saw on one connection.
type tlsEchoResult struct {
	n      int64
	sum    [sha256.Size]byte
	rawEOF bool // after the TLS close_notify, the TCP stream ended too
	err    error
}

// tlsEchoServer serves TLS with cert on a loopback port and echoes: it
// reads to the client's close_notify, echoing every byte, then checks the
// TCP stream ends there too (the client's half-close came through), sends
// its own close_notify and half-closes. The result of each connection
// that completed a handshake goes to the returned channel (buffered; a
// result that finds it full is dropped).
func tlsEchoServer(t *testing.T, cert tls.Certificate) (string, <-chan tlsEchoResult) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	results := make(chan tlsEchoResult, 64)
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}}
	testutil.Serve(t, ln, func(c net.Conn) {
		var res tlsEchoResult
		reported := true
		defer func() {
			if !reported {
				return
			}
			select {
			case results <- res:
			default:
			}
		}()
		c.SetDeadline(time.Now().Add(2 * time.Minute))
		tc := tls.Server(c, cfg)
		if err := tc.Handshake(); err != nil {
			reported = false // not a client: expose's check of its target, say
			return
		}
		h := sha256.New()
		buf := make([]byte, 64<<10)
		for {
			n, err := tc.Read(buf)
			h.Write(buf[:n])
			res.n += int64(n)
			if n > 0 {
				if _, werr := tc.Write(buf[:n]); werr != nil {
					res.err = fmt.Errorf("echo write: %w", werr)
					return
				}
			}
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				res.err = fmt.Errorf("read after %d bytes: %w", res.n, err)
				return
			}
		}
		h.Sum(res.sum[:0])
		if n, err := c.Read(make([]byte, 1)); n == 0 && errors.Is(err, io.EOF) {
			res.rawEOF = true
		} else {
			res.err = fmt.Errorf("after close_notify, the TCP stream gave %d bytes, %v; want EOF", n, err)
		}
		if err := tc.CloseWrite(); err != nil {
			res.err = fmt.Errorf("close_notify: %w", err)
			return
		}
		c.(*net.TCPConn).CloseWrite()
	})
	return ln.Addr().String(), results
}

// tlsEcho connects to addr (from the local address from, if set) as a TLS
// client of name trusting pool, sends data while reading the echo, sends
// close_notify and half-closes TCP, and checks that exactly data comes
// back, then close_notify, then the end of the TCP stream, all within d.
func tlsEcho(addr, from, name string, pool *x509.CertPool, data []byte, d time.Duration) error {
	dialer := net.Dialer{Timeout: d}
	if from != "" {
		dialer.LocalAddr = &net.TCPAddr{IP: net.ParseIP(from)}
	}
	raw, err := dialer.Dial("tcp", addr)
	if err != nil {
		return err
	}
	defer raw.Close()
	raw.SetDeadline(time.Now().Add(d))
	tc := tls.Client(raw, &tls.Config{ServerName: name, RootCAs: pool})
	if err := tc.Handshake(); err != nil {
		return fmt.Errorf("TLS handshake as %s: %w", name, err)
	}
	if got := tc.ConnectionState().PeerCertificates[0].Subject.CommonName; got != name {
		return fmt.Errorf("the server's certificate is for %q, want %q", got, name)
	}
	werr := make(chan error, 1)
	go func() {
		for off := 0; off < len(data); off += 256 << 10 {
			if _, err := tc.Write(data[off:min(off+256<<10, len(data))]); err != nil {
				werr <- fmt.Errorf("write at %d: %w", off, err)
				return
			}
		}
		if err := tc.CloseWrite(); err != nil {
			werr <- fmt.Errorf("close_notify: %w", err)
			return
		}
		werr <- raw.(*net.TCPConn).CloseWrite()
	}()
	h := sha256.New()
	n, rerr := io.Copy(h, tc) // nil at the server's close_notify
	if err := <-werr; err != nil {
		return err
	}
	if rerr != nil {
		return fmt.Errorf("read after %d of %d bytes: %w", n, len(data), rerr)
	}
	if want := sha256.Sum256(data); n != int64(len(data)) || !bytes.Equal(h.Sum(nil), want[:]) {
		return fmt.Errorf("%d bytes back (sha256 %x), want the %d sent (sha256 %x)", n, h.Sum(nil), len(data), want)
	}
	if k, err := raw.Read(make([]byte, 1)); k != 0 || !errors.Is(err, io.EOF) {
		return fmt.Errorf("after the server's close_notify, the TCP stream gave %d bytes, %v; want EOF", k, err)
	}
	return nil
}

// noBytesBack dials the shared port, sends first, and checks that the
// relay closes the connection within d without sending a byte. It returns
// how long the close took.
func noBytesBack(t *testing.T, sni int, first []byte, d time.Duration) time.Duration {
	t.Helper()
	c, err := net.DialTimeout("tcp", child.Addr(sni), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	if _, err := c.Write(first); err != nil {
		t.Fatalf("write %d bytes: %v", len(first), err)
	}
	c.SetReadDeadline(start.Add(d))
	n, err := c.Read(make([]byte, 4096))
	took := time.Since(start)
	var ne net.Error
	switch {
	case n > 0:
		t.Errorf("the relay sent %d bytes to a connection starting %q, want none", n, first[:min(len(first), 16)])
	case errors.As(err, &ne) && ne.Timeout():
		t.Errorf("the connection starting %q is still open after %v, want it closed at once", first[:min(len(first), 16)], d)
	case !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET):
		t.Errorf("reading a connection starting %q: %v, want EOF", first[:min(len(first), 16)], err)
	}
	return took
}

// startSServer starts `openssl s_server -www` on a free loopback port with
// leaf's certificate, and returns its port.
func (e *env) startSServer(openssl string, leaf sniLeaf) int {
	e.t.Helper()
	_, port := e.startService(openssl, func(port int) []string {
		return []string{"s_server", "-accept", child.Addr(port), "-cert", leaf.certFile, "-key", leaf.keyFile, "-www"}
	}, nil)
	return port
}

// startNginxTLS starts nginx in the foreground on a free loopback port,
// serving TLS with leaf's certificate and answering body to every
// request; its pid, temporary files and logs stay in a temporary
// directory (the logs on stderr).
func (e *env) startNginxTLS(leaf sniLeaf, body string) int {
	t := e.t
	t.Helper()
	bin := requireProgram(t, "nginx", "nginx")
	dir := t.TempDir()
	_, port := e.startService(bin, func(port int) []string {
		return nginxArgs(t, dir, port, fmt.Sprintf(`server {
        listen 127.0.0.1:%d ssl;
        server_name %s;
        ssl_certificate %s;
        ssl_certificate_key %s;
        location / {
            default_type text/plain;
            return 200 "%s\n";
        }
    }`, port, leaf.name, leaf.certFile, leaf.keyFile, body))
	}, nil)
	return port
}

// ---------------------------------------------------------------- tests

// TestSNIRealServersOnePort: openssl s_server and nginx, each with its own
// certificate, behind their own ./expose -hostname, are reached through
// the relay's one shared port by curl and openssl s_client, each at the
// name it asked for: the certificate each client verified is the one of
// the server behind that name, and so is the body it got. An unknown name
// gets no TLS handshake at all (the relay closes it without a byte, at
// once), nor does a client that does not speak TLS, and /metrics counts
// both.
func TestSNIRealServersOnePort(t *testing.T) {
	openssl := requireProgram(t, "openssl", "openssl")
	curl := requireProgram(t, "curl", "curl")
	requireProgram(t, "nginx", "nginx")
	e := newEnv(t)
	ca := newPKI(t)
	db, web := ca.leaf(fqdn("db")), ca.leaf(fqdn("web"))
	sserver := e.startSServer(openssl, db)
	const nginxBody = "served by nginx for web.tunnels.test"
	nginx := e.startNginxTLS(web, nginxBody)

	maddr := child.Addr(freePort(t))
	r := e.startSNIRelay(nil, "-metrics-addr", maddr, "-handshake-timeout", "10s")
	rp := strconv.Itoa(r.port)
	e.startNamed(exposeBin, r, db.name, nil, "-hostname", "db", "127.0.0.1", rp, child.Addr(sserver))
	e.startNamed(exposeBin, r, web.name, nil, "-hostname", "web", "127.0.0.1", rp, child.Addr(nginx))
	sni := strconv.Itoa(r.sni)

	// curl, each name resolved to the shared port: verified against the CA,
	// each sees its server's certificate and body.
	for _, c := range []struct {
		name, body string
	}{
		// s_server -www answers with its own command line: the path of
		// the certificate it was given.
		{db.name, db.certFile},
		{web.name, nginxBody},
	} {
		p := e.run(curl, []string{"-sS", "-v", "--max-time", "20", "--resolve", c.name + ":" + sni + ":127.0.0.1",
			"--cacert", ca.caFile, "https://" + c.name + ":" + sni + "/"}, nil)
		stderr := p.Stderr.String()
		if p.ExitCode() != 0 {
			t.Errorf("curl https://%s:%s/: %s, want exit status 0; stderr:\n%s", c.name, sni, p.Status(), stderr)
			continue
		}
		if !strings.Contains(stderr, "subject: CN="+c.name) || !strings.Contains(stderr, `matched cert's "`+c.name+`"`) ||
			!strings.Contains(stderr, "SSL certificate verify ok") {
			t.Errorf("curl https://%s:%s/ did not verify a certificate for %s; stderr:\n%s", c.name, sni, c.name, stderr)
		}
		if body := p.Out(); !strings.Contains(body, c.body) {
			t.Errorf("curl https://%s:%s/: body %q, want it to contain %q", c.name, sni, clip(body), c.body)
		}
		t.Logf("curl https://%s:%s/: %s", c.name, sni, strings.TrimSpace(strings.Join(linesWith(stderr, "subject:"), "")))
	}

	// openssl s_client, verifying the chain and the name, with no input:
	// a handshake and the certificate.
	for _, name := range []string{web.name, db.name} {
		p := e.run(openssl, []string{"s_client", "-connect", child.Addr(r.sni), "-servername", name,
			"-CAfile", ca.caFile, "-verify_return_error", "-verify_hostname", name}, []byte{})
		out := p.Out()
		if p.ExitCode() != 0 || !strings.Contains(out, "subject=CN = "+name) || !strings.Contains(out, "Verify return code: 0 (ok)") {
			t.Errorf("openssl s_client -servername %s: %s, want exit 0, subject CN = %s, verified; stdout:\n%s\nstderr:\n%s",
				name, p.Status(), name, clip(out), p.Stderr)
		}
	}
	// ... and with a request: nginx's body.
	p := e.run(openssl, []string{"s_client", "-quiet", "-connect", child.Addr(r.sni), "-servername", web.name,
		"-CAfile", ca.caFile, "-verify_return_error", "-verify_hostname", web.name},
		[]byte("GET / HTTP/1.0\r\nHost: "+web.name+"\r\n\r\n"))
	if !strings.Contains(p.Out(), "HTTP/1.1 200 OK") || !strings.Contains(p.Out(), nginxBody) {
		t.Errorf("openssl s_client -servername %s with a GET: %s, stdout:\n%s\nstderr:\n%s; want nginx's 200 and %q",
			web.name, p.Status(), clip(p.Out()), p.Stderr, nginxBody)
	}

	// An unknown name: no handshake, no byte, at once.
	unknown0 := metric(t, maddr, "tcprelay_sni_unknown_total")
	rejected0 := metric(t, maddr, "tcprelay_sni_rejected_total")
	nope := fqdn("nope")
	start := time.Now()
	p = e.run(curl, []string{"-sS", "-v", "--max-time", "20", "--resolve", nope + ":" + sni + ":127.0.0.1",
		"--cacert", ca.caFile, "https://" + nope + ":" + sni + "/"}, nil)
	took := time.Since(start)
	if p.ExitCode() == 0 || strings.Contains(p.Stderr.String(), "subject:") || took > 5*time.Second || p.Out() != "" {
		t.Errorf("curl https://%s:%s/: %s after %v, stdout %q; want a failure within 5s without a certificate; stderr:\n%s",
			nope, sni, p.Status(), took.Round(time.Millisecond), p.Out(), p.Stderr)
	}
	t.Logf("curl https://%s:%s/: %s after %v: %s", nope, sni, p.Status(), took.Round(time.Millisecond), lastLine(p.Stderr.String()))
	p = e.run(openssl, []string{"s_client", "-connect", child.Addr(r.sni), "-servername", nope, "-CAfile", ca.caFile}, []byte{})
	if p.ExitCode() == 0 || strings.Contains(p.Out(), "subject=") {
		t.Errorf("openssl s_client -servername %s: %s, want a failure without a certificate; stdout:\n%s", nope, p.Status(), clip(p.Out()))
	}
	if took := noBytesBack(t, r.sni, helloFor(t, nope), 5*time.Second); took > 2*time.Second {
		t.Errorf("a ClientHello for %s was closed after %v, want at once", nope, took)
	}
	// Not TLS at all: closed at once too.
	if took := noBytesBack(t, r.sni, []byte("GET / HTTP/1.0\r\nHost: "+db.name+"\r\n\r\n"), 5*time.Second); took > 2*time.Second {
		t.Errorf("an HTTP request on the shared port was closed after %v, want at once", took)
	}
	if n := metric(t, maddr, "tcprelay_sni_unknown_total") - unknown0; n != 3 {
		t.Errorf("tcprelay_sni_unknown_total went up by %d, want 3 (curl, s_client and a Go ClientHello for %s)", n, nope)
	}
	if n := metric(t, maddr, "tcprelay_sni_rejected_total") - rejected0; n != 1 {
		t.Errorf("tcprelay_sni_rejected_total went up by %d, want 1 (an HTTP request)", n)
	}
	// The named servers are still served.
	p = e.runOK(curl, []string{"-sS", "--max-time", "20", "--resolve", web.name + ":" + sni + ":127.0.0.1",
		"--cacert", ca.caFile, "https://" + web.name + ":" + sni + "/"}, nil)
	if !strings.Contains(p.Out(), nginxBody) {
		t.Errorf("curl https://%s/ after the unknown names: %q", web.name, p.Out())
	}
}

// TestSNINameOwnedByTenant: names belong to tenants like ports. With an
// agents file of alice (hosts=db), bob (any name), and carol and dave
// (hosts=*.team-a each): bob asking for alice's db is refused, without
// alice's name; alice asking for a name outside hosts=db is refused; dave
// is refused carol's api.team-a in the very words he is refused db,
// outside his scope, so a refusal does not tell which it was; bob gets
// another name, and a name already under the domain is taken whole; carol
// gets a name under her wildcard, in capitals and of two labels, but not
// the wildcard's parent; and each ClientHello, whatever the case of its
// name, reaches unchanged the agent that holds the name.
func TestSNINameOwnedByTenant(t *testing.T) {
	e := newEnv(t)
	aliceFile, aliceKey := e.agentKey("alice")
	bobFile, bobKey := e.agentKey("bob")
	carolFile, carolKey := e.agentKey("carol")
	daveFile, daveKey := e.agentKey("dave")
	agents := writeAgents(t, "", "alice "+aliceKey+" hosts=db\nbob "+bobKey+"\n"+
		"carol "+carolKey+" hosts=*.team-a\ndave "+daveKey+" hosts=*.team-a\n")
	r := e.startSNIRelay(nil, "-agents", agents)
	rp := strconv.Itoa(r.port)
	expose := func(key, hostname, want string, tag byte) {
		t.Helper()
		e.startNamed(exposeBin, r, want, nil, "-key", key, "-hostname", hostname, "127.0.0.1", rp, taggedEcho(t, tag))
	}
	refused := func(key, hostname string) *proc {
		t.Helper()
		return e.refusedAgent(echoBin, nil, "-key", key, "-hostname", hostname, "127.0.0.1", rp)
	}

	expose(aliceFile, "db", fqdn("db"), 'A')
	held := notAllowed(t, refused(bobFile, "db"), "db", "alice")
	scope := notAllowed(t, refused(aliceFile, "x"), "x")
	t.Logf("held by another: %q; outside the scope: %q", held, scope)
	expose(bobFile, "other", fqdn("other"), 'B')
	expose(bobFile, fqdn("whole"), fqdn("whole"), 'W') // not whole.tunnels.test.tunnels.test
	expose(carolFile, "API.Team-A", fqdn("api.team-a"), 'C')
	notAllowed(t, refused(carolFile, "team-a"), "team-a")
	notAllowed(t, refused(bobFile, "api.team-a"), "api.team-a", "carol")
	held = notAllowed(t, refused(daveFile, "api.team-a"), "api.team-a", "carol")
	if scope = notAllowed(t, refused(daveFile, "db"), "db", "alice"); held != scope {
		t.Errorf("dave is refused carol's name in other words than a name outside his scope, so he can tell it is held:\n  %s\n  %s", held, scope)
	}

	for _, c := range []struct {
		name string
		tag  byte
	}{{"db", 'A'}, {"other", 'B'}, {"whole", 'W'}, {"api.team-a", 'C'}, {"API.TEAM-A", 'C'}, {"DB", 'A'}} {
		tag, err := helloRoute(t, r.sni, fqdn(c.name))
		if err != nil || tag != c.tag {
			t.Errorf("a ClientHello for %s: tag %q, %v; want the agent tagged %q, and the hello unchanged", fqdn(c.name), tag, err, c.tag)
		}
	}
}

// TestSNINameBackAfterRelayRestart: a name is kept for its owner across a
// relay killed with SIGKILL and restarted on the same ports and state
// directory: another agent asking for it within the grace is refused, and
// the owner, reconnecting by itself, gets the same name back, and TLS
// clients reach its server again. With keys (another tenant is told the
// name is not allowed) and with the shared secret (the owner is the
// registration's resume token).
func TestSNINameBackAfterRelayRestart(t *testing.T) {
	for _, mode := range []string{"keys", "secret"} {
		t.Run(mode, func(t *testing.T) {
			e := newEnv(t)
			ca := newPKI(t)
			db := ca.leaf(fqdn("db"))
			target, _ := tlsEchoServer(t, db.cert)
			var env, flags, ownerArgs, thiefArgs []string
			if mode == "keys" {
				ownerFile, ownerKey := e.agentKey("alice")
				thiefFile, thiefKey := e.agentKey("bob")
				flags = []string{"-agents", writeAgents(t, "", "alice "+ownerKey+" hosts=db\nbob "+thiefKey+"\n")}
				ownerArgs, thiefArgs = []string{"-key", ownerFile}, []string{"-key", thiefFile}
			} else {
				env = []string{"RELAY_SECRET=one team"}
			}
			r := e.startSNIRelay(env, append(flags, "-state-dir", t.TempDir())...)
			rp := strconv.Itoa(r.port)
			owner := e.startNamed(exposeBin, r, db.name, env, append(ownerArgs, "-hostname", "db", "127.0.0.1", rp, target)...)
			if err := tlsEcho(child.Addr(r.sni), "", db.name, ca.pool, randomBytes(64<<10), 20*time.Second); err != nil {
				t.Fatalf("before the restart: %v", err)
			}

			// The owner is stopped so that the thief is sure to ask first.
			owner.signal(syscall.SIGSTOP)
			t.Cleanup(func() { owner.Cmd.Process.Signal(syscall.SIGCONT) })
			r.kill()
			r = e.restartSNIRelay(r)
			thief := e.refusedAgent(echoBin, env, append(thiefArgs, "-hostname", "db", "127.0.0.1", rp)...)
			if mode == "keys" {
				notAllowed(t, thief, "db", "alice")
			}

			owner.signal(syscall.SIGCONT)
			owner.expectLines(2)
			line, ok := owner.waitLine(2, 15*time.Second)
			if port, isAddr := child.AnnouncedPort(line, db.name); !ok || !isAddr || port != r.sni {
				t.Fatalf("%s after the restart: %q, want \"established relay address: %s:%d\"; stderr:\n%s\nrelay:\n%s",
					owner, line, db.name, r.sni, owner.Stderr, r.Stderr)
			}
			if err := tlsEcho(child.Addr(r.sni), "", db.name, ca.pool, randomBytes(256<<10), 20*time.Second); err != nil {
				t.Fatalf("after the restart: %v", err)
			}
		})
	}
}

// TestSNIHalfCloseAndLargeTransfer: a Go TLS client sends 32 MiB of random
// bytes through the shared port to a TLS echo server behind ./expose,
// reading the echo at the same time, then sends close_notify and
// half-closes TCP. The server sees every byte (by sha256), the
// close_notify and then the end of the TCP stream, and echoes on after
// it; the client gets every byte back, then the server's close_notify,
// then EOF.
func TestSNIHalfCloseAndLargeTransfer(t *testing.T) {
	e := newEnv(t)
	ca := newPKI(t)
	db := ca.leaf(fqdn("db"))
	target, results := tlsEchoServer(t, db.cert)
	r := e.startSNIRelay(nil)
	e.startNamed(exposeBin, r, db.name, nil, "-hostname", "db", "127.0.0.1", strconv.Itoa(r.port), target)

	const size = 32 << 20
	data := randomBytes(size)
	start := time.Now()
	if err := tlsEcho(child.Addr(r.sni), "", db.name, ca.pool, data, 90*time.Second); err != nil {
		t.Fatalf("32 MiB through the shared port: %v", err)
	}
	took := time.Since(start)
	select {
	case res := <-results:
		if res.err != nil || res.n != size || res.sum != sha256.Sum256(data) || !res.rawEOF {
			t.Errorf("the server saw %d bytes (sha256 %x), EOF after close_notify %v, err %v; want the %d sent (sha256 %x) and EOF",
				res.n, res.sum, res.rawEOF, res.err, size, sha256.Sum256(data))
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the TLS server reported no connection")
	}
	t.Logf("32 MiB each way through the shared port, half-closed, byte for byte (sha256 %x), in %v: %.0f MiB/s",
		sha256.Sum256(data), took.Round(time.Millisecond), float64(size)/(1<<20)/took.Seconds())
}

// TestSNISilentFloodNamedClientsServed: 2,000 connections from 40
// loopback addresses open the shared port and send nothing, held open,
// while 20 TLS clients of db.tunnels.test each complete a handshake and
// an echo within a bounded time: the silent ones take handshake budget,
// not the port. With the relay's budget for a limit of 20,000
// descriptors (2,000 handshakes, 62 a source), the flood fills it; with
// -max-fds 10000 (1,000 handshakes, 31 a source), it is twice the budget
// and past every source's cap, so the relay must close silent ones to
// make room for the clients.
func TestSNISilentFloodNamedClientsServed(t *testing.T) {
	const flood, clients = 2000, 20
	fdHeadroom(t, flood+500)
	for _, c := range []struct {
		name  string
		flags []string
	}{
		{"default budget", nil},
		{"budget half the flood", []string{"-max-fds", "10000"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			silentFlood(t, flood, clients, c.flags...)
		})
	}
}

// silentFlood is TestSNISilentFloodNamedClientsServed on a relay with
// flags.
func silentFlood(t *testing.T, flood, clients int, flags ...string) {
	e := newEnv(t)
	ca := newPKI(t)
	db := ca.leaf(fqdn("db"))
	target, _ := tlsEchoServer(t, db.cert)
	r := e.startSNIRelay(nil, append([]string{"-handshake-timeout", "1m"}, flags...)...)
	e.startNamed(exposeBin, r, db.name, nil, "-hostname", "db", "127.0.0.1", strconv.Itoa(r.port), target)

	start := time.Now()
	// Held until the test ends; dials that fail are counted, and the
	// flood stops dialing after a minute if the relay stops accepting.
	var silent []net.Conn
	t.Cleanup(func() {
		for _, c := range silent {
			c.Close()
		}
	})
	for i := 0; i < flood && time.Since(start) < time.Minute; i++ {
		d := net.Dialer{Timeout: time.Second, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 3, byte(i%40+2))}}
		if c, err := d.Dial("tcp", child.Addr(r.sni)); err == nil {
			silent = append(silent, c)
		}
	}
	held := len(silent)
	t.Logf("flood: %d of %d silent connections open in %v; the relay holds %d fds",
		held, flood, time.Since(start).Round(time.Millisecond), openFDs(r.Pid()))

	var wg sync.WaitGroup
	var mu sync.Mutex
	var slowest time.Duration
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			start := time.Now()
			if err := tlsEcho(child.Addr(r.sni), "", db.name, ca.pool, randomBytes(64<<10), 10*time.Second); err != nil {
				t.Errorf("client %d of %s during the flood: %v", i, db.name, err)
				return
			}
			mu.Lock()
			slowest = max(slowest, time.Since(start))
			mu.Unlock()
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.Logf("relay's last lines:\n%s", lastLines(r.Stderr.String(), 20))
	}
	closed := 0
	for _, c := range silent {
		c.SetReadDeadline(time.Now().Add(time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) {
			closed++
		}
	}
	t.Logf("%d TLS clients of %s served during the flood, the slowest in %v; the relay had closed %d of the %d silent connections",
		clients, db.name, slowest.Round(time.Millisecond), closed, held)
}

// TestSNISlowHelloClosedAtHandshakeTimeout: on the shared port, a
// connection that sends nothing, and one that sends a ClientHello a byte
// at a time, are both closed at -handshake-timeout after they connected
// (each byte does not buy more time), without a byte; a whole ClientHello
// that comes late but in time is served.
func TestSNISlowHelloClosedAtHandshakeTimeout(t *testing.T) {
	e := newEnv(t)
	r := e.startSNIRelay(nil, "-handshake-timeout", "1s")
	e.startNamed(exposeBin, r, fqdn("db"), nil, "-hostname", "db", "127.0.0.1", strconv.Itoa(r.port), taggedEcho(t, 'D'))
	hello := helloFor(t, fqdn("db"))

	closedAfter := func(what string, trickle bool) {
		t.Helper()
		c, err := net.DialTimeout("tcp", child.Addr(r.sni), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		start := time.Now()
		if trickle {
			go func() {
				for i := range hello[:len(hello)-1] { // never the whole hello
					if _, err := c.Write(hello[i : i+1]); err != nil {
						return
					}
					time.Sleep(50 * time.Millisecond)
				}
			}()
		}
		c.SetReadDeadline(start.Add(10 * time.Second))
		n, err := c.Read(make([]byte, 64))
		took := time.Since(start)
		if n != 0 || took < 900*time.Millisecond || took > 3*time.Second {
			t.Errorf("%s: closed after %v with %d bytes (%v), want closed with none 1s after connecting", what, took.Round(time.Millisecond), n, err)
		}
		t.Logf("%s: closed after %v (%v)", what, took.Round(time.Millisecond), err)
	}
	closedAfter("a silent connection", false)
	closedAfter("a ClientHello a byte every 50ms", true)

	c, err := net.DialTimeout("tcp", child.Addr(r.sni), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	time.Sleep(500 * time.Millisecond) // the client is slow, within the timeout: what this test is about
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write(hello)
	c.(*net.TCPConn).CloseWrite()
	if got, err := io.ReadAll(c); err != nil || len(got) == 0 || got[0] != 'D' || !bytes.Equal(got[1:], hello) {
		t.Errorf("a ClientHello sent 500ms after connecting: %d bytes back (%v), want the tag and the hello", len(got), err)
	}
}

// TestSNISharedPortAlone: the agents need no port but the shared one. On a
// relay with its own TLS (-tls-self-signed), ./expose and ./echoserver
// dial the shared port, pinned by fingerprint, and register their names
// through it: ss shows their every connection goes to the shared port (and
// expose's to its target), and their clients reach them through the same
// port. A TLS client that names the relay itself, or offers the ALPN
// protocol tcprelay, gets the relay's certificate there.
func TestSNISharedPortAlone(t *testing.T) {
	e := newEnv(t)
	ca := newPKI(t)
	db := ca.leaf(fqdn("db"))
	target, _ := tlsEchoServer(t, db.cert)
	r := e.startSNIRelay(nil, "-tls-self-signed", "-state-dir", t.TempDir())
	fp := fingerprint(t, r.relay)
	sni := strconv.Itoa(r.sni)
	ex := e.startNamed(exposeBin, r, db.name, nil, "-tls-fingerprint", fp, "-hostname", "db", "127.0.0.1", sni, target)
	es := e.startNamed(echoBin, r, fqdn("echo"), nil, "-tls-fingerprint", fp, "-hostname", "echo", "127.0.0.1", sni)

	for i := range 5 {
		if err := tlsEcho(child.Addr(r.sni), "", db.name, ca.pool, randomBytes(256<<10), 20*time.Second); err != nil {
			t.Fatalf("TLS client %d of %s through the shared port: %v", i, db.name, err)
		}
	}
	// echoserver echoes raw bytes: a ClientHello comes back as it went.
	if err := testutil.EchoCheck(child.Addr(r.sni), append(helloFor(t, fqdn("echo")), randomBytes(64<<10)...), 20*time.Second); err != nil {
		t.Errorf("a ClientHello for %s and 64 KiB: %v", fqdn("echo"), err)
	}
	onlyTo(t, ex, child.Addr(r.sni), target)
	onlyTo(t, es, child.Addr(r.sni))

	relayCert := func(what string, cfg *tls.Config) {
		t.Helper()
		cfg.InsecureSkipVerify = true
		d := &net.Dialer{Timeout: 5 * time.Second}
		c, err := tls.DialWithDialer(d, "tcp", child.Addr(r.sni), cfg)
		if err != nil {
			t.Errorf("%s: %v, want the relay's TLS", what, err)
			return
		}
		defer c.Close()
		if got := fmt.Sprintf("%x", sha256.Sum256(c.ConnectionState().PeerCertificates[0].Raw)); got != fp {
			t.Errorf("%s: a certificate with fingerprint %s, want the relay's %s", what, got, fp)
		}
	}
	relayCert("a ClientHello for "+sniDomain, &tls.Config{ServerName: sniDomain})
	relayCert("a ClientHello with ALPN tcprelay and no name", &tls.Config{NextProtos: []string{"tcprelay"}})
}

// TestSNIBehindHAProxy: haproxy in TCP mode, with send-proxy (v1) and
// send-proxy-v2, in front of the shared port, and a relay that trusts it
// (-proxy-protocol-from): the relay reads the PROXY header, then the
// ClientHello, and routes by name. A TLS client bound to 127.0.0.3 reaches
// a TLS server behind ./expose -proxy-protocol v1, which reads the header
// expose sends and reports the client's address: the client's own, not
// haproxy's. The access log records it too.
func TestSNIBehindHAProxy(t *testing.T) {
	requireProgram(t, "haproxy", "haproxy")
	for _, send := range []string{"send-proxy", "send-proxy-v2"} {
		t.Run(send, func(t *testing.T) {
			e := newEnv(t)
			ca := newPKI(t)
			db := ca.leaf(fqdn("db"))
			inner, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			testutil.Serve(t, tls.NewListener(&pp.Listener{Listener: inner}, &tls.Config{Certificates: []tls.Certificate{db.cert}}), func(c net.Conn) {
				c.SetDeadline(time.Now().Add(20 * time.Second))
				io.WriteString(c, c.RemoteAddr().String())
				c.(*tls.Conn).CloseWrite()
				io.Copy(io.Discard, c)
			})
			accessLog := filepath.Join(t.TempDir(), "access.log")
			r := e.startSNIRelay(nil, "-proxy-protocol-from", "127.0.0.1/32", "-access-log", accessLog)
			e.startNamed(exposeBin, r, db.name, nil, "-proxy-protocol", "v1", "-hostname", "db", "127.0.0.1", strconv.Itoa(r.port), inner.Addr().String())
			lb := e.startHAProxy("", fmt.Sprintf("  server relay1 127.0.0.1:%d %s\n", r.sni, send))

			var clients []string
			for range 3 {
				d := &net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.3")}}
				c, err := tls.DialWithDialer(d, "tcp", child.Addr(lb), &tls.Config{ServerName: db.name, RootCAs: ca.pool})
				if err != nil {
					t.Fatalf("TLS client from 127.0.0.3 through haproxy: %v", err)
				}
				c.SetDeadline(time.Now().Add(20 * time.Second))
				got, err := io.ReadAll(c)
				c.Close()
				me := c.LocalAddr().String()
				if err != nil || string(got) != me {
					t.Errorf("the server behind the name saw the client as %q (%v), want %s", got, err, me)
				}
				clients = append(clients, me)
			}
			r.stop()
			seen := map[string]bool{}
			for _, rec := range readAccessLog(t, accessLog) {
				client, _ := rec["client"].(string)
				seen[client] = true
				if in, _ := rec["bytes_in"].(float64); rec["event"] == "connection" && strings.HasPrefix(client, "127.0.0.1:") && in > 0 {
					t.Errorf("the access log has a relayed connection from haproxy's address: %v", rec)
				}
			}
			for _, c := range clients {
				if !seen[c] {
					t.Errorf("the access log has no line for the client %s; it has %v", c, seen)
				}
			}
		})
	}
}

// TestSNINameInStatusAndReady: a name-routed endpoint shows its name in
// /status and `relay ctl endpoints`, and /ready/NAME on the metrics
// address answers 200 while its agent is there, 503 while `relay ctl
// drain NAME` holds its clients off (200 again after resume), 503 once
// its agent has left (the name is then only reserved), and 503 for a name
// nobody holds.
func TestSNINameInStatusAndReady(t *testing.T) {
	e := newEnv(t)
	dir := t.TempDir()
	token := filepath.Join(dir, "token")
	os.WriteFile(token, []byte("an-admin-token-of-some-length\n"), 0o600)
	keyFile, key := e.agentKey("alice")
	maddr, aaddr := child.Addr(freePort(t)), child.Addr(freePort(t))
	r := e.startSNIRelay(nil, "-agents", writeAgents(t, "", "alice "+key+"\n"), "-metrics-addr", maddr,
		"-admin-addr", aaddr, "-admin-token-file", token)
	db := fqdn("db")
	agent := e.startNamed(exposeBin, r, db, nil, "-key", keyFile, "-hostname", "db", "127.0.0.1", strconv.Itoa(r.port), taggedEcho(t, 'D'))

	if s := opsGet(t, maddr, "/status"); !strings.Contains(s, db) {
		t.Errorf("/status does not name %s:\n%s", db, s)
	}
	var ctl *proc
	if !child.WaitFor(5*time.Second, func() bool {
		ctl = e.run(relayBin, []string{"ctl", "-addr", aaddr, "-token-file", token, "endpoints"}, nil)
		return ctl.ExitCode() == 0
	}) || !strings.Contains(ctl.Out(), db) {
		t.Errorf("relay ctl endpoints: %s, does not name %s:\n%s%s", ctl.Status(), db, ctl.Out(), ctl.Stderr)
	}
	ready := func(name string) int { return httpStatus(t, "http://"+maddr+"/ready/"+name) }
	if code := ready(db); code != 200 {
		t.Errorf("/ready/%s with its agent there: %d, want 200 (/ready/db: %d)", db, code, ready("db"))
	}
	if code := ready(fqdn("nope")); code != 503 {
		t.Errorf("/ready/%s, a name nobody holds: %d, want 503", fqdn("nope"), code)
	}
	// Drained by name: its clients are closed, its check says 503; resumed,
	// both come back.
	ctlOK := func(args ...string) {
		t.Helper()
		p := e.run(relayBin, append([]string{"ctl", "-addr", aaddr, "-token-file", token}, args...), nil)
		if p.ExitCode() != 0 {
			t.Errorf("relay ctl %s: %s; stderr:\n%s", strings.Join(args, " "), p.Status(), p.Stderr)
		}
	}
	ctlOK("drain", db)
	if tag, err := helloRoute(t, r.sni, db); err == nil {
		t.Errorf("a ClientHello for %s while it drains reached its agent (tag %q)", db, tag)
	}
	if code := ready(db); code != 503 {
		t.Errorf("/ready/%s while it drains: %d, want 503", db, code)
	}
	ctlOK("resume", "db")
	if tag, err := helloRoute(t, r.sni, db); err != nil || tag != 'D' {
		t.Errorf("a ClientHello for %s after resume: tag %q, %v", db, tag, err)
	}
	if code := ready(db); code != 200 {
		t.Errorf("/ready/%s after resume: %d, want 200", db, code)
	}
	agent.stop()
	var code int
	if !child.WaitFor(5*time.Second, func() bool { code = ready(db); return code == 503 }) {
		t.Errorf("/ready/%s after its agent left: %d, want 503", db, code)
	}
}

// TestSNIBadInputs: the relay's -sni-addr and -sni-domain go together and
// the domain must be a domain name (else a usage error, exit 2, saying
// which); an agent asking for a name that is not a host name is refused,
// with a message that names it, and so is one that asks for a name and a
// port, and one that asks a relay without a shared port for a name.
func TestSNIBadInputs(t *testing.T) {
	e := newEnv(t)
	addr := child.Addr(freePort(t))
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"-sni-addr", addr, "1234"}, "-sni-domain"},
		{[]string{"-sni-domain", sniDomain, "1234"}, "-sni-addr"},
		{[]string{"-sni-addr", addr, "-sni-domain", "a b", "1234"}, "sni-domain"},
	} {
		p := e.start(relayBin, c.args, procOpts{})
		p.mustExit(10 * time.Second)
		// The first line is the error; the usage line follows.
		first := strings.SplitN(p.Stderr.String(), "\n", 2)[0]
		if p.ExitCode() != 2 || !strings.HasPrefix(first, "relay: ") || !strings.Contains(first, c.want) ||
			strings.Contains(first, "not defined") || strings.Contains(p.Stderr.String(), "panic") {
			t.Errorf("%s: %s, stderr:\n%s\nwant exit status 2 and a first line \"relay: ...\" naming %s", p, p.Status(), p.Stderr, c.want)
		}
		t.Logf("%s: %s: %s", p, p.Status(), first)
	}

	r := e.startSNIRelay(nil)
	for _, bin := range []string{echoBin, exposeBin} {
		args := []string{"-hostname", "bad name!", "127.0.0.1", strconv.Itoa(r.port)}
		if bin == exposeBin {
			args = append(args, taggedEcho(t, 'X'))
		}
		p := e.refusedAgent(bin, nil, args...)
		if !strings.Contains(p.Stderr.String(), "bad name!") {
			t.Errorf("%s: stderr does not name the bad name:\n%s", p, p.Stderr)
		}
		// A name's port is the shared one: -port with it is a usage error.
		args = append([]string{"-hostname", "db", "-port", strconv.Itoa(r.port + 1)}, args[2:]...)
		p = e.refusedAgent(bin, nil, args...)
		if first := strings.SplitN(p.Stderr.String(), "\n", 2)[0]; p.ExitCode() != 2 || !strings.Contains(first, "-hostname") || !strings.Contains(first, "-port") {
			t.Errorf("%s: %s, stderr:\n%s\nwant exit status 2 and a first line naming -hostname and -port", p, p.Status(), p.Stderr)
		}
	}

	// A relay without a shared port has no names to give, and says why.
	plain := e.startRelay(nil)
	p := e.refusedAgent(echoBin, nil, "-hostname", "db", "127.0.0.1", strconv.Itoa(plain.port))
	if !strings.Contains(p.Stderr.String(), "-sni-addr") {
		t.Errorf("%s against a relay without -sni-addr: stderr does not say what it lacks:\n%s", p, p.Stderr)
	}
}

// scalingHAProxy returns the haproxy configuration of docs/SCALING.md's
// section "A fleet behind one 443": its code block that starts "global".
func scalingHAProxy(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "docs", "SCALING.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, sec, ok := strings.Cut(string(b), "\n## A fleet behind one 443\n")
	if !ok {
		t.Fatal(`docs/SCALING.md has no section "## A fleet behind one 443"`)
	}
	sec, _, _ = strings.Cut(sec, "\n## ")
	_, cfg, ok := strings.Cut(sec, "```\nglobal\n")
	if !ok {
		t.Fatal(`docs/SCALING.md, "A fleet behind one 443": no code block starting "global"`)
	}
	cfg, _, _ = strings.Cut(cfg, "```\n")
	return "global\n" + cfg
}

// TestSNIFleetDocHAProxy: the haproxy configuration of docs/SCALING.md's
// fleet behind one 443 is valid (haproxy -c), and works as written, with
// only its addresses and ports changed: three relays on 127.0.0.1-3, each
// with its shared port and -proxy-protocol-from, and agents for db and web
// registered with all three. TLS clients of db (its own backend, checked
// by /ready/db...) and of web (the default backend) are served through
// haproxy; once relay 2 is killed, haproxy's checks take it out and every
// client is served again.
func TestSNIFleetDocHAProxy(t *testing.T) {
	haproxy := requireProgram(t, "haproxy", "haproxy")
	const domain = "tunnels.example.com"
	doc := scalingHAProxy(t)
	dir := t.TempDir()
	orig := filepath.Join(dir, "as-documented.cfg")
	if err := os.WriteFile(orig, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	e := newEnv(t)
	if p := e.run(haproxy, []string{"-c", "-f", orig}, nil); p.ExitCode() != 0 {
		t.Fatalf("haproxy -c -f (docs/SCALING.md's configuration): %s\n%s%s", p.Status(), p.Out(), p.Stderr)
	}

	ca := newPKI(t)
	db, web := ca.leaf("db."+domain), ca.leaf("web."+domain)
	dbTarget, _ := tlsEchoServer(t, db.cert)
	webTarget, _ := tlsEchoServer(t, web.cert)

	// Three relays, on the same ports of three loopback addresses, as
	// three machines would be.
	ctl, sni, mport := freePort(t), freePort(t), freePort(t)
	var relays []*relay
	var hosts []string
	for i := 1; i <= 3; i++ {
		ip := fmt.Sprintf("127.0.0.%d", i)
		addr := func(port int) string { return net.JoinHostPort(ip, strconv.Itoa(port)) }
		r := e.tryRelay(ip, ctl, nil, []string{"-sni-addr", addr(sni), "-sni-domain", domain,
			"-metrics-addr", addr(mport), "-proxy-protocol-from", "127.0.0.0/8"})
		if r == nil {
			t.Fatalf("relay %d: a port got taken", i)
		}
		if !child.WaitFor(readyTimeout, func() bool {
			c, err := net.DialTimeout("tcp", addr(sni), 200*time.Millisecond)
			if err == nil {
				c.Close()
			}
			return err == nil
		}) {
			t.Fatalf("relay %d: its shared port %s does not accept", i, addr(sni))
		}
		relays = append(relays, r)
		hosts = append(hosts, addr(ctl))
	}
	for _, a := range []struct {
		name, target string
	}{{"db", dbTarget}, {"web", webTarget}} {
		host := a.name + "." + domain
		p, port := e.startAgentWith(exposeBin, []string{"-hostname", a.name, strings.Join(hosts, ","), strconv.Itoa(ctl), a.target}, host, nil)
		p.expectLines(3)
		last, ok := p.waitLine(3, announceTimeout)
		if n, isAddr := child.AnnouncedPort(last, host); port != sni || !ok || !isAddr || n != sni {
			t.Fatalf("%s: announced port %d, then %q; want %s:%d from each of the three relays", p, port, last, host, sni)
		}
	}

	cfg := filepath.Join(dir, "haproxy.cfg")
	_, lb := e.startService(haproxy, func(port int) []string {
		c := doc
		for old, new := range map[string]string{
			"bind :443":       "bind " + child.Addr(port),
			"192.0.2.1:443":   net.JoinHostPort("127.0.0.1", strconv.Itoa(sni)),
			"192.0.2.2:443":   net.JoinHostPort("127.0.0.2", strconv.Itoa(sni)),
			"192.0.2.3:443":   net.JoinHostPort("127.0.0.3", strconv.Itoa(sni)),
			"check port 9090": "check port " + strconv.Itoa(mport),
		} {
			if !strings.Contains(c, old) {
				t.Fatalf("docs/SCALING.md's haproxy configuration no longer has %q, which this test replaces", old)
			}
			c = strings.ReplaceAll(c, old, new)
		}
		if err := os.WriteFile(cfg, []byte(c), 0o600); err != nil {
			t.Fatal(err)
		}
		return []string{"-db", "-f", cfg}
	}, nil)

	clients := func(what string, n int) error {
		for i := range n {
			for _, leaf := range []sniLeaf{db, web} {
				if err := tlsEcho(child.Addr(lb), "", leaf.name, ca.pool, randomBytes(16<<10), 10*time.Second); err != nil {
					return fmt.Errorf("%s: client %d of %s through haproxy: %w", what, i, leaf.name, err)
				}
			}
		}
		return nil
	}
	// haproxy's first checks may still be running: wait for one round
	// to pass, then every client must be served.
	var err error
	child.WaitFor(10*time.Second, func() bool { err = clients("at start", 3); return err == nil })
	if err == nil {
		err = clients("three relays", 30)
	}
	if err != nil {
		t.Fatal(err)
	}

	relays[1].kill()
	start := time.Now()
	if !child.WaitFor(15*time.Second, func() bool { err = clients("relay 2 killed", 6); return err == nil }) {
		t.Fatalf("15 s after relay 2 was killed, clients still fail: %v", err)
	}
	t.Logf("relay 2 killed: clients all served again after %v", time.Since(start).Round(time.Millisecond))
	if err := clients("relay 2 out", 30); err != nil {
		t.Fatal(err)
	}
}

// docCommands returns the command lines in the code blocks of a section of
// a doc (from its heading to the next of the same level) that start with
// one of prefixes, backslash continuations joined, split into words.
func docCommands(t *testing.T, doc, heading string, prefixes ...string) [][]string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "docs", doc))
	if err != nil {
		t.Fatal(err)
	}
	_, sec, ok := strings.Cut(string(b), "\n"+heading+"\n")
	if !ok {
		t.Fatalf("docs/%s has no section %q", doc, heading)
	}
	level := heading[:strings.Index(heading, " ")+1]
	sec, _, _ = strings.Cut(sec, "\n"+level)
	sec = strings.ReplaceAll(sec, "\\\n", " ")
	var cmds [][]string
	for _, line := range strings.Split(sec, "\n") {
		for _, p := range prefixes {
			if strings.HasPrefix(line, p) {
				cmds = append(cmds, strings.Fields(line))
			}
		}
	}
	return cmds
}

// TestSNIDocsUseRealFlags: the relay and agent command lines of the docs'
// sections on names (INTEGRATING.md, SCALING.md) use flags the programs
// accept, with values they parse: each runs with its positional
// arguments replaced by -version.
func TestSNIDocsUseRealFlags(t *testing.T) {
	e := newEnv(t)
	var n int
	for _, d := range []struct {
		doc, heading string
		prefixes     []string
	}{
		{"INTEGRATING.md", "## One port for every tunnel: names on 443", []string{"./relay ", "./expose "}},
		{"SCALING.md", "## A fleet behind one 443", []string{"relay ", "expose "}},
	} {
		for _, words := range docCommands(t, d.doc, d.heading, d.prefixes...) {
			bin, positional := relayBin, 1
			if strings.HasSuffix(words[0], "expose") {
				bin, positional = exposeBin, 3
			}
			args := append(words[1:len(words)-positional:len(words)-positional], "-version")
			p := e.run(bin, args, nil)
			if p.ExitCode() != 0 {
				t.Errorf("docs/%s: %s: %s with -version for its positional arguments: %s; stderr:\n%s",
					d.doc, strings.Join(words, " "), filepath.Base(bin), p.Status(), p.Stderr)
			}
			n++
		}
	}
	if n < 4 {
		t.Errorf("found %d relay and expose command lines in the docs' sections on names, want at least 4", n)
	}
}

// TestSNIUnknownNamesLogQuietly: 200 ClientHellos for names nobody holds
// and 200 connections that are not TLS, one after the other, are each
// closed without a byte and counted one by one in /metrics, while the
// relay's log, rate-limited, gains only a few lines: a scan of names
// cannot flood it.
func TestSNIUnknownNamesLogQuietly(t *testing.T) {
	const n = 200
	e := newEnv(t)
	maddr := child.Addr(freePort(t))
	r := e.startSNIRelay(nil, "-metrics-addr", maddr)
	e.startNamed(exposeBin, r, fqdn("db"), nil, "-hostname", "db", "127.0.0.1", strconv.Itoa(r.port), taggedEcho(t, 'D'))
	unknown0 := metric(t, maddr, "tcprelay_sni_unknown_total")
	rejected0 := metric(t, maddr, "tcprelay_sni_rejected_total")
	lines0 := strings.Count(r.Stderr.String(), "\n")

	for i := range n {
		noBytesBack(t, r.sni, helloFor(t, fqdn(fmt.Sprintf("scan%d", i))), 5*time.Second)
		noBytesBack(t, r.sni, []byte(fmt.Sprintf("GET /%d HTTP/1.0\r\n\r\n", i)), 5*time.Second)
	}
	if t.Failed() {
		return
	}
	if got := metric(t, maddr, "tcprelay_sni_unknown_total") - unknown0; got != n {
		t.Errorf("tcprelay_sni_unknown_total went up by %d, want %d", got, n)
	}
	if got := metric(t, maddr, "tcprelay_sni_rejected_total") - rejected0; got != n {
		t.Errorf("tcprelay_sni_rejected_total went up by %d, want %d", got, n)
	}
	// The limiter writes at most a line a second for each kind of event,
	// with the count of those since (count=N): wait for its last lines,
	// until the counts add up to every connection.
	var lines string
	child.WaitFor(3*time.Second, func() bool {
		lines = strings.Join(strings.Split(r.Stderr.String(), "\n")[lines0:], "\n")
		return counted(lines) >= 2*n
	})
	if got := strings.Count(lines, "\n"); got == 0 || got > 12 {
		t.Errorf("the relay logged %d lines for %d unknown names and %d connections that were not TLS, want a few (1 to 12):\n%s", got, n, n, clip(lines))
	}
	t.Logf("the relay's log for %d unknown names and %d not TLS:\n%s", n, n, lines)
	if tag, err := helloRoute(t, r.sni, fqdn("db")); err != nil || tag != 'D' {
		t.Errorf("db after the scan: tag %q, %v", tag, err)
	}
}

// TestSNINameGrace: a name whose agent died (SIGKILL) stays its owner's
// for -port-grace, as a port does: another tenant is refused it until
// then, and gets it after.
func TestSNINameGrace(t *testing.T) {
	const grace = 2 * time.Second
	e := newEnv(t)
	aliceFile, aliceKey := e.agentKey("alice")
	bobFile, bobKey := e.agentKey("bob")
	r := e.startSNIRelay(nil, "-agents", writeAgents(t, "", "alice "+aliceKey+"\nbob "+bobKey+"\n"), "-port-grace", grace.String())
	rp := strconv.Itoa(r.port)
	db := fqdn("db")
	alice := e.startNamed(exposeBin, r, db, nil, "-key", aliceFile, "-hostname", "db", "127.0.0.1", rp, taggedEcho(t, 'A'))
	alice.kill()
	died := time.Now()
	bob := e.refusedAgent(echoBin, nil, "-key", bobFile, "-fail-fast", "-hostname", "db", "127.0.0.1", rp)
	if time.Since(died) < grace {
		notAllowed(t, bob, "db", "alice")
	} else {
		t.Fatalf("bob's refusal took longer than the grace (%v): the test proves nothing", grace)
	}
	if tag, err := helloRoute(t, r.sni, db); err == nil {
		t.Errorf("a ClientHello for %s while it is reserved reached an agent (tag %q), want it closed", db, tag)
	}
	// After the grace: bob's.
	var p *proc
	var port int
	if !child.WaitFor(grace+5*time.Second, func() bool {
		if time.Since(died) < grace {
			return false
		}
		p = e.start(exposeBin, []string{"-key", bobFile, "-hostname", "db", "127.0.0.1", rp, taggedEcho(t, 'B')},
			procOpts{scanStdout: true, daemon: true})
		line, err := p.FirstLine(announceTimeout)
		if err != nil {
			p.ended()
			return false
		}
		port, _ = child.AnnouncedPort(line, db)
		return true
	}) || port != r.sni {
		t.Fatalf("bob did not get %s within 5s of the end of the grace (port %d); relay:\n%s", db, port, lastLines(r.Stderr.String(), 10))
	}
	t.Logf("bob got %s %v after alice died", db, time.Since(died).Round(time.Millisecond))
	if tag, err := helloRoute(t, r.sni, db); err != nil || tag != 'B' {
		t.Errorf("a ClientHello for %s after the grace: tag %q, %v; want bob's agent", db, tag, err)
	}
}

// TestSNIPoolWithName: two ./expose on the same pool and name serve the
// name together, as a pool serves a port: ClientHellos for the name reach
// both, and once one is killed, every one reaches the other.
func TestSNIPoolWithName(t *testing.T) {
	e := newEnv(t)
	r := e.startSNIRelay(nil)
	rp := strconv.Itoa(r.port)
	web := fqdn("web")
	a := e.startNamed(exposeBin, r, web, nil, "-pool", "web", "-hostname", "web", "127.0.0.1", rp, taggedEcho(t, 'A'))
	e.startNamed(exposeBin, r, web, nil, "-pool", "web", "-hostname", "web", "127.0.0.1", rp, taggedEcho(t, 'B'))
	seen := map[string]int{}
	for range 40 {
		tag, err := helloRoute(t, r.sni, web)
		if err != nil {
			t.Fatalf("a ClientHello for %s: %v", web, err)
		}
		seen[string(tag)]++
	}
	if seen["A"] == 0 || seen["B"] == 0 || len(seen) != 2 {
		t.Errorf("40 ClientHellos for %s reached %v, want both members", web, seen)
	}
	a.kill()
	// The relay drops the dead member when its connection ends.
	var tag byte
	var err error
	if !child.WaitFor(5*time.Second, func() bool { tag, err = helloRoute(t, r.sni, web); return err == nil && tag == 'B' }) {
		t.Fatalf("after A was killed: tag %q, %v; want B", tag, err)
	}
	for i := range 20 {
		if tag, err := helloRoute(t, r.sni, web); err != nil || tag != 'B' {
			t.Errorf("ClientHello %d for %s after A was killed: tag %q, %v; want B", i, web, tag, err)
		}
	}
	t.Logf("both members served %s (%v); after A's death, B alone", web, seen)
}

// sendHello sends chunks to the shared port from the local address from,
// 100ms apart, half-closes, and returns what came back.
func sendHello(t *testing.T, sni int, from string, chunks ...[]byte) []byte {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
	c, err := d.Dial("tcp", child.Addr(sni))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	for i, ch := range chunks {
		if i > 0 {
			time.Sleep(100 * time.Millisecond) // the pieces arrive apart: what is tested
		}
		if _, err := c.Write(ch); err != nil {
			t.Fatalf("write piece %d: %v", i, err)
		}
	}
	c.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(c)
	if err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("read after %d bytes: %v", len(got), err)
	}
	return got
}

// TestSNIHelloInPieces: a ClientHello that arrives in pieces, as real
// clients' larger ones do (its record header alone, then the rest in two
// writes), or fragmented into two TLS records, as the standard allows, is
// routed, and reaches the agent as it was sent.
func TestSNIHelloInPieces(t *testing.T) {
	e := newEnv(t)
	r := e.startSNIRelay(nil)
	e.startNamed(exposeBin, r, fqdn("db"), nil, "-hostname", "db", "127.0.0.1", strconv.Itoa(r.port), taggedEcho(t, 'D'))
	hello := helloFor(t, fqdn("db"))
	body := hello[5:]
	record := func(b []byte) []byte { return append([]byte{0x16, 0x03, 0x01, byte(len(b) >> 8), byte(len(b))}, b...) }
	twoRecords := append(record(body[:len(body)/2]), record(body[len(body)/2:])...)
	for _, c := range []struct {
		what   string
		chunks [][]byte
	}{
		{"header, then two pieces", [][]byte{hello[:5], hello[5:40], hello[40:]}},
		{"two TLS records", [][]byte{twoRecords}},
		{"two TLS records, in three writes", [][]byte{twoRecords[:7], twoRecords[7 : len(twoRecords)-3], twoRecords[len(twoRecords)-3:]}},
	} {
		sent := bytes.Join(c.chunks, nil)
		if got := sendHello(t, r.sni, "127.0.0.1", c.chunks...); len(got) == 0 || got[0] != 'D' || !bytes.Equal(got[1:], sent) {
			t.Errorf("a ClientHello for %s, %s: %d bytes back, want the tag and the %d bytes sent", fqdn("db"), c.what, len(got), len(sent))
		}
	}
}

// TestSNIAccessLists: an agent's -allow and -deny hold for the clients of
// its name as of its port: a client from a denied address is closed
// without a byte, before the agent hears of it; one from an allowed
// address is served.
func TestSNIAccessLists(t *testing.T) {
	e := newEnv(t)
	maddr := child.Addr(freePort(t))
	r := e.startSNIRelay(nil, "-metrics-addr", maddr)
	e.startNamed(exposeBin, r, fqdn("db"), nil, "-deny", "127.0.0.3", "-hostname", "db", "127.0.0.1", strconv.Itoa(r.port), taggedEcho(t, 'D'))
	hello := helloFor(t, fqdn("db"))
	if got := sendHello(t, r.sni, "127.0.0.3", hello); len(got) != 0 {
		t.Errorf("a client of %s from the denied 127.0.0.3 got %d bytes, want none", fqdn("db"), len(got))
	}
	if got := sendHello(t, r.sni, "127.0.0.2", hello); len(got) == 0 || got[0] != 'D' || !bytes.Equal(got[1:], hello) {
		t.Errorf("a client of %s from 127.0.0.2: %d bytes back, want the tag and the hello", fqdn("db"), len(got))
	}
	if n := metric(t, maddr, "tcprelay_clients_denied_total"); n != 1 {
		t.Errorf("tcprelay_clients_denied_total %d, want 1", n)
	}
}
