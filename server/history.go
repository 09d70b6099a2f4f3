package server

import (
	"fmt"
	"html/template"
	"strconv"
	"strings"
	"time"
)

// The status page's charts: per endpoint, its clients and the bytes per
// second it relayed over the last hour, one sample per historyEvery, kept
// in a ring in the endpoint (bounded: historyLen samples of 12 bytes, about
// 4 KiB an endpoint, allocated at its first sample) and drawn by the
// server as small SVG images, with no script.

const (
	historyEvery = 10 * time.Second
	historyLen   = int(time.Hour / historyEvery) // 360: an hour
)

// history is one endpoint's samples. Slot n is the interval
// [n*historyEvery, (n+1)*historyEvery) of Unix time; the ring holds the
// last historyLen slots, slot n at index n % historyLen. Guarded by s.mu.
type history struct {
	first, last int64 // the oldest and newest slots sampled
	clients     [historyLen]uint32
	bytes       [historyLen]uint64 // relayed during the slot, both ways
	mark        int64              // the endpoint's bytes at the last sample
}

// slotOf is the slot that t falls in.
func slotOf(t time.Time) int64 { return t.Unix() / int64(historyEvery/time.Second) }

// record stores slot's sample: the most clients the endpoint had at once
// during it, and its bytes so far (both ways, finished and live), of which
// the slot's are those since the last sample. Slots skipped since then
// (the relay was too busy to sample) are stored as empty.
func (h *history) record(slot int64, clients int, total int64) {
	if slot <= h.last {
		return
	}
	for n := max(h.last+1, slot-int64(historyLen)+1); n < slot; n++ {
		h.clients[n%int64(historyLen)], h.bytes[n%int64(historyLen)] = 0, 0
	}
	i := slot % int64(historyLen)
	h.clients[i] = uint32(clients)
	h.bytes[i] = uint64(max(total-h.mark, 0))
	h.mark, h.last = total, slot
}

// sampleHistory records, at the first watch after each historyEvery
// boundary, the slot that just ended for every endpoint: the peak of its
// clients (see addClientLocked) and its bytes. It costs one pass over the
// links every historyEvery.
func (s *Server) sampleHistory(now time.Time) {
	slot := slotOf(now) - 1 // the slot that ended
	s.mu.Lock()
	defer s.mu.Unlock()
	var due map[*endpoint]int64
	for ep := range s.allEndpointsLocked() {
		switch {
		case ep.hist == nil: // new: its first slot is the current one
			ep.hist = &history{first: slot + 1, last: slot}
		case ep.hist.last < slot:
			if due == nil {
				due = make(map[*endpoint]int64)
			}
			due[ep] = ep.bytesDone.ToAgents + ep.bytesDone.FromAgents
		}
	}
	if len(due) == 0 {
		return
	}
	for l, info := range s.links {
		if _, ok := due[info.member.ep]; ok {
			a, b := l.Progress()
			due[info.member.ep] += a + b
		}
	}
	for ep, total := range due {
		ep.hist.record(slot, ep.peak, total)
		ep.peak = ep.conns
	}
}

// chartData is what the page draws for one endpoint: its samples from
// From (a slot) on, oldest first, and the current slot so far as the last.
type chartData struct {
	From     int64
	Now      int64 // the current slot, the last of Clients and Rates
	Clients  []float64
	Rates    []float64 // bytes per second
	Complete int       // samples from the ring (the rest is the current slot)
}

// chartsFor copies the history of the endpoints on ports, with the current
// slot so far, for the status page.
func (s *Server) chartsFor(now time.Time, ports []int) map[int]*chartData {
	out := make(map[int]*chartData, len(ports))
	cur := slotOf(now)
	secs := historyEvery.Seconds()
	s.mu.Lock()
	defer s.mu.Unlock()
	var live map[*endpoint]int64
	for _, port := range ports {
		ep := s.endpoints[port]
		if ep == nil {
			continue
		}
		d := &chartData{From: cur, Now: cur}
		h := ep.hist
		if h != nil {
			d.From = max(h.first, cur-int64(historyLen)+1)
			for n := d.From; n < cur; n++ {
				if n > h.last {
					d.Clients, d.Rates = append(d.Clients, 0), append(d.Rates, 0)
					continue
				}
				i := n % int64(historyLen)
				d.Clients = append(d.Clients, float64(h.clients[i]))
				d.Rates = append(d.Rates, float64(h.bytes[i])/secs)
			}
			d.Complete = len(d.Clients)
		}
		if live == nil {
			live = make(map[*endpoint]int64)
			for l, info := range s.links {
				a, b := l.Progress()
				live[info.member.ep] += a + b
			}
		}
		total := ep.bytesDone.ToAgents + ep.bytesDone.FromAgents + live[ep]
		var mark int64
		start := time.Unix(cur*int64(secs), 0)
		if h != nil {
			mark = h.mark
			if h.last < cur-1 { // the watch has not sampled the last slot yet
				start = time.Unix((h.last+1)*int64(secs), 0)
			}
		}
		elapsed := max(now.Sub(start).Seconds(), 1)
		d.Clients = append(d.Clients, float64(max(ep.peak, ep.conns)))
		d.Rates = append(d.Rates, float64(max(total-mark, 0))/elapsed)
		out[port] = d
	}
	return out
}

