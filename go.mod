module tcprelay

go 1.26.0

require (
	github.com/pires/go-proxyproto v0.15.0
	golang.org/x/net v0.62.0
)

require (
	github.com/coder/websocket v1.8.15
	golang.org/x/sys v0.49.0
)

require golang.org/x/text v0.43.0 // indirect
