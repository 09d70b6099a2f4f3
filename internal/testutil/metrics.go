package testutil

import (
	"bufio"
	"bytes"
	"strconv"
	"strings"
	"testing"

	"tcprelay/server"
)

// Metrics parses the relay's WriteMetrics output into sample → value (a
// sample with labels is keyed name{labels}), checking that every sample has
// its TYPE line.
func Metrics(t testing.TB, s *server.Server) map[string]int64 {
	t.Helper()
	var buf bytes.Buffer
	if err := s.WriteMetrics(&buf); err != nil {
		t.Fatal(err)
	}
	out := map[string]int64{}
	typed := map[string]bool{}
	sc := bufio.NewScanner(&buf)
	for sc.Scan() {
		line := sc.Text()
		if name, ok := strings.CutPrefix(line, "# TYPE "); ok {
			typed[strings.Fields(name)[0]] = true
			continue
		}
		if strings.HasPrefix(line, "#") || line == "" {
			continue
		}
		f := strings.Fields(line)
		name, _, _ := strings.Cut(f[0], "{")
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if len(f) != 2 || err != nil || !typed[name] {
			t.Fatalf("bad metrics line %q", line)
		}
		out[f[0]] = int64(v)
	}
	return out
}
