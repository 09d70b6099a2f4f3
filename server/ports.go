package server

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"syscall"
)

// errNoFreePort means every port of the allowed range is taken.
var errNoFreePort = errors.New("no free public port in the allowed range")

// portAllocator hands out public ports and knows which are held: bound by
// an open endpoint, or reserved for an owner with no listener. With a range
// it walks the range round-robin, so a port just released is the last to be
// reused.
type portAllocator struct {
	mu             sync.Mutex
	min, max, next int
	used           map[int]bool
	lc             net.ListenConfig // how ports listen (see publicListenConfig)
}

func newPortAllocator(lo, hi int) *portAllocator {
	return &portAllocator{min: lo, max: hi, next: lo, used: make(map[int]bool)}
}

func (pa *portAllocator) bind(ip net.IP, port int) (net.Listener, error) {
	host := "" // every address
	if ip != nil {
		host = ip.String()
	}
	ln, err := pa.lc.Listen(context.Background(), "tcp", net.JoinHostPort(host, strconv.Itoa(port)))
	if errors.Is(err, syscall.EACCES) {
		return nil, fmt.Errorf("port %d: %w (ports below 1024 need root or CAP_NET_BIND_SERVICE)", port, syscall.EACCES)
	}
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return nil, fmt.Errorf("port %d: %w", port, errno) // "port 8081: address already in use"
	}
	if err != nil {
		return nil, fmt.Errorf("port %d: %w", port, err)
	}
	return ln, nil
}

// listen binds a public port on ip: want if it is not zero and can be had,
// else (unless required) the next free one. allowed, if not nil, limits the
// ports it may hand out.
func (pa *portAllocator) listen(ip net.IP, want int, required bool, allowed func(int) bool) (net.Listener, error) {
	pa.mu.Lock()
	defer pa.mu.Unlock()
	ok := func(p int) bool { return allowed == nil || allowed(p) }
	if want != 0 {
		var err error
		switch {
		case pa.min != 0 && (want < pa.min || want > pa.max):
			err = fmt.Errorf("port %d is outside the relay's range %d-%d", want, pa.min, pa.max)
		case !ok(want):
			err = fmt.Errorf("port %d is not allowed for this agent", want)
		case pa.used[want]:
			err = fmt.Errorf("port %d is in use", want)
		default:
			var ln net.Listener
			if ln, err = pa.bind(ip, want); err == nil {
				pa.used[want] = true
				return ln, nil
			}
		}
		if required {
			return nil, err
		}
	}
	if pa.min == 0 && pa.max == 0 && allowed == nil {
		ln, err := pa.bind(ip, 0)
		if err == nil {
			pa.used[ln.Addr().(*net.TCPAddr).Port] = true
		}
		return ln, err
	}
	lo, hi := pa.min, pa.max
	if lo == 0 && hi == 0 {
		lo, hi = 1, 65535 // no range of its own: the agent's ranges decide
	}
	if pa.next < lo || pa.next > hi {
		pa.next = lo
	}
	tried, denied := 0, 0
	var lastErr error
	for range hi - lo + 1 {
		port := pa.next
		if pa.next++; pa.next > hi {
			pa.next = lo
		}
		if pa.used[port] || !ok(port) {
			continue
		}
		tried++
		ln, err := pa.bind(ip, port)
		if err == nil {
			pa.used[port] = true
			return ln, nil
		}
		lastErr = err
		if errors.Is(err, syscall.EACCES) {
			denied++
		}
	}
	if tried > 0 && denied == tried {
		return nil, fmt.Errorf("no public port could be bound: %w", lastErr)
	}
	return nil, fmt.Errorf("%w (%d-%d)", errNoFreePort, lo, hi)
}

// rebind binds a port this allocator holds for a reservation.
func (pa *portAllocator) rebind(ip net.IP, port int) (net.Listener, error) {
	return pa.bind(ip, port)
}

// hold marks port as held without binding it: a reservation loaded from
// the state file.
func (pa *portAllocator) hold(port int) {
	pa.mu.Lock()
	pa.used[port] = true
	pa.mu.Unlock()
}

// release returns a port to the range; ln, if not nil, is its listener.
func (pa *portAllocator) release(port int, ln net.Listener) {
	if ln != nil {
		ln.Close()
	}
	pa.mu.Lock()
	delete(pa.used, port)
	pa.mu.Unlock()
}
