package main

import (
	"archive/tar"
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// rawSend sends a request with exactly the given headers and body (no signing of its own), as
// an attacker who captured or altered a signed request would.
func rawSend(t *testing.T, ts *testServer, method, target string, h http.Header, body []byte) *http.Response {
	t.Helper()
	req, err := http.NewRequest(method, ts.base+target, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range h {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func signed(token, method, target string, body []byte) (http.Header, string) {
	h := http.Header{}
	nonce := signRequest(h, token, method, target, body)
	return h, nonce
}

func TestReplayedRequestIsRefused(t *testing.T) {
	ts := startServer(t, "tok")
	marker := filepath.Join(t.TempDir(), "runs")
	body := []byte(`{"cmd":"echo x >> ` + marker + `"}`)
	h, nonce := signed("tok", "POST", "/commands", body)
	resp := rawSend(t, ts, "POST", "/commands", h, body)
	checkProof(t, resp, "tok", nonce)
	readEvents(t, resp)
	// The same bytes again: refused, and the command did not run a second time.
	expectError(t, rawSend(t, ts, "POST", "/commands", h, body), 401, "unauthorized")
	if b, _ := os.ReadFile(marker); string(b) != "x\n" {
		t.Fatalf("command ran %q", b)
	}
}

func TestAlteredRequestIsRefused(t *testing.T) {
	ts := startServer(t, "tok")
	dir := t.TempDir()
	marker := filepath.Join(dir, "ran")
	body := []byte(`{"cmd":"touch ` + marker + `"}`)
	cases := map[string]func() (string, string, http.Header, []byte){
		"JSON body swapped (user root)": func() (string, string, http.Header, []byte) {
			h, _ := signed("tok", "POST", "/commands", body)
			return "POST", "/commands", h, []byte(`{"cmd":"touch ` + marker + `","user":"root"}`)
		},
		"query added": func() (string, string, http.Header, []byte) {
			h, _ := signed("tok", "GET", "/files?path="+q(dir), nil)
			return "GET", "/files?path=" + q(dir) + "&user=root", h, nil
		},
		"path changed": func() (string, string, http.Header, []byte) {
			h, _ := signed("tok", "GET", "/health", nil)
			return "GET", "/logs", h, nil
		},
		"method changed": func() (string, string, http.Header, []byte) {
			h, _ := signed("tok", "GET", "/files?path="+q(marker), nil)
			return "DELETE", "/files?path=" + q(marker), h, nil
		},
		"timestamp changed": func() (string, string, http.Header, []byte) {
			h, _ := signed("tok", "POST", "/commands", body)
			ms, _ := strconv.ParseInt(h.Get(hdrTimestamp), 10, 64)
			h.Set(hdrTimestamp, strconv.FormatInt(ms+1, 10))
			return "POST", "/commands", h, body
		},
		"nonce changed": func() (string, string, http.Header, []byte) {
			h, _ := signed("tok", "POST", "/commands", body)
			h.Set(hdrNonce, newTestNonce())
			return "POST", "/commands", h, body
		},
		"body said framed": func() (string, string, http.Header, []byte) {
			h, _ := signed("tok", "POST", "/commands", body)
			h.Set(hdrBody, bodyFramed)
			return "POST", "/commands", h, body
		},
		"signed with another token": func() (string, string, http.Header, []byte) {
			h, _ := signed("not-the-token", "POST", "/commands", body)
			return "POST", "/commands", h, body
		},
		"signature missing": func() (string, string, http.Header, []byte) {
			h, _ := signed("tok", "POST", "/commands", body)
			h.Del(hdrSignature)
			return "POST", "/commands", h, body
		},
		"bearer token": func() (string, string, http.Header, []byte) {
			return "POST", "/commands", http.Header{"Authorization": {"Bearer tok"}}, body
		},
	}
	for name, mk := range cases {
		t.Run(name, func(t *testing.T) {
			method, target, h, b := mk()
			resp := rawSend(t, ts, method, target, h, b)
			if resp.Header.Get(hdrProof) != "" {
				t.Fatal("a refused request got a proof")
			}
			expectError(t, resp, 401, "unauthorized")
		})
	}
	if fileExists(marker) {
		t.Fatal("an altered request ran its command")
	}
}

func TestStaleOrFutureTimestampIsRefused(t *testing.T) {
	ts := startServer(t, "tok")
	for _, off := range []time.Duration{-clockWindow - 2*time.Second, clockWindow + 2*time.Second} {
		nonce := newTestNonce()
		stamp := strconv.FormatInt(time.Now().Add(off).UnixMilli(), 10)
		h := http.Header{}
		sum := "sha256=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" // of ""
		h.Set(hdrTimestamp, stamp)
		h.Set(hdrNonce, nonce)
		h.Set(hdrBody, sum)
		h.Set(hdrSignature, hex.EncodeToString(mac("tok", []byte(requestMessage("GET", "/health", stamp, nonce, sum)))))
		expectError(t, rawSend(t, ts, "GET", "/health", h, nil), 401, "unauthorized")
	}
}

func TestAnswerProofIsBoundToTheNonce(t *testing.T) {
	ts := startServer(t, "tok")
	h1, n1 := signed("tok", "GET", "/health", nil)
	h2, n2 := signed("tok", "GET", "/health", nil)
	r1, r2 := rawSend(t, ts, "GET", "/health", h1, nil), rawSend(t, ts, "GET", "/health", h2, nil)
	defer r1.Body.Close()
	defer r2.Body.Close()
	p1, p2 := r1.Header.Get(hdrProof), r2.Header.Get(hdrProof)
	if p1 != answerProof("tok", n1) || p2 != answerProof("tok", n2) || p1 == p2 {
		t.Fatalf("proofs %q %q", p1, p2)
	}
	// A request envd refuses gets no proof: envd is no oracle for proofs over chosen nonces.
	h3, _ := signed("wrong", "GET", "/health", nil)
	r3 := rawSend(t, ts, "GET", "/health", h3, nil)
	if r3.Header.Get(hdrProof) != "" {
		t.Fatal("proof on a refused request")
	}
	expectError(t, r3, 401, "unauthorized")
}

func TestNonceCacheForgetsOnlyExpiredNonces(t *testing.T) {
	var c nonceCache
	t0 := time.Now()
	if !c.use("a", t0) || c.use("a", t0.Add(time.Second)) || c.use("a", t0.Add(2*clockWindow)) {
		t.Fatal("a nonce was accepted twice within its window")
	}
	if !c.use("b", t0.Add(2*clockWindow+time.Second)) || !c.use("a", t0.Add(2*clockWindow+time.Second)) {
		t.Fatal("expired nonce not forgotten")
	}
	if len(c.seen) != 2 || len(c.order)-c.head != 2 {
		t.Fatalf("cache holds %d entries", len(c.seen))
	}
	// Many requests over a long time: memory stays bounded by the window.
	for i := 0; i < 5000; i++ {
		c.use(strconv.Itoa(i), t0.Add(time.Duration(i)*100*time.Millisecond))
	}
	if n := len(c.seen); n > 2*int(clockWindow/(100*time.Millisecond))+2 || len(c.order) > 2*n+1100 {
		t.Fatalf("cache holds %d nonces in %d slots", n, len(c.order))
	}
}

// frames builds a framed body (auth.go's frameReader) of the given payloads and its end frame.
func frames(token, nonce string, payloads ...[]byte) []byte {
	var buf bytes.Buffer
	for i, p := range append(payloads, nil) {
		var n [4]byte
		binary.BigEndian.PutUint32(n[:], uint32(len(p)))
		buf.Write(n[:])
		buf.Write(frameMAC(token, nonce, uint64(i), p))
		buf.Write(p)
	}
	return buf.Bytes()
}

func signedFramed(token, method, target string) (http.Header, string) {
	nonce := newTestNonce()
	stamp := strconv.FormatInt(time.Now().UnixMilli(), 10)
	h := http.Header{}
	h.Set(hdrTimestamp, stamp)
	h.Set(hdrNonce, nonce)
	h.Set(hdrBody, bodyFramed)
	h.Set(hdrSignature, hex.EncodeToString(mac(token, []byte(requestMessage(method, target, stamp, nonce, bodyFramed)))))
	return h, nonce
}

func TestFramedUploads(t *testing.T) {
	ts := startServer(t, "tok")
	dir := t.TempDir()
	put := func(name string, body func(nonce string) []byte) *http.Response {
		target := "/files?path=" + q(filepath.Join(dir, name))
		h, nonce := signedFramed("tok", "PUT", target)
		return rawSend(t, ts, "PUT", target, h, body(nonce))
	}
	resp := put("ok.txt", func(n string) []byte { return frames("tok", n, []byte("hello "), []byte("world")) })
	expect(t, resp, 200, nil)
	if b, _ := os.ReadFile(filepath.Join(dir, "ok.txt")); string(b) != "hello world" {
		t.Fatalf("got %q", b)
	}

	bad := map[string]func(nonce string) []byte{
		"payload altered": func(n string) []byte {
			b := frames("tok", n, []byte("hello "), []byte("world"))
			b[len(b)-frameHeader-1] ^= 1 // last byte of "world"
			return b
		},
		"frames reordered": func(n string) []byte {
			b := frames("tok", n, []byte("hello "), []byte("world"))
			f0, f1, end := b[:frameHeader+6], b[frameHeader+6:2*frameHeader+11], b[2*frameHeader+11:]
			return bytes.Join([][]byte{f1, f0, end}, nil)
		},
		"truncated (no end frame)": func(n string) []byte {
			b := frames("tok", n, []byte("hello "), []byte("world"))
			return b[:len(b)-frameHeader]
		},
		"frames of another request": func(n string) []byte {
			return frames("tok", newTestNonce(), []byte("hello world"))
		},
		"data after the end frame": func(n string) []byte {
			return append(frames("tok", n, []byte("hello world")), "more"...)
		},
		"raw body instead of frames": func(n string) []byte { return []byte("hello world, unframed and long enough for a header") },
	}
	for name, body := range bad {
		t.Run(name, func(t *testing.T) {
			expectError(t, put("bad.txt", body), 400, "upload_failed")
			if fileExists(filepath.Join(dir, "bad.txt")) {
				t.Fatal("an altered upload was written")
			}
			if left, _ := filepath.Glob(filepath.Join(dir, ".envd-upload-*")); len(left) != 0 {
				t.Fatalf("temp files left: %v", left)
			}
		})
	}

	// A tar upload whose frames were altered writes nothing of the altered part.
	tarBody := makeTar(t, &tar.Header{Name: "a.txt", Typeflag: tar.TypeReg})
	target := "/files/tar?path=" + q(filepath.Join(dir, "t"))
	h, nonce := signedFramed("tok", "PUT", target)
	framed := frames("tok", nonce, tarBody)
	framed[frameHeader+600] ^= 1 // inside the file's data block
	resp = rawSend(t, ts, "PUT", target, h, framed)
	expectError(t, resp, 400, "invalid_tar")
	if fileExists(filepath.Join(dir, "t", "a.txt")) {
		t.Fatal("an altered tar was extracted")
	}
}

func TestSignedBodyLimit(t *testing.T) {
	ts := startServer(t, "tok")
	body := []byte(strings.Repeat("x", maxSignedBody+1))
	h, _ := signed("tok", "POST", "/init", body)
	resp := rawSend(t, ts, "POST", "/init", h, body)
	io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != 413 {
		t.Fatalf("status %d", resp.StatusCode)
	}
}
