VERSION := $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X tcprelay/internal/cli.Version=$(VERSION)
BINARIES := relay echoserver

.PHONY: all test clean $(BINARIES)

all: $(BINARIES)

$(BINARIES):
	go build -ldflags "$(LDFLAGS)" -o $@ ./cmd/$@

test: all
	go vet ./...
	go test -race -count=1 ./...

clean:
	rm -f $(BINARIES)
