//go:build !linux

package copier

import (
	"net"
	"syscall"
)

// splicer and poller exist only on Linux; elsewhere every direction is an
// io.Copy in a goroutine of its own.
type splicer struct {
	written  int64
	parkedAt int64 // never set: no direction parks here
}

func rawConn(c net.Conn) syscall.RawConn                                               { return nil }
func (s *splicer) init(src, dst net.Conn, dstRaw, srcRaw syscall.RawConn, d *dir) bool { return false }
func (s *splicer) ok() bool                                                            { return false }
func (s *splicer) spliced() bool                                                       { return false }
func (s *splicer) loop(dst, src net.Conn) (again bool, err error)                      { return false, nil }
func (s *splicer) noPark(src net.Conn)                                                 {}
func (s *splicer) counted(dst, src net.Conn, n int64)                                  {}
func (s *splicer) wakeFor(src net.Conn)                                                {}
func (s *splicer) forCopy()                                                            {}

type poller struct{}

var idle poller

func (p *poller) arm(d *dir) bool { return false }
func (p *poller) disarm(d *dir)   {}

// SetMaxPipes: there are no splice pipes here.
func SetMaxPipes(n int) {}

// PipesAlive: there are no splice pipes here.
func PipesAlive() int { return 0 }

// canPoll: Records never parks here.
const canPoll = false

func readNow(r *Records, p []byte) (int, error) { return r.Conn.Read(p) }
