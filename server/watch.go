package server

import (
	"net"
	"sort"
	"syscall"
	"time"

	"tcprelay/internal/copier"
)

// A relayed connection costs the relay kernel memory: the bytes waiting in
// its two sockets and in a splice pipe. While it flows that is in
// proportion to its speed; when one side stops reading, what is queued
// stays. Two things bound it:
//
//   - every relayed socket gets a receive buffer of Config.LinkBuffer
//     (1.75 MiB: a window for 1 Gbit/s at 20 ms), instead of the kernel's
//     autotuning up to tcp_rmem's maximum (32 MiB here), and sends with
//     TCP_NOTSENT_LOWAT, so that what is not yet sent stays small;
//   - the watch below, once a second, sums the memory of the links whose
//     reader has not taken a byte for stalledAfter, and past
//     Config.MaxStalledMemory closes those stalled longest, so the kernel
//     never comes near the pressure level where it drops other
//     connections' data. It also applies the optional stall and idle
//     timeouts.

const (
	watchEvery   = time.Second
	stalledAfter = 2 * time.Second
	notSentLowat = 256 << 10
)

// tune sets a relayed socket's buffers (see above).
func (s *Server) tune(c net.Conn) {
	c = socketOf(c)
	tcp, ok := c.(*net.TCPConn)
	if !ok {
		return
	}
	if s.setReadBuffer != nil {
		s.setReadBuffer(tcp)
	}
	setNotSentLowat(tcp, notSentLowat)
}

// tunePublic sets what a client accepted on a public port lacks of tune's:
// all of it, unless it has its listener's (see publicListenConfig).
func (s *Server) tunePublic(c net.Conn) {
	if !s.inherited {
		s.tune(c)
	} else if tcp, ok := c.(*net.TCPConn); ok {
		setNotSentLowat(tcp, notSentLowat)
	}
}

// plainSocket is the conn a link holds for data, an agent's data
// connection: the socket itself when the transport carries the native
// protocol in the clear with nothing left unread (its SyscallConn works),
// so that no transport wrapper is kept alive by each idle link; else data.
func plainSocket(data net.Conn) net.Conn {
	w, ok := data.(interface {
		NetConn() net.Conn
		SyscallConn() (syscall.RawConn, error)
	})
	if !ok {
		return data
	}
	if _, err := w.SyscallConn(); err != nil {
		return data
	}
	return w.NetConn()
}

// watch looks at the relayed connections every watchEvery until stop is
// closed.
func (s *Server) watch(stop <-chan struct{}) {
	tick := time.NewTicker(watchEvery)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return
		case now := <-tick.C:
			s.watchOnce(now)
			s.sampleHistory(now)
		}
	}
}

// watchOnce closes the links past the stall or idle timeout, and, while
// the stalled ones hold more than the limit, those stalled longest.
func (s *Server) watchOnce(now time.Time) {
	type stalled struct {
		l       *copier.Link
		info    *linkInfo
		waiting time.Duration
		mem     int64
	}
	var cands []stalled
	var stale, idle []*copier.Link
	s.mu.Lock()
	for l, info := range s.links {
		a, b := l.Progress()
		if moved := a + b; moved != info.moved {
			info.moved, info.changed = moved, now
		}
		w := l.Waiting()
		switch {
		case s.set.stallTimeout > 0 && w >= s.set.stallTimeout:
			stale = append(stale, l)
			info.endedBy("stalled")
		case s.set.idleTimeout > 0 && now.Sub(info.changed) >= s.set.idleTimeout:
			idle = append(idle, l)
			info.endedBy("idle")
		case w >= stalledAfter:
			cands = append(cands, stalled{l: l, info: info, waiting: w})
		}
	}
	s.mu.Unlock()

	var total int64
	for i := range cands {
		c := &cands[i]
		c.mem = queued(c.info.client) + queued(c.info.data)
		total += c.mem
	}
	s.stalledMemory.Store(total)
	var shed []*copier.Link
	if limit := s.set.maxStalledMemory; limit > 0 && total > limit {
		sort.Slice(cands, func(i, j int) bool { return cands[i].waiting > cands[j].waiting })
		for _, c := range cands {
			if total <= limit {
				break
			}
			shed = append(shed, c.l)
			total -= c.mem
		}
		s.mu.Lock()
		for _, c := range cands[:len(shed)] {
			c.info.endedBy("shed")
		}
		s.mu.Unlock()
	}
	for _, l := range stale {
		s.count.stallTimeouts.Add(1)
		s.quiet.Warn("closed a relayed connection: its reader took nothing for the stall timeout", "timeout", s.set.stallTimeout)
		l.Close()
	}
	for _, l := range idle {
		s.count.idleTimeouts.Add(1)
		s.quiet.Warn("closed a relayed connection: nothing moved for the idle timeout", "timeout", s.set.idleTimeout)
		l.Close()
	}
	for _, l := range shed {
		s.count.stalledShed.Add(1)
		s.quiet.Warn("closed a stalled relayed connection: stalled connections hold more kernel memory than allowed",
			"limit", s.set.maxStalledMemory)
		l.Close()
	}
}
