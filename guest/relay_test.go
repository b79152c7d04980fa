package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

func serverPort(t *testing.T, base string) int {
	t.Helper()
	_, p, _ := net.SplitHostPort(strings.TrimPrefix(base, "http://"))
	var port int
	fmt.Sscan(p, &port)
	return port
}

// dialWS opens a signed WebSocket to envd and checks the 101 answer's proof.
func (ts *testServer) dialWS(ctx context.Context, target string, protocols ...string) *websocket.Conn {
	ts.t.Helper()
	hdr := http.Header{}
	nonce := signRequest(hdr, ts.token, "GET", target, nil)
	conn, resp, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(ts.base, "http")+target,
		&websocket.DialOptions{HTTPHeader: hdr, Subprotocols: protocols})
	if err != nil {
		ts.t.Fatal(err)
	}
	checkProof(ts.t, resp, ts.token, nonce)
	conn.SetReadLimit(1 << 20)
	return conn
}

func TestProxyRelaysHTTP(t *testing.T) {
	release := make(chan struct{})
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/stream" {
			io.WriteString(w, "first\n")
			w.(http.Flusher).Flush()
			<-release
			io.WriteString(w, "second\n")
			return
		}
		body, _ := io.ReadAll(r.Body)
		var envdHeaders []string
		for k := range r.Header {
			if strings.HasPrefix(k, "E2a-") {
				envdHeaders = append(envdHeaders, k)
			}
		}
		w.Header().Set(hdrProof, "forged-by-the-service")
		w.WriteHeader(201)
		json.NewEncoder(w).Encode(map[string]any{
			"method": r.Method, "host": r.Host, "path": r.URL.EscapedPath(), "query": r.URL.RawQuery,
			"body": string(body), "envd_headers": envdHeaders, "custom": r.Header.Get("X-Custom"),
		})
	}))
	defer backend.Close()
	port := serverPort(t, backend.URL)
	ts := startServer(t, "tok")

	var got struct {
		Method, Host, Path, Query, Body, Custom string
		EnvdHeaders                             []string `json:"envd_headers"`
	}
	target := fmt.Sprintf("/proxy/%d/a/b%%2Fc?x=1&y=%%20", port)
	resp := ts.do("POST", target, strings.NewReader("payload"))
	if v := resp.Header.Values(hdrProof); len(v) != 1 {
		t.Fatalf("proof headers %q", v)
	}
	expect(t, resp, 201, &got)
	if got.Method != "POST" || got.Host != fmt.Sprintf("127.0.0.1:%d", port) || got.Path != "/a/b%2Fc" ||
		got.Query != "x=1&y=%20" || got.Body != "payload" || len(got.EnvdHeaders) != 0 {
		t.Fatalf("backend saw %+v", got)
	}
	expect(t, ts.do("GET", fmt.Sprintf("/proxy/%d", port), nil), 201, &got)
	if got.Path != "/" || got.Method != "GET" {
		t.Fatalf("backend saw %+v", got)
	}

	// Streams are not buffered.
	resp = ts.do("GET", fmt.Sprintf("/proxy/%d/stream", port), nil)
	br := bufio.NewReader(resp.Body)
	if line, err := br.ReadString('\n'); err != nil || line != "first\n" {
		t.Fatalf("first chunk: %q %v", line, err)
	}
	close(release)
	if rest, _ := io.ReadAll(br); string(rest) != "second\n" {
		t.Fatalf("rest %q", rest)
	}
	resp.Body.Close()

	for _, p := range []string{"0", "65536", "abc", "-1", "080"} {
		expectError(t, ts.do("GET", "/proxy/"+p+"/x", nil), 400, "invalid_port")
	}
	closed := freePort(t)
	expectError(t, ts.do("GET", fmt.Sprintf("/proxy/%d/x", closed), nil), 502, "service_unreachable")
}

func TestProxyRelaysWebSockets(t *testing.T) {
	hosts := make(chan string, 1)
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hosts <- r.Host
		c, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer c.CloseNow()
		c.SetReadLimit(1 << 20)
		for {
			typ, data, err := c.Read(r.Context())
			if err != nil {
				return
			}
			c.Write(r.Context(), typ, append([]byte("echo: "), data...))
		}
	}))
	defer backend.Close()
	port := serverPort(t, backend.URL)
	ts := startServer(t, "tok")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn := ts.dialWS(ctx, fmt.Sprintf("/proxy/%d/devtools/page/1", port))
	defer conn.CloseNow()
	if h := <-hosts; h != fmt.Sprintf("127.0.0.1:%d", port) {
		t.Fatalf("backend saw Host %q", h)
	}
	for _, msg := range []string{"hi", strings.Repeat("x", 100000)} {
		if err := conn.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
			t.Fatal(err)
		}
		typ, data, err := conn.Read(ctx)
		if err != nil || typ != websocket.MessageText || string(data) != "echo: "+msg {
			t.Fatalf("echo %v %d bytes %v", typ, len(data), err)
		}
	}
	conn.Close(websocket.StatusNormalClosure, "")
}

func TestTCPRelay(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { // echo until "quit", then say bye and hang up
				defer c.Close()
				br := bufio.NewReader(c)
				for {
					line, err := br.ReadString('\n')
					if err != nil {
						return
					}
					if line == "quit\n" {
						io.WriteString(c, "bye\n")
						return
					}
					io.WriteString(c, line)
				}
			}()
		}
	}()
	port := ln.Addr().(*net.TCPAddr).Port
	ts := startServer(t, "tok")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn := ts.dialWS(ctx, fmt.Sprintf("/tcp/%d", port), "binary")
	defer conn.CloseNow()
	if conn.Subprotocol() != "binary" {
		t.Fatalf("subprotocol %q", conn.Subprotocol())
	}
	readUntil := func(want string) {
		t.Helper()
		var got strings.Builder
		for !strings.Contains(got.String(), want) {
			typ, data, err := conn.Read(ctx)
			if err != nil {
				t.Fatalf("waiting for %d bytes: %v (got %d)", len(want), err, got.Len())
			}
			if typ != websocket.MessageBinary {
				t.Fatalf("message type %v", typ)
			}
			got.Write(data)
		}
	}
	big := strings.Repeat("y", 300000) + "\n"
	for _, msg := range []string{"hello\n", big} {
		conn.Write(ctx, websocket.MessageBinary, []byte(msg))
		readUntil(msg)
	}
	// The server hanging up ends the WebSocket with a normal close.
	conn.Write(ctx, websocket.MessageBinary, []byte("quit\n"))
	readUntil("bye\n")
	if _, _, err := conn.Read(ctx); websocket.CloseStatus(err) != websocket.StatusNormalClosure {
		t.Fatalf("want a normal close, got %v", err)
	}

	// Without the subprotocol offered, none is chosen.
	conn2 := ts.dialWS(ctx, fmt.Sprintf("/tcp/%d", port))
	if conn2.Subprotocol() != "" {
		t.Fatalf("subprotocol %q", conn2.Subprotocol())
	}
	conn2.Write(ctx, websocket.MessageBinary, []byte("again\n"))
	if _, data, err := conn2.Read(ctx); err != nil || string(data) != "again\n" {
		t.Fatalf("%q %v", data, err)
	}
	conn2.Close(websocket.StatusNormalClosure, "")

	expectError(t, ts.do("GET", fmt.Sprintf("/tcp/%d", freePort(t)), nil), 502, "service_unreachable")
	expectError(t, ts.do("GET", "/tcp/99999", nil), 400, "invalid_port")
}
