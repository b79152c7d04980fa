package main

// Request authentication between the e2a host and envd (docs/protocol.md, "Authentication").
//
// The host never sends the token itself. Each request carries a fresh nonce, a timestamp, a
// description of its body and an HMAC-SHA256 (keyed with the per-sandbox token) over the
// method, the exact request target (path and query as sent), the timestamp, the nonce and the
// body description. envd accepts a request only if the MAC is right, the timestamp is within
// clockWindow of its own clock and the nonce was never seen before; then it answers with
// E2A-Proof = HMAC(token, "e2a-envd-answer-v1\n" + nonce), which the host checks before it
// believes anything in the answer. The body description is either the SHA-256 of the whole
// body (small JSON bodies: envd reads and checks the body before the handler sees it) or
// "framed" (streamed uploads: the body is a sequence of frames, each with its own MAC, see
// frameReader), so no part of a request can be changed without the token.

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

const (
	hdrTimestamp = "E2A-Timestamp" // Unix time of the request, in milliseconds
	hdrNonce     = "E2A-Nonce"     // 32 lowercase hex digits, never used twice
	hdrBody      = "E2A-Body"      // "sha256=<64 hex>" or "framed"
	hdrSignature = "E2A-Signature" // hex HMAC-SHA256(token, requestMessage(...))
	hdrProof     = "E2A-Proof"     // on the answer: hex HMAC-SHA256(token, answerMessage(nonce))

	bodyFramed    = "framed"
	clockWindow   = 30 * time.Second // how far a request's timestamp may be from envd's clock
	maxSignedBody = 16 << 20         // a sha256= body is read whole before the handler runs
	maxFrame      = 1 << 20          // payload bytes of one frame of a framed body
	frameHeader   = 4 + sha256.Size  // big-endian payload length, then the frame's MAC
)

// requestMessage is what the host signs. No field can contain "\n" (checked), so the
// encoding is unambiguous; the prefix keeps request MACs, frame MACs and answer proofs apart.
func requestMessage(method, target, ts, nonce, body string) string {
	return "e2a-envd-request-v1\n" + method + "\n" + target + "\n" + ts + "\n" + nonce + "\n" + body
}

func answerMessage(nonce string) string { return "e2a-envd-answer-v1\n" + nonce }

func mac(token string, parts ...[]byte) []byte {
	m := hmac.New(sha256.New, []byte(token))
	for _, p := range parts {
		m.Write(p)
	}
	return m.Sum(nil)
}

// answerProof is the E2A-Proof header for a request that carried nonce.
func answerProof(token, nonce string) string {
	return hex.EncodeToString(mac(token, []byte(answerMessage(nonce))))
}

// frameMAC covers the request's nonce, the frame's position and its payload.
func frameMAC(token, nonce string, seq uint64, payload []byte) []byte {
	var pos [12]byte
	binary.BigEndian.PutUint64(pos[:8], seq)
	binary.BigEndian.PutUint32(pos[8:], uint32(len(payload)))
	return mac(token, []byte("e2a-envd-frame-v1\n"+nonce+"\n"), pos[:], payload)
}

func isLowerHex(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

// nonceCache remembers the nonces of accepted requests for as long as their timestamp could
// still pass the clock check (2 × clockWindow after arrival), so none is accepted twice.
type nonceCache struct {
	mu    sync.Mutex
	seen  map[string]struct{}
	order []seenNonce // arrival order, oldest first, from head on
	head  int
}

type seenNonce struct {
	nonce string
	at    time.Time
}

// use records nonce; false if it was already used.
func (c *nonceCache) use(nonce string, now time.Time) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.seen == nil {
		c.seen = map[string]struct{}{}
	}
	for c.head < len(c.order) && now.Sub(c.order[c.head].at) > 2*clockWindow {
		delete(c.seen, c.order[c.head].nonce)
		c.order[c.head] = seenNonce{}
		c.head++
	}
	if c.head > 1024 && c.head*2 > len(c.order) { // compact now and then, not per request
		c.order = append(c.order[:0], c.order[c.head:]...)
		c.head = 0
	}
	if _, dup := c.seen[nonce]; dup {
		return false
	}
	c.seen[nonce] = struct{}{}
	c.order = append(c.order, seenNonce{nonce, now})
	return true
}

func unauthorized(format string, args ...any) *apiError {
	return errf(401, "unauthorized", "", format, args...)
}

