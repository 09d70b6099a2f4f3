package proto

import (
	"fmt"
	"strings"
)

// ALPN is the TLS application protocol an agent offers when it dials a
// relay over TLS: on a relay's shared TLS port, it tells the agent from
// the outside clients, whatever server name the agent sent.
const ALPN = "tcprelay"

// MaxHostname is the longest DNS name, in bytes, without a trailing dot.
const MaxHostname = 253

// CheckHostname reports whether name, lowercased, is a DNS name of letters,
// digits and hyphens: labels of 1 to 63 bytes, neither starting nor ending
// with a hyphen, at most MaxHostname bytes in all. A name that a TLS client
// would send in its ClientHello is one of these.
func CheckHostname(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("empty name")
	case len(name) > MaxHostname:
		return fmt.Errorf("name %.40q... is longer than %d bytes", name, MaxHostname)
	}
	for label := range strings.SplitSeq(name, ".") {
		if err := checkLabel(label); err != nil {
			return fmt.Errorf("name %q: %w", name, err)
		}
	}
	return nil
}

func checkLabel(l string) error {
	switch {
	case l == "":
		return fmt.Errorf("an empty label")
	case len(l) > 63:
		return fmt.Errorf("a label longer than 63 bytes")
	case l[0] == '-' || l[len(l)-1] == '-':
		return fmt.Errorf("label %q starts or ends with a hyphen", l)
	}
	for i := 0; i < len(l); i++ {
		if c := l[i]; !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return fmt.Errorf("label %q has %q: only letters, digits and hyphens", l, c)
		}
	}
	return nil
}

// FullHostname is the name an agent's request for name stands for on a
// relay whose shared port serves domain: name under domain ("db" is
// db.DOMAIN), or name itself if it already ends with domain. Letters are
// lowercased and one trailing dot dropped; the result is checked with
// CheckHostname and may not be domain itself (the relay's own name).
func FullHostname(name, domain string) (string, error) {
	name = strings.TrimSuffix(strings.ToLower(name), ".")
	domain = strings.ToLower(domain)
	if name != domain && !strings.HasSuffix(name, "."+domain) {
		name += "." + domain
	}
	if err := CheckHostname(name); err != nil {
		return "", err
	}
	if name == domain {
		return "", fmt.Errorf("name %q is the relay's own", name)
	}
	return name, nil
}
