package main

import (
	"bytes"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"tcprelay/server"
)

// The admin API: a small HTTP JSON API on -admin-addr, for the operator
// and `relay ctl`. Every request carries the token of -admin-token-file
// as "Authorization: Bearer TOKEN"; a wrong or missing one is a 401, and
// counts against its address like a failed agent authentication.
//
//	GET  /v1/agents                     the agent sessions
//	GET  /v1/endpoints                  the public ports, open and reserved
//	GET  /v1/clients                    the outside clients, relayed and waiting
//	POST /v1/clients/close              {"port": P, "client": "IP:PORT"}, or {"host": NAME, ...}: close one client
//	POST /v1/endpoints/{port}/drain     no new clients on the port (or name); existing ones finish
//	POST /v1/endpoints/{port}/resume    new clients again
//	POST /v1/agents/{id}/disconnect     end a session (its id), or every session of an agent (its name)
//	POST /v1/reload                     reload the agents file, or say why not

// readToken reads the admin token from path: its first line, which must
// hold at least 16 characters.
func readToken(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	tok, _, _ := strings.Cut(string(b), "\n")
	tok = strings.TrimSpace(tok)
	if len(tok) < 16 {
		return "", fmt.Errorf("%s: the token is %d characters long, want at least 16", path, len(tok))
	}
	return tok, nil
}

// adminHandler serves the admin API of srv, for requests with token;
// reload reloads the agents file.
func adminHandler(srv *server.Server, token string, reload func() (int, error), log *slog.Logger) http.Handler {
	mux := http.NewServeMux()
	reply := func(w http.ResponseWriter, code int, v any) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		json.NewEncoder(w).Encode(v)
	}
	fail := func(w http.ResponseWriter, err error) {
		code := http.StatusBadRequest
		if errors.Is(err, server.ErrNotFound) {
			code = http.StatusNotFound
		}
		reply(w, code, map[string]string{"error": err.Error()})
	}
	// endpoint reads a port, or a name on the shared port, and the key of
	// the answer that names it.
	endpoint := func(w http.ResponseWriter, s string) (key string, v any, ok bool) {
		if p, err := strconv.Atoi(s); err == nil && p >= 1 && p <= 65535 {
			return "port", p, true
		}
		if s == "" || strings.Trim(s, "0123456789") == "" {
			fail(w, fmt.Errorf("port %q: want 1-65535, or a name", s))
			return "", nil, false
		}
		return "host", s, true
	}
	mux.HandleFunc("GET /v1/agents", func(w http.ResponseWriter, r *http.Request) { reply(w, 200, srv.Agents()) })
	mux.HandleFunc("GET /v1/endpoints", func(w http.ResponseWriter, r *http.Request) { reply(w, 200, srv.Endpoints()) })
	mux.HandleFunc("GET /v1/clients", func(w http.ResponseWriter, r *http.Request) { reply(w, 200, srv.Clients()) })
	mux.HandleFunc("POST /v1/clients/close", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Port   int    `json:"port"`
			Host   string `json:"host"`
			Client string `json:"client"`
		}
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4096)).Decode(&req); err != nil {
			fail(w, fmt.Errorf("want {\"port\": P, \"client\": \"IP:PORT\"} or {\"host\": NAME, \"client\": \"IP:PORT\"}: %w", err))
			return
		}
		ep, key, v := req.Host, "host", any(req.Host)
		if req.Host == "" {
			ep, key, v = strconv.Itoa(req.Port), "port", req.Port
		}
		if err := srv.CloseClient(ep, req.Client); err != nil {
			fail(w, err)
			return
		}
		reply(w, 200, map[string]any{"closed": req.Client, key: v})
	})
	for _, a := range []struct {
		verb  string
		drain bool
	}{{"drain", true}, {"resume", false}} {
		mux.HandleFunc("POST /v1/endpoints/{port}/"+a.verb, func(w http.ResponseWriter, r *http.Request) {
			key, v, ok := endpoint(w, r.PathValue("port"))
			if !ok {
				return
			}
			if err := srv.DrainEndpoint(r.PathValue("port"), a.drain); err != nil {
				fail(w, err)
				return
			}
			reply(w, 200, map[string]any{key: v, "draining": a.drain})
		})
	}
	mux.HandleFunc("POST /v1/agents/{id}/disconnect", func(w http.ResponseWriter, r *http.Request) {
		n, err := srv.DisconnectAgent(r.PathValue("id"))
		if err != nil {
			fail(w, err)
			return
		}
		reply(w, 200, map[string]any{"disconnected": n})
	})
	mux.HandleFunc("POST /v1/reload", func(w http.ResponseWriter, r *http.Request) {
		n, err := reload()
		if err != nil {
			reply(w, http.StatusUnprocessableEntity, map[string]string{"error": err.Error()})
			return
		}
		reply(w, 200, map[string]any{"agents": n})
	})
	want := []byte("Bearer " + token)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ok, throttled := srv.CheckOperator(r.RemoteAddr, func() bool {
			return subtle.ConstantTimeCompare([]byte(r.Header.Get("Authorization")), want) == 1
		})
		switch {
		case throttled:
			w.Header().Set("Retry-After", "1")
			reply(w, http.StatusTooManyRequests, map[string]string{"error": "too many failed authentications from your address: retry in a few seconds"})
			return
		case !ok:
			w.Header().Set("WWW-Authenticate", `Bearer realm="relay"`)
			reply(w, http.StatusUnauthorized, map[string]string{"error": "a wrong or missing token: send Authorization: Bearer TOKEN, the token of the relay's -admin-token-file"})
			return
		}
		if r.Method == http.MethodPost {
			log.Info("admin API", "request", r.Method+" "+r.URL.Path, "remote", r.RemoteAddr)
		}
		mux.ServeHTTP(w, r)
	})
}

