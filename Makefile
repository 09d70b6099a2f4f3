VERSION  := $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -X tcprelay/internal/cli.Version=$(VERSION)
BINARIES := relay echoserver expose
FUZZTIME ?= 10s

.PHONY: all test fuzz clean $(BINARIES)

all: $(BINARIES)

$(BINARIES):
	go build -ldflags "$(LDFLAGS)" -o $@ ./cmd/$@

# Every test: formatting, vet, then the whole suite with the race detector
# (unit, integration and end-to-end tests with real nc and telnet).
test: all
	@out=$$(gofmt -l .); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	go vet ./...
	go test -race -count=1 ./...

# Each fuzz target for FUZZTIME.
fuzz:
	go test -run='^$$' -fuzz='^FuzzParse$$' -fuzztime=$(FUZZTIME) ./internal/proto
	go test -run='^$$' -fuzz='^FuzzReadFrame$$' -fuzztime=$(FUZZTIME) ./internal/proto

clean:
	rm -f $(BINARIES)
