VERSION  := $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -X tcprelay/internal/cli.Version=$(VERSION)
BINARIES := relay echoserver expose
FUZZTIME ?= 10s
FUZZMINIMIZE ?= 1s
RUNS     ?= 3
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2

.PHONY: all test lint fuzz bench clean $(BINARIES)

all: $(BINARIES)

$(BINARIES):
	go build -ldflags "$(LDFLAGS)" -o $@ ./cmd/$@

# Every test: the static checks, then the whole suite with the race
# detector (unit, integration, and end to end with the built binaries and
# real clients). End-to-end tests whose program is not installed are
# skipped, and listed at the end.
test: all lint
	@skipped=$$(mktemp); \
	E2E_SKIPPED=$$skipped go test -race -count=1 ./...; status=$$?; \
	if [ -s $$skipped ]; then echo "SKIPPED, for programs not installed (see the README):"; sed 's/^/  /' $$skipped; fi; \
	rm -f $$skipped; exit $$status

# Formatting, vet (here and for macOS), builds for macOS, Windows and
# FreeBSD (agents run there), and staticcheck at a pinned version.
lint:
	@out=$$(gofmt -l .); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	go vet ./...
	GOOS=darwin go vet ./...
	GOOS=darwin go build ./...
	GOOS=windows go build ./...
	GOOS=freebsd go build ./...
	go run $(STATICCHECK) ./...

# Every fuzz target in the repository for FUZZTIME each, found by name (a
# func FuzzXxx in a _test.go file, listed by go test -list), so that a new
# one cannot be left out. A target fails when it writes a failing input to
# testdata/fuzz; Go 1.26's fuzzing can also end a clean run with a bare
# "context deadline exceeded" at FUZZTIME (golang/go#75804, fixed in Go
# 1.27), which is reported and not counted as a failure. Each input that
# finds new code is minimized for at most FUZZMINIMIZE: Go's default of 60 s
# let FuzzHostileRelay, whose inputs take some 10 ms each, spend its whole
# FUZZTIME minimizing its first find (35 inputs run in 20 s; 8,000 with 1 s).
fuzz:
	@set -e; n=0; \
	for dir in $$(grep -rl --include='*_test.go' '^func Fuzz' . | xargs -r -n1 dirname | sort -u); do \
	  fns=$$(go test -list '^Fuzz' $$dir | grep '^Fuzz') || { echo "$$dir: no fuzz target listed"; exit 1; }; \
	  for fn in $$fns; do \
	    echo "go test -run='^\$$' -fuzz='^$$fn\$$' -fuzztime=$(FUZZTIME) -fuzzminimizetime=$(FUZZMINIMIZE) $$dir"; \
	    before=$$(ls $$dir/testdata/fuzz/$$fn 2>/dev/null | wc -l); \
	    if ! go test -run='^$$' -fuzz="^$$fn\$$" -fuzztime=$(FUZZTIME) -fuzzminimizetime=$(FUZZMINIMIZE) $$dir > fuzz.out 2>&1; then \
	      cat fuzz.out; \
	      after=$$(ls $$dir/testdata/fuzz/$$fn 2>/dev/null | wc -l); \
	      if [ "$$after" -gt "$$before" ] || ! grep -q 'context deadline exceeded' fuzz.out; then rm -f fuzz.out; exit 1; fi; \
	      echo "$$fn: no failing input written; the toolchain's end-of-fuzztime race (golang/go#75804), not counted"; \
	    else cat fuzz.out; fi; \
	    rm -f fuzz.out; n=$$((n+1)); \
	  done; \
	done; \
	echo "ran $$n fuzz targets for $(FUZZTIME) each"

# The relay path against a direct connection, side by side on loopback
# (iperf3, CPU per GB, redis-benchmark, connect latency, idle cost, capacity):
# a table on stdout, docs/bench/results.json and docs/bench/results.tsv, and
# docs/bench/chart.svg drawn from the TSV by gnuplot (bench/chart.gp) if it
# is installed (Debian: gnuplot-nox). Timing figures are medians of RUNS
# runs; BENCHFLAGS passes more flags (go run ./bench -h lists them).
bench: all
	go run ./bench -runs $(RUNS) $(BENCHFLAGS)
	@if command -v gnuplot >/dev/null; then gnuplot -c bench/chart.gp docs/bench && echo "wrote docs/bench/chart.svg"; \
	else echo "gnuplot is not installed (Debian: gnuplot-nox): docs/bench/chart.svg not redrawn"; fi

clean:
	rm -f $(BINARIES)
