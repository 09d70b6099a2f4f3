package child

import (
	"errors"
	"testing"
	"time"
)

func TestBufferKeepsTail(t *testing.T) {
	b := &Buffer{Max: 4}
	b.Write([]byte("abc"))
	b.Write([]byte("def"))
	if got := b.String(); got != "cdef" {
		t.Errorf("Buffer{Max: 4} after abc, def holds %q, want %q", got, "cdef")
	}
}

func TestAnnouncedPort(t *testing.T) {
	for _, c := range []struct {
		line, host string
		port       int
		ok         bool
	}{
		{"established relay address: 127.0.0.1:4001", "127.0.0.1", 4001, true},
		{"established relay address: localhost:80", "localhost", 80, true},
		{"established relay address: localhost:80", "127.0.0.1", 0, false},
		{"established relay address: 127.0.0.1:0", "127.0.0.1", 0, false},
		{"established relay address: 127.0.0.1:65536", "127.0.0.1", 0, false},
		{"established relay address: 127.0.0.1:4001 ", "127.0.0.1", 0, false},
	} {
		if port, ok := AnnouncedPort(c.line, c.host); port != c.port || ok != c.ok {
			t.Errorf("AnnouncedPort(%q, %q) = %d, %v; want %d, %v", c.line, c.host, port, ok, c.port, c.ok)
		}
	}
}

func TestStartScanAndStatus(t *testing.T) {
	p, err := Start("sh", "sh", []string{"-c", "echo one; echo two; echo oops >&2; exit 3"}, Options{Scan: true})
	if err != nil {
		t.Fatal(err)
	}
	if line, err := p.FirstLine(5 * time.Second); err != nil || line != "one" {
		t.Errorf("FirstLine = %q, %v; want \"one\"", line, err)
	}
	if !p.Wait(5 * time.Second) {
		t.Fatal("sh did not exit")
	}
	<-p.StdoutClosed()
	if got, want := p.Status(), "exit status 3"; got != want {
		t.Errorf("Status = %q, want %q", got, want)
	}
	if p.ExitCode() != 3 || p.Out() != "one\ntwo" || p.Stderr.String() != "oops\n" {
		t.Errorf("ExitCode %d, Out %q, stderr %q; want 3, \"one\\ntwo\", \"oops\\n\"", p.ExitCode(), p.Out(), p.Stderr)
	}
}

func TestKillAndPortTaken(t *testing.T) {
	p, err := Start("sleep", "sleep", []string{"60"}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if !p.Kill() {
		t.Fatal("sleep did not exit after SIGKILL")
	}
	if got, want := p.Status(), "killed by signal 9 (killed)"; got != want {
		t.Errorf("Status = %q, want %q", got, want)
	}

	p, err = Start("sh", "sh", []string{"-c", "echo 'bind: Address already in use' >&2; exit 1"}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.AwaitReady(5*time.Second, func() bool { return false }); !errors.Is(err, ErrPortTaken) {
		t.Errorf("AwaitReady = %v, want ErrPortTaken", err)
	}
}
