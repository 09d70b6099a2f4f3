package server

import (
	"errors"
	"fmt"
	"net"
	"sync"
)

// errNoFreePort means every port of the allowed range is taken.
var errNoFreePort = errors.New("no free public port in the allowed range")

// portAllocator hands out public ports. With a range it walks the range
// round-robin, so a port just released is the last to be reused: an agent
// that reconnects has the best chance to get its old port back.
type portAllocator struct {
	mu             sync.Mutex
	min, max, next int
	used           map[int]bool
}

func newPortAllocator(lo, hi int) *portAllocator {
	return &portAllocator{min: lo, max: hi, next: lo, used: make(map[int]bool)}
}

// listen binds a public port on ip: want if it is not zero and can be had,
// else (unless required) the next free one.
func (pa *portAllocator) listen(ip net.IP, want int, required bool) (net.Listener, error) {
	pa.mu.Lock()
	defer pa.mu.Unlock()
	bind := func(port int) (net.Listener, error) {
		return net.ListenTCP("tcp", &net.TCPAddr{IP: ip, Port: port})
	}
	if pa.min == 0 && pa.max == 0 {
		if want != 0 {
			ln, err := bind(want)
			if err == nil || required {
				return ln, err
			}
		}
		return bind(0)
	}
	if want != 0 {
		var err error
		switch {
		case want < pa.min || want > pa.max:
			err = fmt.Errorf("port %d is outside the allowed range %d-%d", want, pa.min, pa.max)
		case pa.used[want]:
			err = fmt.Errorf("port %d is in use", want)
		default:
			var ln net.Listener
			if ln, err = bind(want); err == nil {
				pa.used[want] = true
				return ln, nil
			}
		}
		if required {
			return nil, err
		}
	}
	for range pa.max - pa.min + 1 {
		port := pa.next
		pa.next++
		if pa.next > pa.max {
			pa.next = pa.min
		}
		if pa.used[port] {
			continue
		}
		if ln, err := bind(port); err == nil {
			pa.used[port] = true
			return ln, nil
		}
	}
	return nil, fmt.Errorf("%w (%d-%d)", errNoFreePort, pa.min, pa.max)
}

// close closes a public listener and returns its port to the range.
func (pa *portAllocator) close(ln net.Listener) {
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	pa.mu.Lock()
	delete(pa.used, port)
	pa.mu.Unlock()
}
