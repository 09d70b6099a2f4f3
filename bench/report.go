package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
	"strings"
	"unicode/utf8"
)

// Target is a figure's goal: Value compared with Op (">=", "<=", "=").
type Target struct {
	Op    string  `json:"op"`
	Value float64 `json:"value"`
}

func ge(v float64) *Target { return &Target{">=", v} }
func le(v float64) *Target { return &Target{"<=", v} }
func eq(v float64) *Target { return &Target{"=", v} }

func (t *Target) String() string {
	if t == nil {
		return "-"
	}
	op := map[string]string{">=": "≥", "<=": "≤", "=": "="}[t.Op]
	return op + " " + fmtNum(t.Value)
}

// met reports whether v meets t. "=" allows 0.05 either way: the targets
// that use it are per-connection counts, where a constant (a pool of pipes)
// spread over thousands of connections must not count.
func (t *Target) met(v float64) bool {
	switch t.Op {
	case ">=":
		return v >= t.Value
	case "<=":
		return v <= t.Value
	default:
		return math.Abs(v-t.Value) < 0.05
	}
}

// Figure is one row of the table.
type Figure struct {
	Section string `json:"section"`
	Name    string `json:"name"`
	Unit    string `json:"unit,omitempty"` // of direct and relay

	Direct *float64 `json:"direct,omitempty"` // median over the runs
	Relay  *float64 `json:"relay,omitempty"`  // median over the runs
	// Value is what the target applies to: a ratio (relay/direct) or a
	// value of the relay path.
	Value     *float64 `json:"value,omitempty"`
	ValueUnit string   `json:"value_unit,omitempty"`
	Target    *Target  `json:"target,omitempty"`
	Met       *bool    `json:"met,omitempty"`

	DirectRuns []float64 `json:"direct_runs,omitempty"`
	RelayRuns  []float64 `json:"relay_runs,omitempty"`
	ValueRuns  []float64 `json:"value_runs,omitempty"`

	// Texts override the table cells (when a cell needs more than a number).
	DirectText string `json:"direct_text,omitempty"`
	RelayText  string `json:"relay_text,omitempty"`
	ValueText  string `json:"value_text,omitempty"`

	Detail  string `json:"detail,omitempty"`
	Error   string `json:"error,omitempty"`
	Skipped bool   `json:"skipped,omitempty"`

	Chart string `json:"chart_label,omitempty"` // label in the chart; empty: not charted
}

type results struct {
	Date            string            `json:"date"`
	Machine         machine           `json:"machine"`
	Runs            int               `json:"runs"`
	Binaries        []string          `json:"binaries"` // their -version lines
	Settings        map[string]string `json:"settings"`
	Figures         []*Figure         `json:"figures"`
	DurationSeconds float64           `json:"duration_seconds"`
}

func ptr(v float64) *float64 { return &v }

// setRuns stores per-run values and their medians, and the ratio of the
// medians as Value.
func (f *Figure) setRatio(direct, relay []float64) {
	f.DirectRuns, f.RelayRuns = direct, relay
	if len(direct) > 0 {
		f.Direct = ptr(median(direct))
	}
	if len(relay) > 0 {
		f.Relay = ptr(median(relay))
	}
	if f.Direct != nil && f.Relay != nil && *f.Direct != 0 {
		r := *f.Relay / *f.Direct
		f.Value = &r
		for i := range min(len(direct), len(relay)) {
			if direct[i] != 0 {
				f.ValueRuns = append(f.ValueRuns, relay[i]/direct[i])
			}
		}
	}
	f.judge()
}

// setValue sets Value (and ValueRuns when there are several).
func (f *Figure) setValue(runs []float64) {
	if len(runs) == 0 {
		return
	}
	if len(runs) > 1 {
		f.ValueRuns = runs
	}
	f.Value = ptr(median(runs))
	f.judge()
}

func (f *Figure) judge() {
	if f.Target != nil && f.Value != nil {
		m := f.Target.met(*f.Value)
		f.Met = &m
	}
}

