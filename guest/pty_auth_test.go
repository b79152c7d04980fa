package main

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

func TestAuth(t *testing.T) {
	ts := startServer(t, "s3cret")
	// The token itself is never a credential any more: the host signs each request (auth.go).
	for _, hdr := range []string{"", "Bearer wrong", "s3cret", "Bearer s3cret2", "Bearer s3cret"} {
		req, _ := http.NewRequest("GET", ts.base+"/health", nil)
		if hdr != "" {
			req.Header.Set("Authorization", hdr)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		expectError(t, resp, 401, "unauthorized")
	}
	var h struct{ Status, Version string }
	expect(t, ts.json("GET", "/health", nil), 200, &h)
	if h.Status != "ok" || h.Version == "" {
		t.Fatalf("health %+v", h)
	}
}

func TestPTYEchoAndResize(t *testing.T) {
	ts := startServer(t, "tok")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	target := "/pty?cols=80&rows=24&user=root&cwd=/tmp"
	u := "ws" + strings.TrimPrefix(ts.base, "http") + target
	hdr := http.Header{}
	nonce := signRequest(hdr, "tok", "GET", target, nil)
	conn, resp, err := websocket.Dial(ctx, u, &websocket.DialOptions{HTTPHeader: hdr})
	if err != nil {
		t.Fatal(err)
	}
	checkProof(t, resp, "tok", nonce) // the 101 answer proves envd too
	defer conn.CloseNow()

	var screen strings.Builder
	// readUntil collects terminal output until it contains want.
	readUntil := func(want string) {
		t.Helper()
		for !strings.Contains(screen.String(), want) {
			typ, data, err := conn.Read(ctx)
			if err != nil {
				t.Fatalf("waiting for %q: %v; got %q", want, err, screen.String())
			}
			if typ != websocket.MessageBinary {
				t.Fatalf("unexpected text frame %s", data)
			}
			screen.Write(data)
		}
	}
	send := func(s string) {
		if err := conn.Write(ctx, websocket.MessageBinary, []byte(s)); err != nil {
			t.Fatal(err)
		}
	}
	// The arithmetic makes the expected text differ from the echoed input.
	send("echo pty-$((40+2)) $TERM; stty size; pwd\n")
	readUntil("pty-42 xterm-256color")
	readUntil("24 80")
	readUntil("/tmp")

	resize, _ := json.Marshal(map[string]any{"type": "resize", "cols": 120, "rows": 40})
	conn.Write(ctx, websocket.MessageText, resize)
	send("stty size\n")
	readUntil("40 120")

	send("exit 7\n")
	for {
		typ, data, err := conn.Read(ctx)
		if err != nil {
			t.Fatalf("no exit frame: %v", err)
		}
		if typ == websocket.MessageText {
			var msg struct {
				Type     string
				ExitCode int `json:"exit_code"`
			}
			if json.Unmarshal(data, &msg) != nil || msg.Type != "exit" || msg.ExitCode != 7 {
				t.Fatalf("exit frame %s", data)
			}
			break
		}
	}
	if _, _, err := conn.Read(ctx); websocket.CloseStatus(err) != websocket.StatusNormalClosure {
		t.Fatalf("want normal close, got %v", err)
	}
}

func TestPTYRejectsBadRequestWithJSON(t *testing.T) {
	ts := startServer(t, "")
	expectError(t, ts.json("GET", "/pty?user=no-such-user-xyz", nil), 400, "invalid_user")
	expectError(t, ts.json("GET", "/pty?cols=0", nil), 400, "invalid_size")
}
