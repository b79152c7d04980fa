package main

import (
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// newCanvas makes a canvas directory owned by nobody, with a root-only file beside it, and
// points the server's canvas there, read as nobody.
func newCanvas(t *testing.T, ts *testServer) (dir, secret string) {
	t.Helper()
	base, nobody := sharedTempDir(t, "envd-canvas")
	dir, secret = base+"/canvas", base+"/secret"
	os.WriteFile(secret, []byte("root-only secret"), 0o600)
	os.Mkdir(dir, 0o755)
	os.Chown(dir, int(nobody.Uid), int(nobody.Gid))
	ts.srv.svc.canvas.dir, ts.srv.svc.canvas.user = dir, "nobody"
	return dir, secret
}

func getCanvas(t *testing.T, ts *testServer, p string) (*http.Response, string) {
	t.Helper()
	resp := ts.do("GET", "/canvas/files/"+p, nil)
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, string(b)
}

func TestCanvasServesFilesAsTheUser(t *testing.T) {
	ts := startServer(t, "tok")
	dir, secret := newCanvas(t, ts)
	os.WriteFile(dir+"/index.html", []byte("<h1>hi</h1>"), 0o644)
	os.WriteFile(dir+"/app.js", []byte("let x = 1"), 0o644)
	os.WriteFile(dir+"/blob.zzq", []byte("?"), 0o644)
	os.Mkdir(dir+"/sub", 0o755)
	os.WriteFile(dir+"/sub/index.html", []byte("sub page"), 0o644)
	os.Symlink(secret, dir+"/leak.txt")
	os.Symlink("/proc/self/environ", dir+"/env.txt")

	for _, c := range []struct{ path, body, ctype string }{
		{"", "<h1>hi</h1>", "text/html; charset=utf-8"},
		{"index.html", "<h1>hi</h1>", "text/html; charset=utf-8"},
		{"app.js", "let x = 1", "text/javascript; charset=utf-8"},
		{"blob.zzq", "?", "application/octet-stream"},
		{"sub/", "sub page", "text/html; charset=utf-8"},
		{"sub", "sub page", "text/html; charset=utf-8"},
	} {
		resp, body := getCanvas(t, ts, c.path)
		if resp.StatusCode != 200 || body != c.body || resp.Header.Get("Content-Type") != c.ctype ||
			resp.Header.Get("Cache-Control") != "no-store" {
			t.Fatalf("%q: %d %q %q %q", c.path, resp.StatusCode, body, resp.Header.Get("Content-Type"),
				resp.Header.Get("Cache-Control"))
		}
	}
	expectError(t, ts.do("GET", "/canvas/files/missing.html", nil), 404, "not_found")
	expectError(t, ts.do("GET", "/canvas/files/sub/missing/x", nil), 404, "not_found")
	// A symlink to what the user may not read: refused, never its bytes.
	expectError(t, ts.do("GET", "/canvas/files/leak.txt", nil), 403, "permission_denied")
	expectError(t, ts.do("GET", "/canvas/files/env.txt", nil), 403, "permission_denied")
	expectError(t, ts.do("GET", "/canvas/files/a%00b", nil), 400, "invalid_path")
	assertAllThreadsRoot(t)

	// Traversal: ServeMux redirects unclean paths before the handler; whatever answers, it is
	// never the secret (and the handler's own check refuses it anyway, below).
	noRedirect := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	for _, p := range []string{"..%2Fsecret", "%2e%2e/secret", "sub/..%2F..%2Fsecret", "%2Fetc%2Fpasswd"} {
		target := "/canvas/files/" + p
		req, _ := http.NewRequest("GET", ts.base+target, nil)
		signRequest(req.Header, "tok", "GET", target, nil)
		resp, err := noRedirect.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == 200 || strings.Contains(string(b), "secret") || strings.Contains(string(b), "root:") {
			t.Fatalf("%s: %d %q", p, resp.StatusCode, b)
		}
	}
	for _, p := range []string{"..", "../secret", "a/../../secret", "/etc/passwd", "a\x00b", `..\secret`} {
		if _, err := canvasPath(p); err == nil {
			t.Errorf("canvasPath accepted %q", p)
		}
	}
	if p, err := canvasPath("sub/"); err != nil || p != "sub/index.html" {
		t.Fatalf("sub/: %q %v", p, err)
	}
}

func TestCanvasChangesLongPoll(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root")
	}
	ts := startServer(t, "tok")
	dir := t.TempDir() + "/canvas" // missing at first: a valid state
	ts.srv.svc.canvas.dir, ts.srv.svc.canvas.user = dir, "root"

	version := func(query string) int64 {
		t.Helper()
		var out struct{ Version int64 }
		expect(t, ts.json("GET", "/canvas/changes"+query, nil), 200, &out)
		return out.Version
	}
	v0 := version("")
	if v0 == 0 {
		t.Fatal("no version")
	}
	start := time.Now()
	if v := version("?since=" + strconv.FormatInt(v0, 10) + "&timeout_ms=300"); v != v0 || time.Since(start) < 300*time.Millisecond {
		t.Fatalf("nothing changed but got %d after %v", v, time.Since(start))
	}
	// Each kind of change ends a waiting poll: the directory appearing, a file created,
	// changed in size, removed.
	steps := []func(){
		func() { os.Mkdir(dir, 0o755) },
		func() { os.WriteFile(dir+"/index.html", []byte("a"), 0o644) },
		func() { os.WriteFile(dir+"/index.html", []byte("ab"), 0o644) },
		func() { os.Remove(dir + "/index.html") },
	}
	v := v0
	for i, change := range steps {
		got := make(chan int64, 1)
		go func() { got <- version("?since=" + strconv.FormatInt(v, 10) + "&timeout_ms=10000") }()
		time.Sleep(300 * time.Millisecond)
		changed := time.Now()
		change()
		select {
		case nv := <-got:
			if nv == v || time.Since(changed) > 2*time.Second {
				t.Fatalf("step %d: version %d after %v", i, nv, time.Since(changed))
			}
			v = nv
		case <-time.After(5 * time.Second):
			t.Fatalf("step %d: no answer", i)
		}
	}
	expectError(t, ts.json("GET", "/canvas/changes?timeout_ms=60001", nil), 400, "invalid_timeout")
	expectError(t, ts.json("GET", "/canvas/changes?since=x", nil), 400, "invalid_version")
}