// Chart geometry, in pixels: one pixel per sample.
const (
	chartW, chartH = historyLen, 44
	chartPad       = 4
)

// svgChart draws values (one per slot from from, the last being now) as a
// small area chart with its peak, an hour wide. It is all numbers and fixed
// text, so it is safe to put in the page as it is.
func svgChart(title string, values []float64, from, now int64, unit func(float64) string) template.HTML {
	peak := 0.0
	for _, v := range values {
		peak = max(peak, v)
	}
	x := func(slot int64) float64 { return float64(chartPad + chartW - 1 - int(now-slot)) }
	y := func(v float64) float64 { // the peak at 80% of the height: room for its label
		if peak == 0 {
			return chartPad + chartH
		}
		return chartPad + chartH - v/peak*chartH*0.8
	}
	var pts strings.Builder
	for i, v := range values {
		fmt.Fprintf(&pts, "%.0f,%.1f ", x(from+int64(i)), y(v))
	}
	line := strings.TrimSpace(pts.String())
	var area string
	if n := len(values); n > 0 {
		base := strconv.FormatFloat(chartPad+chartH, 'f', 1, 64)
		area = fmt.Sprintf("%.0f,%s %s %.0f,%s", x(from), base, line, x(from+int64(n-1)), base)
	}
	w, h := chartW+2*chartPad, chartH+2*chartPad+14
	var b strings.Builder
	fmt.Fprintf(&b, `<figure class="chart"><svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" role="img" data-samples="%d" data-peak="%.0f">`,
		w, h, w, h, len(values), peak)
	fmt.Fprintf(&b, `<title>%s over the last hour: peak %s</title>`, template.HTMLEscapeString(title), template.HTMLEscapeString(unit(peak)))
	fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%d" height="%d" fill="#f7f9fb" stroke="#d5dde5"/>`, chartPad, chartPad, chartW, chartH)
	if area != "" {
		fmt.Fprintf(&b, `<polygon points="%s" fill="#cfe3f5"/><polyline points="%s" fill="none" stroke="#2b6cb0" stroke-width="1.5"/>`, area, line)
		// The current value, a dot: a young endpoint's samples are a few
		// pixels at the right end.
		last := values[len(values)-1]
		fmt.Fprintf(&b, `<circle cx="%.0f" cy="%.1f" r="2.5" fill="#2b6cb0"/>`, x(now), y(last))
		fmt.Fprintf(&b, `<text x="%d" y="%d" font-size="10" fill="#444">peak %s</text>`, chartPad+3, chartPad+10, template.HTMLEscapeString(unit(peak)))
		fmt.Fprintf(&b, `<text x="%d" y="%d" font-size="10" fill="#444" text-anchor="end">now %s</text>`, chartPad+chartW-6, chartPad+10, template.HTMLEscapeString(unit(last)))
	}
	fmt.Fprintf(&b, `<text x="%d" y="%d" font-size="10" fill="#666">1 h ago</text>`, chartPad, h-2)
	fmt.Fprintf(&b, `<text x="%d" y="%d" font-size="10" fill="#666" text-anchor="end">now</text>`, chartPad+chartW, h-2)
	b.WriteString(`</svg><figcaption>`)
	b.WriteString(template.HTMLEscapeString(title + ", peak " + unit(peak)))
	b.WriteString(`</figcaption></figure>`)
	return template.HTML(b.String())
}

// chartsHTML draws an endpoint's two charts.
func chartsHTML(d *chartData) template.HTML {
	if d == nil {
		return ""
	}
	clients := func(v float64) string { return plural(int(v), "client") }
	rate := func(v float64) string { return humanBytes(int64(v)) + "/s" }
	return svgChart("clients", d.Clients, d.From, d.Now, clients) + svgChart("bytes per second", d.Rates, d.From, d.Now, rate)
}