// ctl runs `relay ctl [flags] COMMAND [ARGS]`: the admin API's requests,
// from the command line, printed for a person (or as JSON with -json).
func ctl(args []string) int {
	usage := `usage: relay ctl [-addr HOST:PORT] [-token-file FILE] [-json] COMMAND [ARGS]

Talks to a running relay's admin API (relay -admin-addr, -admin-token-file).

commands:
  agents                  list the agent sessions
  endpoints               list the public ports and names, open and reserved
  clients                 list the outside clients, relayed and waiting
  close PORT CLIENT       close the outside client CLIENT (IP:PORT) on PORT
                          (PORT: a public port, or a name on the shared TLS port)
  drain PORT              take no new clients on PORT (or name); the others finish
  resume PORT             take new clients on PORT (or name) again
  disconnect AGENT        end an agent's session (its id), or all of an agent's (its name)
  reload                  reload the agents file; prints why not if it has an error

flags:
  -addr HOST:PORT         the admin API's address (default: $RELAY_ADMIN_ADDR)
  -token-file FILE        the file holding the token (default: $RELAY_ADMIN_TOKEN_FILE)
  -json                   print the API's JSON as it is
`
	addr, tokenFile, raw := os.Getenv("RELAY_ADMIN_ADDR"), os.Getenv("RELAY_ADMIN_TOKEN_FILE"), false
	for len(args) > 0 && strings.HasPrefix(args[0], "-") {
		switch f := strings.TrimLeft(args[0], "-"); {
		case f == "h" || f == "help":
			fmt.Print(usage)
			return 0
		case f == "json":
			raw, args = true, args[1:]
		case (f == "addr" || f == "token-file") && len(args) > 1:
			if f == "addr" {
				addr = args[1]
			} else {
				tokenFile = args[1]
			}
			args = args[2:]
		default:
			fmt.Fprintf(os.Stderr, "relay ctl: unknown flag or missing value: %s\n\n%s", args[0], usage)
			return 2
		}
	}
	need := map[string]int{"agents": 0, "endpoints": 0, "clients": 0, "close": 2, "drain": 1, "resume": 1, "disconnect": 1, "reload": 0}
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, usage)
		return 2
	}
	n, known := need[args[0]]
	switch {
	case !known:
		fmt.Fprintf(os.Stderr, "relay ctl: unknown command %q\n\n%s", args[0], usage)
		return 2
	case len(args)-1 != n:
		fmt.Fprintf(os.Stderr, "relay ctl %s: want %d argument(s), got %d\n\n%s", args[0], n, len(args)-1, usage)
		return 2
	case addr == "" || tokenFile == "":
		fmt.Fprintf(os.Stderr, "relay ctl: give the admin API's -addr and -token-file (or $RELAY_ADMIN_ADDR and $RELAY_ADMIN_TOKEN_FILE)\n")
		return 2
	}
	token, err := readToken(tokenFile)
	if err != nil {
		fmt.Fprintf(os.Stderr, "relay ctl: -token-file: %v\n", err)
		return 1
	}
	method, path, body := "GET", "/v1/"+args[0], []byte(nil)
	switch args[0] {
	case "close":
		req := map[string]any{"host": args[1], "client": args[2]}
		if p, err := strconv.Atoi(args[1]); err == nil {
			req = map[string]any{"port": p, "client": args[2]}
		}
		method, path = "POST", "/v1/clients/close"
		body, _ = json.Marshal(req)
	case "drain", "resume":
		method, path = "POST", "/v1/endpoints/"+url.PathEscape(args[1])+"/"+args[0]
	case "disconnect":
		method, path = "POST", "/v1/agents/"+url.PathEscape(args[1])+"/disconnect"
	case "reload":
		method = "POST"
	}
	req, err := http.NewRequest(method, "http://"+addr+path, bytes.NewReader(body))
	if err != nil {
		fmt.Fprintf(os.Stderr, "relay ctl: %v\n", err)
		return 2
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		fmt.Fprintf(os.Stderr, "relay ctl: %v\n", err)
		return 1
	}
	defer resp.Body.Close()
	var out bytes.Buffer
	out.ReadFrom(resp.Body)
	if resp.StatusCode != 200 {
		var e struct{ Error string }
		json.Unmarshal(out.Bytes(), &e)
		fmt.Fprintf(os.Stderr, "relay ctl %s: %s: %s\n", args[0], resp.Status, e.Error)
		return 1
	}
	if raw {
		os.Stdout.Write(out.Bytes())
		return 0
	}
	printHuman(args[0], out.Bytes())
	return 0
}