// fail records an error on the figures that have no value yet.
func failAll(figs []*Figure, err error) {
	for _, f := range figs {
		if f.Value == nil && f.Error == "" {
			f.Error = err.Error()
		}
	}
}

func skipAll(figs []*Figure, why string) {
	for _, f := range figs {
		f.Skipped = true
		f.Error = why
	}
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// fmtNum prints a number with about 3 significant digits, thousands
// separated.
func fmtNum(v float64) string {
	a := math.Abs(v)
	switch {
	case math.IsNaN(v) || math.IsInf(v, 0):
		return fmt.Sprint(v)
	case a >= 1000:
		return thousands(int64(math.Round(v)))
	case a >= 100:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	case v == math.Trunc(v):
		return fmt.Sprintf("%.0f", v)
	default:
		return fmt.Sprintf("%.2f", v)
	}
}

func thousands(n int64) string {
	s := fmt.Sprint(n)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}

func cell(text string, v *float64) string {
	if text != "" {
		return text
	}
	if v == nil {
		return "-"
	}
	return fmtNum(*v)
}

func (f *Figure) metText() string {
	switch {
	case f.Skipped:
		return "skipped"
	case f.Met == nil && f.Target != nil:
		return "NO (no value)"
	case f.Met == nil:
		return "-"
	case *f.Met:
		return "yes"
	default:
		return "NO"
	}
}

func (f *Figure) label() string {
	if f.Unit == "" {
		return f.Name
	}
	return f.Name + " (" + f.Unit + ")"
}

func (f *Figure) valueCell() string {
	s := cell(f.ValueText, f.Value)
	if f.ValueText == "" && f.Value != nil && f.ValueUnit != "" {
		s += " " + f.ValueUnit
	}
	return s
}

func printTable(w io.Writer, res *results) {
	header := []string{"figure", "direct", "relay path", "ratio or value", "target", "met?"}
	rows := [][]string{header}
	var notes []string
	seen := map[string]bool{}
	for _, f := range res.Figures {
		rows = append(rows, []string{f.label(), cell(f.DirectText, f.Direct), cell(f.RelayText, f.Relay),
			f.valueCell(), f.Target.String(), f.metText()})
		// A section's error is often on each of its figures: once is enough.
		if e := f.Section + ": " + f.Error; f.Error != "" && !seen[e] {
			seen[e] = true
			notes = append(notes, e)
		}
		if f.Detail != "" {
			notes = append(notes, fmt.Sprintf("%s: %s", f.Name, f.Detail))
		}
	}
	width := make([]int, len(header))
	for _, r := range rows {
		for i, c := range r {
			width[i] = max(width[i], utf8.RuneCountInString(c))
		}
	}
	line := func(r []string) {
		var b strings.Builder
		for i, c := range r {
			if i > 0 {
				b.WriteString(" | ")
			}
			pad := strings.Repeat(" ", width[i]-utf8.RuneCountInString(c))
			if i == 0 || i == len(r)-1 {
				b.WriteString(c + pad)
			} else {
				b.WriteString(pad + c)
			}
		}
		fmt.Fprintln(w, strings.TrimRight(b.String(), " "))
	}
	runs := fmt.Sprintf("medians of %d runs", res.Runs)
	if res.Runs == 1 {
		runs = "1 run"
	}
	fmt.Fprintf(w, "RESULTS (%s; %s; %d CPUs, %s, kernel %s, %s)\n", runs, res.Date,
		res.Machine.NProc, res.Machine.CPUModel, res.Machine.Kernel, res.Machine.GoVersion)
	line(rows[0])
	var sep []string
	for _, n := range width {
		sep = append(sep, strings.Repeat("-", n))
	}
	fmt.Fprintln(w, strings.Join(sep, "-+-"))
	for _, r := range rows[1:] {
		line(r)
	}
	met, total, skipped := 0, 0, 0
	for _, f := range res.Figures {
		switch {
		case f.Target == nil:
		case f.Skipped:
			skipped++
		default:
			total++
			if f.Met != nil && *f.Met {
				met++
			}
		}
	}
	fmt.Fprintf(w, "\ntargets met: %d of %d", met, total)
	if skipped > 0 {
		fmt.Fprintf(w, " (%d more skipped)", skipped)
	}
	fmt.Fprintln(w)
	if len(notes) > 0 {
		fmt.Fprintln(w, "\nnotes:")
		for _, n := range notes {
			fmt.Fprintf(w, "- %s\n", n)
		}
	}
	fmt.Fprintln(w)
}

func writeJSON(path string, res *results) error {
	var buf strings.Builder
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false) // ">=" as is
	enc.SetIndent("", "  ")
	if err := enc.Encode(res); err != nil {
		return err
	}
	return os.WriteFile(path, []byte(buf.String()), 0o644)
}

