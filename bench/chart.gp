# Draws the bench's chart from the results.tsv that `go run ./bench` writes:
# each timing figure of the relay path as a ratio to direct, and what one
# idle relayed connection costs. make bench runs it if gnuplot is installed
# (Debian: gnuplot-nox).
#
#   gnuplot -c bench/chart.gp [DIR [OUT]]   # DIR/results.tsv -> OUT, by default DIR/chart.svg (.png works too)

dir = ARGC >= 1 ? ARG1 : "docs/bench"
out = ARGC >= 2 ? ARG2 : dir."/chart.svg"
if (out[strlen(out)-3:] eq ".png") {
    set terminal pngcairo size 1000,820 font "DejaVu Sans,10"
} else {
    set terminal svg size 1000,820 font "DejaVu Sans,11" background "white"
}
set output out
set datafile separator "\t"
set datafile missing "-"
data = dir."/results.tsv"

# A row is charted if its section (column 1) is one of sections and it
# has a value in column col; charted rows are numbered from 1, top down.
ok(sections, col) = strstrt(" ".sections." ", " ".strcol(1)." ") > 0 && valid(col)
x(sections, col) = ok(sections, col) ? column(col) : NaN
y(sections, col) = ok(sections, col) ? (n = n + 1) : NaN

set multiplot layout 2,1 title "tcprelay: the relay path against a direct connection, on loopback" font ",14"
set style fill solid 0.85 noborder
set grid xtics lc "gray80"
unset ytics
unset key
set lmargin 48
set offsets 0, graph 0.15, 0, 0

# Each panel: the charted rows as bars named by column 2; a panel without
# rows is left empty.
s = "iperf redis latency"
set title "relay / direct: above 1 is slower (µs), below 1 is less (Gbit/s, req/s)"
set arrow 1 from 1, graph 0 to 1, graph 1 nohead dt 2 lw 1.5 lc "black" back
n = 0
set autoscale
stats data skip 1 using (y(s, 6), 0) nooutput # counts the rows in n
if (n > 0) {
    set xrange [0:*]
    set yrange [n + 0.6:0.4]
    plot n = 0, data skip 1 using (x(s, 6)/2):(y(s, 6)):(x(s, 6)/2):(0.35) with boxxyerror lc "steelblue", \
         n = 0, data skip 1 using (0):(y(s, 6)):(strcol(2)." ") with labels right font ",9", \
         n = 0, data skip 1 using (x(s, 6)):(y(s, 6)):(sprintf(" %.2f", $6)) with labels left font ",9"
} else {
    set multiplot next
}
unset arrow 1

s = "idle"
set title "one idle relayed connection costs (fds, KiB of RSS)"
n = 0
set autoscale
stats data skip 1 using (y(s, 5), 0) nooutput
if (n > 0) {
    set xrange [0:*]
    set yrange [n + 0.6:0.4]
    plot n = 0, data skip 1 using (x(s, 5)/2):(y(s, 5)):(x(s, 5)/2):(0.35):(strcol(3) eq "fds" ? 0x8c8c8c : 0xe8890c) \
             with boxxyerror lc rgb variable, \
         n = 0, data skip 1 using (0):(y(s, 5)):(strcol(2)." ") with labels right font ",9", \
         n = 0, data skip 1 using (x(s, 5)):(y(s, 5)):(sprintf(" %.2f %s", $5, strcol(3))) with labels left font ",9"
}
unset multiplot
