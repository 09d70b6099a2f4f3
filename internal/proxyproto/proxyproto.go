// Package proxyproto writes PROXY protocol headers (HAProxy's "PROXY
// protocol" specification, versions 1 and 2), so a server behind ./expose
// learns each outside client's real address.
package proxyproto

import (
	"encoding/binary"
	"fmt"
	"net"
	"strconv"
)

// v2Signature starts every version 2 header.
var v2Signature = []byte{0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A}

// Header returns the header announcing a TCP connection from src to dst, in
// the given version (1 or 2). When either address is not an IP address the
// header says the addresses are unknown (v1 "PROXY UNKNOWN", v2 a LOCAL
// command), and the receiver falls back to the connection's own addresses.
// An IP address that is neither 4 nor 16 bytes long, or a port outside
// 0-65535, is an error: no header can carry it.
func Header(version int, src, dst net.Addr) ([]byte, error) {
	s, sok := src.(*net.TCPAddr)
	d, dok := dst.(*net.TCPAddr)
	known := sok && dok && s.IP != nil && d.IP != nil
	if known {
		for _, a := range []*net.TCPAddr{s, d} {
			if len(a.IP) != net.IPv4len && len(a.IP) != net.IPv6len {
				return nil, fmt.Errorf("PROXY header: IP address of %d bytes (%v)", len(a.IP), a.IP)
			}
			if a.Port < 0 || a.Port > 65535 {
				return nil, fmt.Errorf("PROXY header: port %d out of range", a.Port)
			}
		}
	}
	v4 := known && s.IP.To4() != nil && d.IP.To4() != nil
	switch version {
	case 1:
		if !known {
			return []byte("PROXY UNKNOWN\r\n"), nil
		}
		// Go prints IPv4-mapped addresses as dotted quads; TCP6 needs the
		// IPv6 form.
		family, sip, dip := "TCP6", ipv6String(s.IP), ipv6String(d.IP)
		if v4 {
			family, sip, dip = "TCP4", s.IP.To4().String(), d.IP.To4().String()
		}
		return []byte("PROXY " + family + " " + sip + " " + dip + " " +
			strconv.Itoa(s.Port) + " " + strconv.Itoa(d.Port) + "\r\n"), nil
	case 2:
		h := append([]byte(nil), v2Signature...)
		switch {
		case !known:
			// Command LOCAL with AF_UNSPEC: the spec requires receivers to
			// accept it and use the connection's own addresses.
			h = append(h, 0x20, 0x00, 0, 0)
		case v4:
			h = append(h, 0x21, 0x11, 0, 12) // version 2 PROXY, TCP over IPv4
			h = append(h, s.IP.To4()...)
			h = append(h, d.IP.To4()...)
			h = binary.BigEndian.AppendUint16(h, uint16(s.Port))
			h = binary.BigEndian.AppendUint16(h, uint16(d.Port))
		default:
			h = append(h, 0x21, 0x21, 0, 36) // version 2 PROXY, TCP over IPv6
			h = append(h, s.IP.To16()...)
			h = append(h, d.IP.To16()...)
			h = binary.BigEndian.AppendUint16(h, uint16(s.Port))
			h = binary.BigEndian.AppendUint16(h, uint16(d.Port))
		}
		return h, nil
	}
	return nil, fmt.Errorf("PROXY protocol version %d: want 1 or 2", version)
}

// ipv6String formats ip in IPv6 notation, IPv4-mapped addresses included.
func ipv6String(ip net.IP) string {
	ip16 := ip.To16()
	if ip.To4() == nil {
		return ip16.String()
	}
	return "::ffff:" + ip.To4().String()
}