// ---------------------------------------------------------------- SVG

func xmlEscape(s string) string {
	r := strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;", `"`, "&quot;")
	return r.Replace(s)
}

// chartSVG draws one horizontal bar per charted figure: its value as a
// fraction of its target, with a vertical line at the target. Green bars
// meet their target, red ones do not.
func chartSVG(res *results) string {
	var rows []*Figure
	for _, f := range res.Figures {
		if f.Chart != "" && f.Target != nil {
			rows = append(rows, f)
		}
	}
	const (
		width  = 1060
		left   = 380              // bars start here
		barW   = 400              // width of the scale
		textX  = left + barW + 24 // the value column
		rowH   = 46
		top    = 96
		barH   = 22
		bottom = 70
	)
	scaleMax := 2.0
	for _, f := range rows {
		if f.Value != nil && f.Target.Value != 0 {
			fr := *f.Value / f.Target.Value
			if fr > scaleMax {
				scaleMax = math.Min(4, math.Ceil(fr*2)/2)
			}
		}
	}
	x := func(fr float64) float64 { return left + math.Min(fr, scaleMax)/scaleMax*barW }
	height := top + len(rows)*rowH + bottom
	var b strings.Builder
	p := func(format string, a ...any) { fmt.Fprintf(&b, format, a...); b.WriteByte('\n') }
	p(`<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">`, width, height, width, height)
	p(`<rect width="100%%" height="100%%" fill="#ffffff"/>`)
	met, total := 0, 0
	for _, f := range rows {
		if !f.Skipped {
			total++
			if f.Met != nil && *f.Met {
				met++
			}
		}
	}
	p(`<text x="20" y="30" font-size="20" font-weight="bold" fill="#222">tcprelay: relay path against its targets (%d of %d met)</text>`, met, total)
	runs := fmt.Sprintf("medians of %d runs", res.Runs)
	if res.Runs == 1 {
		runs = "1 run"
	}
	p(`<text x="20" y="52" font-size="12.5" fill="#555">%s</text>`, xmlEscape(fmt.Sprintf("%s · %d CPUs, %s, kernel %s, %s · %s",
		res.Date, res.Machine.NProc, res.Machine.CPUModel, res.Machine.Kernel, res.Machine.GoVersion, runs)))
	p(`<text x="20" y="72" font-size="12.5" fill="#555">Each bar is the figure divided by its target. ≥ targets (▲): the bar must reach the line. ≤ targets (▼): the bar must stay at or below it.</text>`)

	// Grid and scale.
	gridTop, gridBottom := top-8, top+len(rows)*rowH
	for g := 0.0; g <= scaleMax+1e-9; g += 0.5 {
		gx := x(g)
		if g == 1 {
			continue
		}
		p(`<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#e3e3e3" stroke-width="1"/>`, gx, gridTop, gx, gridBottom)
		p(`<text x="%.1f" y="%d" font-size="11" fill="#888" text-anchor="middle">%s×</text>`, gx, gridBottom+16, fmtScale(g))
	}
	for i, f := range rows {
		y := top + i*rowH
		cy := y + rowH/2
		if i%2 == 0 {
			p(`<rect x="10" y="%d" width="%d" height="%d" fill="#f7f7f9"/>`, y, width-20, rowH)
		}
		dir := "▲ higher is better"
		if f.Target.Op != ">=" {
			dir = "▼ lower is better"
		}
		p(`<text x="%d" y="%d" font-size="13.5" fill="#222" text-anchor="end">%s</text>`, left-12, cy-3, xmlEscape(f.Chart))
		p(`<text x="%d" y="%d" font-size="11" fill="#777" text-anchor="end">target %s · %s</text>`, left-12, cy+12, xmlEscape(f.Target.String()), dir)
		by := cy - barH/2
		switch {
		case f.Skipped || f.Value == nil:
			why := "no value"
			if f.Skipped {
				why = "skipped"
			}
			if f.Error != "" {
				why += ": " + clip(f.Error, 60)
			}
			p(`<text x="%d" y="%d" font-size="12" fill="#999" font-style="italic">%s</text>`, textX, cy+4, xmlEscape(why))
		default:
			fr := *f.Value / f.Target.Value
			color := "#c62828"
			if f.Met != nil && *f.Met {
				color = "#2e7d32"
			}
			w := x(fr) - left
			p(`<rect x="%d" y="%d" width="%.1f" height="%d" rx="3" fill="%s"/>`, left, by, math.Max(w, 1.5), barH, color)
			if fr > scaleMax { // clipped: a break mark at the end
				ex := x(scaleMax)
				p(`<path d="M %.1f %d l 6 %d l -6 %d" stroke="#fff" stroke-width="3" fill="none"/>`, ex-12, by, barH/2, barH/2)
			}
			verdict := "not met"
			if f.Met != nil && *f.Met {
				verdict = "met"
			}
			p(`<text x="%d" y="%d" font-size="13.5" font-weight="bold" fill="%s">%s</text>`, textX, cy-3, color, xmlEscape(valueLabel(f)+" · "+verdict))
			p(`<text x="%d" y="%d" font-size="11" fill="#777">%s× its target</text>`, textX, cy+12, fmtScale(fr))
		}
	}
	tx := x(1)
	p(`<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#1a237e" stroke-width="2.5" stroke-dasharray="6,4"/>`, tx, gridTop-4, tx, gridBottom+4)
	p(`<text x="%.1f" y="%d" font-size="12" font-weight="bold" fill="#1a237e" text-anchor="middle">target (1×)</text>`, tx, gridBottom+18)
	p(`<rect x="20" y="%d" width="14" height="14" fill="#2e7d32"/><text x="40" y="%d" font-size="12" fill="#333">target met</text>`, height-34, height-22)
	p(`<rect x="130" y="%d" width="14" height="14" fill="#c62828"/><text x="150" y="%d" font-size="12" fill="#333">target not met</text>`, height-34, height-22)
	p(`<text x="270" y="%d" font-size="12" fill="#333">ratios are relay path / direct, both on loopback; bars past %s× are cut (white notch)</text>`, height-22, fmtScale(scaleMax))
	p(`</svg>`)
	return b.String()
}

func valueLabel(f *Figure) string {
	s := fmtNum(*f.Value)
	if f.ValueUnit != "" {
		s += " " + f.ValueUnit
	}
	return s
}

func fmtScale(v float64) string {
	s := fmt.Sprintf("%.2f", v)
	s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	return s
}

func sortedKeys(m map[string]bool) []string {
	var k []string
	for _, s := range sections {
		if m[s] {
			k = append(k, s)
		}
	}
	return k
}

// redrawChart writes the chart of a results.json written earlier.
func redrawChart(from, to string) error {
	b, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	var res results
	if err := json.Unmarshal(b, &res); err != nil {
		return fmt.Errorf("%s: %w", from, err)
	}
	return os.WriteFile(to, []byte(chartSVG(&res)), 0o644)
}