// printHuman prints the admin API's answer to command for a person.
func printHuman(command string, b []byte) {
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	defer tw.Flush()
	ago := func(t time.Time) string { return time.Since(t).Round(time.Second).String() }
	switch command {
	case "agents":
		var as []server.AgentInfo
		json.Unmarshal(b, &as)
		fmt.Fprintln(tw, "ID\tNAME\tADDRESS\tPORTS\tPARKED\tFOR\tSOFTWARE")
		for _, a := range as {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%q\n", a.ID, a.Name, a.Addr, ints(a.Ports), a.Parked, ago(a.Since), a.Software)
		}
	case "endpoints":
		var es []server.EndpointInfo
		json.Unmarshal(b, &es)
		fmt.Fprintln(tw, "PORT\tPOOL\tSTATE\tMEMBERS\tCLIENTS\tWAITING\tDENIED\tBYTES IN\tBYTES OUT")
		for _, e := range es {
			state := "open"
			switch {
			case e.Reserved:
				state = "reserved for " + time.Until(e.Until).Round(time.Second).String()
			case e.Draining:
				state = "draining"
			}
			var ms []string
			for _, m := range e.Members {
				r := ""
				if !m.Ready {
					r = " (unready)"
				}
				ms = append(ms, m.Agent+" "+m.Name+r)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\t%d\t%d\t%d\n", endpointName(e.Port, e.Host), shown(e.Pool), state, strings.Join(ms, ", "), e.Clients, e.Waiting, e.Denied, e.BytesIn, e.BytesOut)
		}
	case "clients":
		var cs []server.ClientInfo
		json.Unmarshal(b, &cs)
		fmt.Fprintln(tw, "PORT\tCLIENT\tAGENT\tSTATE\tFOR\tBYTES IN\tBYTES OUT")
		for _, c := range cs {
			state := "relayed"
			if c.Waiting {
				state = "waiting"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%d\n", endpointName(c.Port, c.Host), c.Client, c.Agent, state, ago(c.Since), c.BytesIn, c.BytesOut)
		}
	default:
		var m map[string]any
		json.Unmarshal(b, &m)
		what := fmt.Sprintf("port %v", m["port"])
		if h, ok := m["host"].(string); ok {
			what = "name " + h
		}
		switch command {
		case "close":
			fmt.Fprintf(tw, "closed %v on %s\n", m["closed"], what)
		case "drain":
			fmt.Fprintf(tw, "%s drains: no new clients; the others finish\n", what)
		case "resume":
			fmt.Fprintf(tw, "%s takes new clients again\n", what)
		case "disconnect":
			fmt.Fprintf(tw, "disconnected %s\n", plural(m["disconnected"], "session"))
		case "reload":
			fmt.Fprintf(tw, "agents file reloaded: %s admitted by key\n", plural(m["agents"], "agent"))
		}
	}
}

// shown is what an agent chose (a pool's name), fit for a table: quoted
// if it holds a space or anything that does not print, so it can neither
// shift the columns nor forge a line.
func shown(s string) string {
	if strings.ContainsFunc(s, func(r rune) bool { return !unicode.IsPrint(r) || unicode.IsSpace(r) }) {
		return strconv.Quote(s)
	}
	return s
}

// plural writes n, a JSON number, and what it counts.
func plural(n any, what string) string {
	if f, _ := n.(float64); f != 1 {
		what += "s"
	}
	return fmt.Sprintf("%v %s", n, what)
}

// ints writes ns comma-separated.
func ints(ns []int) string {
	s := make([]string, len(ns))
	for i, n := range ns {
		s[i] = strconv.Itoa(n)
	}
	return strings.Join(s, ",")
}

// endpointName is what the tables show of an endpoint: its port, or its
// name, quoted if it could shift the columns (a name comes from an agent).
func endpointName(port int, host string) string {
	if host != "" {
		return shown(host)
	}
	return strconv.Itoa(port)
}