// verifyRequest checks a request's signature, freshness and nonce and arranges for its body
// to be checked. It returns the nonce to prove the answer with.
func (s *Server) verifyRequest(r *http.Request, now time.Time) (string, *apiError) {
	token := s.cfg.Token
	if token == "" {
		return "", unauthorized("envd has no token")
	}
	ts, nonce, body, sig := r.Header.Get(hdrTimestamp), r.Header.Get(hdrNonce),
		r.Header.Get(hdrBody), r.Header.Get(hdrSignature)
	if ts == "" || nonce == "" || body == "" || sig == "" {
		return "", unauthorized("missing request signature (%s, %s, %s, %s)",
			hdrTimestamp, hdrNonce, hdrBody, hdrSignature)
	}
	ms, err := strconv.ParseInt(ts, 10, 64)
	if err != nil || ms <= 0 || strconv.FormatInt(ms, 10) != ts {
		return "", unauthorized("bad %s", hdrTimestamp)
	}
	if len(nonce) != 32 || !isLowerHex(nonce) {
		return "", unauthorized("bad %s: want 32 lowercase hex digits", hdrNonce)
	}
	if body != bodyFramed && !(strings.HasPrefix(body, "sha256=") && len(body) == 7+64 &&
		isLowerHex(body[7:])) {
		return "", unauthorized("bad %s", hdrBody)
	}
	want := mac(token, []byte(requestMessage(r.Method, r.RequestURI, ts, nonce, body)))
	got, err := hex.DecodeString(sig)
	if err != nil || !hmac.Equal(got, want) {
		return "", unauthorized("bad request signature")
	}
	if skew := now.Sub(time.UnixMilli(ms)); skew > clockWindow || skew < -clockWindow {
		return "", unauthorized("request timestamp is %v away from envd's clock (limit %v)",
			skew.Round(time.Millisecond), clockWindow)
	}
	if !s.nonces.use(nonce, now) {
		return "", unauthorized("request nonce already used (a replay)")
	}
	if body == bodyFramed {
		r.Body = &frameReader{r: r.Body, closer: r.Body, token: token, nonce: nonce}
		r.ContentLength = -1
		return nonce, nil
	}
	data, err := io.ReadAll(io.LimitReader(r.Body, maxSignedBody+1))
	if err != nil {
		return "", errf(400, "invalid_body", "", "reading request body: %v", err)
	}
	if len(data) > maxSignedBody {
		return "", errf(413, "body_too_large", "", "a sha256-signed body is limited to %d bytes; "+
			"stream bigger bodies framed", maxSignedBody)
	}
	sum := sha256.Sum256(data)
	if !hmac.Equal([]byte(hex.EncodeToString(sum[:])), []byte(body[7:])) {
		return "", unauthorized("request body does not match its signature")
	}
	r.Body.Close()
	if len(data) == 0 {
		r.Body = http.NoBody
	} else {
		r.Body = io.NopCloser(bytes.NewReader(data))
	}
	r.ContentLength = int64(len(data))
	return nonce, nil
}

var (
	errBodyTruncated = errors.New("request body ended before its final frame (truncated)")
	errBodyTrailing  = errors.New("request body continues after its final frame")
)

// frameReader reads a framed request body: frames of [4-byte big-endian length n][32-byte
// MAC][n payload bytes], MAC = frameMAC(token, nonce, index, payload), ended by a frame with
// n = 0 and then the end of the body. A payload is released to the reader only after its MAC
// checked, so nothing written from the body was altered, reordered, taken from another
// request or cut short: a body that stops before its final frame is an error, not an EOF.
type frameReader struct {
	r      io.Reader
	closer io.Closer
	token  string
	nonce  string
	seq    uint64
	buf    []byte
	off    int
	err    error
}

func (f *frameReader) Read(p []byte) (int, error) {
	for f.off >= len(f.buf) {
		if f.err != nil {
			return 0, f.err
		}
		f.next()
	}
	n := copy(p, f.buf[f.off:])
	f.off += n
	return n, nil
}

func (f *frameReader) Close() error { return f.closer.Close() }

func (f *frameReader) next() {
	var hdr [frameHeader]byte
	if _, err := io.ReadFull(f.r, hdr[:]); err != nil {
		f.fail(err)
		return
	}
	n := binary.BigEndian.Uint32(hdr[:4])
	if n > maxFrame {
		f.err = fmt.Errorf("request body frame %d is %d bytes (limit %d)", f.seq, n, maxFrame)
		return
	}
	if cap(f.buf) < int(n) {
		f.buf = make([]byte, n)
	}
	f.buf, f.off = f.buf[:n], 0
	if _, err := io.ReadFull(f.r, f.buf); err != nil {
		f.buf = f.buf[:0]
		f.fail(err)
		return
	}
	if !hmac.Equal(hdr[4:], frameMAC(f.token, f.nonce, f.seq, f.buf)) {
		f.buf = f.buf[:0]
		f.err = fmt.Errorf("request body frame %d does not match its signature", f.seq)
		return
	}
	f.seq++
	if n == 0 {
		var one [1]byte
		if _, err := io.ReadFull(f.r, one[:]); err == io.EOF {
			f.err = io.EOF
		} else {
			f.err = errBodyTrailing
		}
	}
}

func (f *frameReader) fail(err error) {
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		f.err = errBodyTruncated
	} else {
		f.err = fmt.Errorf("reading request body: %w", err)
	}
}
