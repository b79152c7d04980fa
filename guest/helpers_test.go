package main

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"testing"
	"time"
)

type testServer struct {
	t     *testing.T
	base  string
	token string
	srv   *Server
}

// startServer runs envd's handler on a random 127.0.0.1 port. An empty token
// means --insecure-no-token.
func startServer(t *testing.T, token string) *testServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(Config{Token: token, Insecure: token == "", BaseEnv: os.Environ()})
	hs := &http.Server{Handler: srv.Handler()}
	go hs.Serve(ln)
	t.Cleanup(func() { hs.Close() })
	return &testServer{t: t, base: "http://" + ln.Addr().String(), token: token, srv: srv}
}

func (ts *testServer) do(method, path string, body io.Reader) *http.Response {
	ts.t.Helper()
	var data []byte
	if body != nil {
		data, _ = io.ReadAll(body)
	}
	req, err := http.NewRequest(method, ts.base+path, bytes.NewReader(data))
	if err != nil {
		ts.t.Fatal(err)
	}
	var nonce string
	if ts.token != "" {
		nonce = signRequest(req.Header, ts.token, method, path, data)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		ts.t.Fatal(err)
	}
	if ts.token != "" {
		checkProof(ts.t, resp, ts.token, nonce)
	}
	return resp
}

// signRequest adds the headers the e2a host sends (auth.go) for a request whose body is data;
// it returns the nonce.
func signRequest(h http.Header, token, method, target string, data []byte) string {
	nonce := newTestNonce()
	ts := strconv.FormatInt(time.Now().UnixMilli(), 10)
	sum := sha256.Sum256(data)
	body := "sha256=" + hex.EncodeToString(sum[:])
	h.Set(hdrTimestamp, ts)
	h.Set(hdrNonce, nonce)
	h.Set(hdrBody, body)
	h.Set(hdrSignature, hex.EncodeToString(mac(token, []byte(requestMessage(method, target, ts, nonce, body)))))
	return nonce
}

func newTestNonce() string {
	b := make([]byte, 16)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// checkProof fails the test if an answer to an accepted request does not prove the token.
func checkProof(t *testing.T, resp *http.Response, token, nonce string) {
	t.Helper()
	got := resp.Header.Get(hdrProof)
	if resp.StatusCode == 401 {
		if got != "" {
			t.Fatalf("a refused request got a proof")
		}
		return
	}
	if got != answerProof(token, nonce) {
		t.Fatalf("answer %d without a valid %s: %q", resp.StatusCode, hdrProof, got)
	}
}

func (ts *testServer) json(method, path string, in any) *http.Response {
	ts.t.Helper()
	var body io.Reader
	if in != nil {
		b, _ := json.Marshal(in)
		body = bytes.NewReader(b)
	}
	return ts.do(method, path, body)
}

// expect checks the status and decodes a JSON body into out (if non-nil).
func expect(t *testing.T, resp *http.Response, status int, out any) {
	t.Helper()
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != status {
		t.Fatalf("status %d, want %d: %s", resp.StatusCode, status, b)
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			t.Fatalf("decoding %s: %v", b, err)
		}
	}
}

// expectError checks an error response's status and code.
func expectError(t *testing.T, resp *http.Response, status int, code string) {
	t.Helper()
	var e struct {
		Error struct {
			Code    string  `json:"code"`
			Message string  `json:"message"`
			Field   *string `json:"field"`
		} `json:"error"`
	}
	expect(t, resp, status, &e)
	if e.Error.Code != code || e.Error.Message == "" {
		t.Fatalf("error %+v, want code %s", e.Error, code)
	}
}

type event struct {
	Type     string  `json:"type"`
	Pid      int     `json:"pid"`
	Data     string  `json:"data"`
	Bytes    int64   `json:"bytes"`
	ExitCode *int    `json:"exit_code"`
	Signal   *string `json:"signal"`
	TimedOut bool    `json:"timed_out"`
}

type result struct {
	events []event
	stdout string
	stderr string
	exit   event
}

// readEvents consumes an NDJSON command stream to its exit event.
func readEvents(t *testing.T, resp *http.Response) result {
	t.Helper()
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("status %d: %s", resp.StatusCode, b)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/x-ndjson" {
		t.Fatalf("content type %q", ct)
	}
	var r result
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 16<<20)
	for sc.Scan() {
		var ev event
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			t.Fatalf("bad line %q: %v", sc.Text(), err)
		}
		r.events = append(r.events, ev)
		switch ev.Type {
		case "stdout":
			r.stdout += ev.Data
		case "stderr":
			r.stderr += ev.Data
		case "exit":
			r.exit = ev
		}
	}
	if len(r.events) < 2 || r.events[0].Type != "start" || r.events[len(r.events)-1].Type != "exit" {
		t.Fatalf("stream must go start..exit, got %+v", r.events)
	}
	return r
}

func (ts *testServer) run(req map[string]any) result {
	ts.t.Helper()
	return readEvents(ts.t, ts.json("POST", "/commands", req))
}

func (ts *testServer) background(req map[string]any) int {
	ts.t.Helper()
	req["background"] = true
	var out struct{ Pid int }
	expect(ts.t, ts.json("POST", "/commands", req), 200, &out)
	if out.Pid <= 0 {
		ts.t.Fatalf("bad pid %d", out.Pid)
	}
	return out.Pid
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func exitCode(t *testing.T, ev event) int {
	t.Helper()
	if ev.ExitCode == nil {
		t.Fatalf("exit event without exit_code: %+v", ev)
	}
	return *ev.ExitCode
}
