package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// A follower that never reads must not stall the process: it writes 20 MiB
// and must exit promptly even though the client's socket buffers fill up.
func TestSlowFollowerDoesNotBlockProcess(t *testing.T) {
	ts := startServer(t, "")
	conn, err := net.Dial("tcp", strings.TrimPrefix(ts.base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	body := `{"cmd":"head -c 20000000 /dev/zero"}`
	fmt.Fprintf(conn, "POST /commands HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	// Never read from conn. Wait for the command to leave the running list.
	time.Sleep(100 * time.Millisecond)
	waitFor(t, "command to exit", func() bool {
		var list struct{ Commands []struct{ Cmd string } }
		expect(t, ts.json("GET", "/commands", nil), 200, &list)
		for _, c := range list.Commands {
			if strings.Contains(c.Cmd, "head -c 20000000") {
				return false
			}
		}
		return true
	})
}

func TestPTYClientDisconnectEndsShell(t *testing.T) {
	ts := startServer(t, "")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(ts.base, "http")+"/pty", nil)
	if err != nil {
		t.Fatal(err)
	}
	conn.Write(ctx, websocket.MessageBinary, []byte("echo ready\n"))
	for {
		_, data, err := conn.Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(data), "ready\r\n") {
			break
		}
	}
	conn.CloseNow()
	waitFor(t, "pty shell to exit", func() bool {
		for _, l := range ts.srv.logs.snapshot() {
			if strings.HasPrefix(l.Message, "pty exited") {
				return true
			}
		}
		return false
	})
}

func TestRecoverReturnsJSON(t *testing.T) {
	s := NewServer(Config{Insecure: true})
	h := s.recoverer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { panic("boom") }))
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/", nil))
	if rec.Code != 500 || !strings.Contains(rec.Body.String(), `"code":"internal"`) {
		t.Fatalf("%d %s", rec.Code, rec.Body)
	}
}
