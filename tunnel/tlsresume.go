package tunnel

import "crypto/tls"

// relayTLS returns the TLS configurations for the connections to one relay,
// dialed at addr and verified as host unless cfg names a server: full, for
// the control connection and for a data connection with no session to
// resume; and resume, for a data connection that resumes one (nil: resume
// with full).
//
// resume offers X25519 alone, where full offers Go's default key exchanges,
// post-quantum X25519MLKEM768 first. A resumed TLS 1.3 handshake derives
// every key from the session's pre-shared key as well as from its own
// exchange (RFC 8446, section 7.1), and that key descends from a full
// handshake made with full: a resumed data connection is as safe from a
// future quantum computer as that handshake was, without ML-KEM's key
// shares. Those cost about a quarter of a resumed handshake's CPU at each
// end, and over 1 KiB of handshake buffers that crypto/tls keeps for the
// connection's life. A relay that refuses the session (restarted, or its
// ticket keys rotated) would make that handshake a full one with X25519
// alone: dialRelay closes such a connection unused and dials with full.
//
// A configuration that chooses its own key exchanges or stops below TLS 1.3
// is used as it is. Sessions are cached per relay address, so that relays
// that share a host name (a fleet on one host's ports) each resume their
// own.
func relayTLS(cfg *tls.Config, host, addr string) (full, resume *tls.Config) {
	full = cfg.Clone()
	if full.ServerName == "" {
		full.ServerName = host
	}
	if full.ClientSessionCache == nil {
		return full, nil
	}
	full.ClientSessionCache = perRelay{full.ClientSessionCache, addr + " "}
	if len(full.CurvePreferences) > 0 || full.MaxVersion != 0 && full.MaxVersion < tls.VersionTLS13 {
		return full, nil
	}
	resume = full.Clone()
	resume.CurvePreferences = []tls.CurveID{tls.X25519}
	return full, resume
}

// hasSession reports whether cfg's cache holds a session to resume.
func hasSession(cfg *tls.Config) bool {
	cs, ok := cfg.ClientSessionCache.Get(cfg.ServerName)
	return ok && cs != nil
}

// perRelay keys a session cache by relay address as well.
type perRelay struct {
	tls.ClientSessionCache
	prefix string
}

func (c perRelay) Get(key string) (*tls.ClientSessionState, bool) {
	return c.ClientSessionCache.Get(c.prefix + key)
}

func (c perRelay) Put(key string, cs *tls.ClientSessionState) {
	c.ClientSessionCache.Put(c.prefix+key, cs)
}
