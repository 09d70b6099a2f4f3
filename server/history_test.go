package server

import (
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"tcprelay/internal/copier"
)

// TestHistoryKeepsTheLastHour: the ring keeps historyLen slots and no
// more, slots the watch skipped are empty, and a slot's bytes are those
// since the sample before.
func TestHistoryKeepsTheLastHour(t *testing.T) {
	h := &history{first: 1, last: 0}
	var total int64
	for slot := int64(1); slot <= 1000; slot++ {
		total += slot
		h.record(slot, int(slot%7), total)
	}
	for n := int64(1000 - historyLen + 1); n <= 1000; n++ {
		i := n % int64(historyLen)
		if h.bytes[i] != uint64(n) || h.clients[i] != uint32(n%7) {
			t.Fatalf("slot %d: %d bytes, %d clients; want %d, %d", n, h.bytes[i], h.clients[i], n, n%7)
		}
	}
	h.record(1005, 2, total+50) // 1001-1004 skipped
	for n := int64(1001); n < 1005; n++ {
		if i := n % int64(historyLen); h.bytes[i] != 0 || h.clients[i] != 0 {
			t.Errorf("skipped slot %d: %d bytes, %d clients; want empty", n, h.bytes[i], h.clients[i])
		}
	}
	if i := 1005 % int64(historyLen); h.bytes[i] != 50 || h.clients[i] != 2 {
		t.Errorf("slot 1005: %d bytes, %d clients; want 50, 2", h.bytes[i], h.clients[i])
	}
	h.record(1003, 9, total+99) // the past: ignored
	if h.last != 1005 || h.mark != total+50 {
		t.Errorf("a sample of a past slot changed the history: last %d, mark %d", h.last, h.mark)
	}
}

// TestChartsFromSamples: an endpoint sampled by the watch at two slot
// boundaries has one complete sample (its peak of clients, its bytes over
// the slot per second) and the current slot so far, and the page draws
// both as SVG with no script.
func TestChartsFromSamples(t *testing.T) {
	s := &Server{endpoints: map[int]*endpoint{}, links: map[*copier.Link]*linkInfo{}}
	ep := &endpoint{s: s, port: 9999}
	s.endpoints[ep.port] = ep
	t0 := time.Unix(slotOf(time.Now())*10, 0)
	s.sampleHistory(t0.Add(time.Second)) // new: its first slot is t0's
	s.mu.Lock()
	ep.addClientLocked(netipZero, 3)
	ep.addClientLocked(netipZero, -2)
	ep.bytesDone.add(1500, 500) // 2000 bytes in the slot: 200 B/s
	s.mu.Unlock()
	s.sampleHistory(t0.Add(10 * time.Second))
	s.sampleHistory(t0.Add(11 * time.Second)) // the same slot again: nothing
	s.mu.Lock()
	ep.bytesDone.add(100, 0)
	s.mu.Unlock()
	d := s.chartsFor(t0.Add(15*time.Second), []int{9999})[9999]
	if d == nil || d.Complete != 1 || len(d.Clients) != 2 {
		t.Fatalf("chart data %+v: want 1 complete sample and the current slot", d)
	}
	if d.Clients[0] != 3 || d.Rates[0] != 200 {
		t.Errorf("the complete sample: %v clients, %v B/s; want the peak, 3, and 200", d.Clients[0], d.Rates[0])
	}
	if d.Clients[1] != 1 || d.Rates[1] != 20 {
		t.Errorf("the current slot, 5 s in: %v clients, %v B/s; want 1 and 100 B / 5 s = 20", d.Clients[1], d.Rates[1])
	}
	html := string(chartsHTML(d))
	if n := strings.Count(html, "<svg "); n != 2 || strings.Contains(html, "<script") {
		t.Errorf("%d svg charts, want 2, and no script:\n%s", n, html)
	}
	for _, want := range []string{`data-samples="2" data-peak="3"`, "clients, peak 3 clients", `data-peak="200"`, "bytes per second, peak 200 B/s"} {
		if !strings.Contains(html, want) {
			t.Errorf("the charts lack %q:\n%s", want, html)
		}
	}
	// Every point is inside the chart.
	for _, m := range regexp.MustCompile(`(\d+),(\d+(?:\.\d)?)`).FindAllStringSubmatch(html, -1) {
		if x, y := atof(m[1]), atof(m[2]); x < chartPad || x > float64(chartPad+chartW) || y < chartPad || y > float64(chartPad+chartH) {
			t.Errorf("point %s,%s is outside the chart", m[1], m[2])
		}
	}
}

var netipZero = netip.Addr{}

func atof(s string) float64 {
	f, _ := strconv.ParseFloat(s, 64)
	return f
}
