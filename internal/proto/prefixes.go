package proto

import (
	"fmt"
	"net/netip"
	"strings"
)

// ParsePrefixes reads a comma-separated list of CIDR prefixes
// ("10.0.0.0/8,2001:db8::/32"); a bare address is a prefix of its own
// (/32 or /128). The empty string is an empty list.
func ParsePrefixes(s string) ([]netip.Prefix, error) {
	if s == "" {
		return nil, nil
	}
	var ps []netip.Prefix
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		p, err := netip.ParsePrefix(f)
		if err != nil {
			a, aerr := netip.ParseAddr(f)
			if aerr != nil {
				return nil, fmt.Errorf("%q is not a CIDR prefix (such as 192.0.2.0/24) or an address", f)
			}
			p = netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen())
		}
		ps = append(ps, p.Masked())
	}
	return ps, nil
}

// FormatPrefixes writes ps as ParsePrefixes reads them.
func FormatPrefixes(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}
