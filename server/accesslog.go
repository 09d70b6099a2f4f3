package server

import (
	"encoding/json"
	"io"
	"sync"
	"sync/atomic"
	"time"
)

// The access log: one JSON line per outside connection and per agent
// session, when it ends, for audits and for tools such as jq, vector or
// fail2ban (Config.AccessLog). Its fields are a contract: they are
// documented in docs/OPERATING.md, and they are only ever added to.

// ConnRecord is the access log's line for an outside connection.
type ConnRecord struct {
	Event     string    `json:"event"` // "connection"
	Start     time.Time `json:"start"` // when the relay accepted it
	End       time.Time `json:"end"`
	Port      int       `json:"port"`                 // its endpoint's public port (for a name, the shared port)
	Host      string    `json:"host,omitempty"`       // the name it asked for on the shared port
	Pool      string    `json:"pool,omitempty"`       // the endpoint's pool, if it is one's
	Agent     string    `json:"agent,omitempty"`      // the name of the agent that served it (its remote address without a key)
	AgentAddr string    `json:"agent_addr,omitempty"` // that agent's control connection's remote address
	Client    string    `json:"client"`               // the outside client's address
	BytesIn   int64     `json:"bytes_in"`             // from the client to the agent
	BytesOut  int64     `json:"bytes_out"`            // from the agent to the client
	// Reason is why it ended: "client closed" or "agent closed" (whose
	// side ended first), "idle", "stalled", "shed", "reclaimed" (its
	// place given to another tunnel's client), "revoked", "relay shut
	// down"; for a client never relayed, "denied", "pickup timeout", "no
	// agent", or "refused: " and the limit.
	Reason string `json:"reason"`
}

// SessionRecord is the access log's line for an agent session.
type SessionRecord struct {
	Event  string    `json:"event"` // "session"
	Start  time.Time `json:"start"`
	End    time.Time `json:"end"`
	Agent  string    `json:"agent"` // its name (its remote address without a key)
	Key    string    `json:"key,omitempty"`
	Addr   string    `json:"addr"`            // its control connection's remote address
	Ports  []int     `json:"ports"`           // the public ports it served, in the order it got them
	Hosts  []string  `json:"hosts,omitempty"` // the names it served on the shared port
	Reason string    `json:"reason"`
}

// accessLog writes records to w from a goroutine of its own, so that a
// slow disk never holds up the relay: past accessQueue records waiting,
// new ones are dropped and counted.
type accessLog struct {
	w       io.Writer
	queue   chan []byte
	stop    chan struct{}
	dropped atomic.Int64
	done    sync.WaitGroup
	once    sync.Once
}

const accessQueue = 4096

func newAccessLog(w io.Writer) *accessLog {
	a := &accessLog{w: w, queue: make(chan []byte, accessQueue), stop: make(chan struct{})}
	a.done.Add(1)
	go func() {
		defer a.done.Done()
		for {
			select {
			case line := <-a.queue:
				a.w.Write(line)
			case <-a.stop:
				for {
					select {
					case line := <-a.queue:
						a.w.Write(line)
					default:
						return
					}
				}
			}
		}
	}()
	return a
}

// add queues one record, or counts it dropped.
func (a *accessLog) add(rec any) {
	if a == nil {
		return
	}
	b, err := json.Marshal(rec)
	if err != nil {
		return
	}
	select {
	case <-a.stop:
	case a.queue <- append(b, '\n'):
	default:
		a.dropped.Add(1)
	}
}

// close writes what is queued and stops.
func (a *accessLog) close() {
	if a == nil {
		return
	}
	a.once.Do(func() { close(a.stop) })
	a.done.Wait()
}

// droppedRecords is how many records the access log has had to drop.
func (a *accessLog) droppedRecords() int64 {
	if a == nil {
		return 0
	}
	return a.dropped.Load()
}
