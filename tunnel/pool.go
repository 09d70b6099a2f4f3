package tunnel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"tcprelay/internal/proto"
)

// pool keeps pre-opened data connections parked at the relay, so a new
// outside client is joined to one without a round trip to this agent. It
// starts small and grows by one each time a client had to be announced on
// the control connection instead (a miss), up to the relay's maximum.
type pool struct {
	c   *control
	key [proto.TokenLen]byte
	max int

	mu      sync.Mutex
	target  int                   // connections to keep parked
	open    map[net.Conn]struct{} // parked, waiting for Bind
	dialing int                   // being opened
	wake    chan struct{}         // something changed: top up
	failed  bool                  // the last attempt failed: pause before the next
	closed  bool                  // the session is over: park nothing more
	// With feature reuse: every data connection that may serve another
	// client, parked or serving one, by its PoolJoin number. One serving a
	// client counts as parked: it will likely be back, so a client at a
	// time costs no new connection. (More would leave a pool short while
	// many clients hold their connections.)
	reuse bool
	bySeq map[uint64]*dataConn
	again sync.WaitGroup // connections on their way back to parked (dataConn.finishLocked)
}

// initialPool is the parked connections an agent starts with.
const initialPool = 4

func newPool(c *control, k *proto.PoolKey) *pool {
	return &pool{
		c:      c,
		key:    k.Key,
		max:    int(k.Max),
		target: min(initialPool, int(k.Max)),
		open:   make(map[net.Conn]struct{}),
		wake:   make(chan struct{}, 1),
		reuse:  c.features&(proto.FeatureReuse|proto.FeatureProof) == proto.FeatureReuse|proto.FeatureProof,
		bySeq:  make(map[uint64]*dataConn),
	}
}

func (p *pool) poke() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// miss grows the pool: a client arrived while none was parked.
func (p *pool) miss() {
	p.mu.Lock()
	p.target = min(p.target+1, p.max)
	p.mu.Unlock()
	p.poke()
}

// run tops the pool up until lost is closed, then closes what is parked.
func (p *pool) run(lost <-chan struct{}) {
	l := p.c.l
	defer func() {
		p.mu.Lock()
		p.closed = true
		for c := range p.open {
			c.Close()
		}
		p.mu.Unlock()
		p.again.Wait() // none starts once closed is set
	}()
	for {
		p.mu.Lock()
		pause := p.failed
		p.failed = false
		lent := 0
		if p.reuse {
			lent = len(p.bySeq) - len(p.open) - p.dialing
		}
		n := p.target - min(lent, 1) - len(p.open) - p.dialing
		if pause {
			n = 0
		}
		p.dialing += max(n, 0)
		p.mu.Unlock()
		for range n {
			l.wg.Add(1)
			go func() {
				defer l.wg.Done()
				p.park()
			}()
		}
		var retry <-chan time.Time
		if pause {
			retry = time.After(time.Second)
		}
		select {
		case <-lost:
			return
		case <-p.wake:
		case <-retry:
		}
	}
}

// park opens one data connection, parks it at the relay, and waits for a
// client to be bound to it.
func (p *pool) park() {
	join := &proto.PoolJoin{Key: p.key}
	if p.c.features&proto.FeatureProof != 0 {
		join.Seq = p.c.joins.Add(1)
		join.MAC = proto.ProofMAC(p.c.key, "pool-join", join.Key[:], binary.BigEndian.AppendUint64(nil, join.Seq))
	}
	var d *dataConn
	if p.reuse {
		// Known before its PoolJoin goes out: the relay's End for its first
		// client may come before this goroutine reaches wait.
		d = &dataConn{p: p, seq: join.Seq}
		p.mu.Lock()
		p.bySeq[join.Seq] = d
		p.mu.Unlock()
	}
	conn, err := p.c.dataConn(join)
	p.mu.Lock()
	p.dialing--
	if err == nil && p.closed {
		conn.Close()
		err = errors.New("session over")
	}
	if err != nil {
		p.failed = true
		p.mu.Unlock()
		p.poke()
		p.forget(d)
		return
	}
	p.mu.Unlock()
	if d != nil {
		d.mu.Lock()
		d.conn = conn
		d.mu.Unlock()
	}
	p.wait(conn, d, false)
}

// wait parks conn (d, if it may serve one client after another) until the
// relay binds a client to it, and hands that client to Accept. again: it
// served a client before, and the relay may have closed it for want of
// room rather than for a failure.
func (p *pool) wait(conn net.Conn, d *dataConn, again bool) {
	l := p.c.l
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		p.forget(d)
		conn.Close()
		return
	}
	p.open[conn] = struct{}{}
	if d != nil {
		p.bySeq[d.seq] = d
	}
	p.mu.Unlock()

	bind, err := readBind(conn)

	p.mu.Lock()
	delete(p.open, conn)
	if err != nil && !again {
		p.failed = true
	}
	p.mu.Unlock()
	if err != nil {
		p.poke()
		p.forget(d)
		conn.Close()
		return
	}
	c := &Conn{Conn: conn, local: parseAddr(bind.Local), remote: parseAddr(bind.Client)}
	if d != nil {
		d.mu.Lock()
		d.cur = c
		d.mu.Unlock()
		c.d = d
	}
	p.poke()
	l.deliver(c)
}

// forget drops d (nil: nothing): its connection is closed, or about to be.
func (p *pool) forget(d *dataConn) {
	if d == nil {
		return
	}
	p.mu.Lock()
	if p.bySeq[d.seq] == d {
		delete(p.bySeq, d.seq)
	}
	p.mu.Unlock()
}

// end routes the relay's End to the data connection it names; one that is
// gone already is ignored.
func (p *pool) end(m *proto.End) {
	p.mu.Lock()
	d := p.bySeq[m.Seq]
	p.mu.Unlock()
	if d != nil {
		d.relayEnd(int64(min(m.Bytes, 1<<62)))
	}
}

// readBind reads the relay's Bind frame and nothing past it: the bytes that
// follow belong to the outside client.
func readBind(conn net.Conn) (*proto.Bind, error) {
	m, err := proto.ReadMessage(conn, proto.DefaultMaxPayload)
	if err != nil {
		return nil, err
	}
	bind, ok := m.(*proto.Bind)
	if !ok {
		return nil, fmt.Errorf("%w: got %s on a pre-opened data connection", ErrProtocol, m.Type())
	}
	return bind, nil
}
