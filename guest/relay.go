package main

// Relays from the host to servers inside the sandbox that listen on 127.0.0.1 only (a
// browser's DevTools, a VNC server, an app's dev server): /proxy/{port}/... for HTTP (and
// WebSocket upgrades), /tcp/{port} for a raw TCP stream carried over a WebSocket. The
// request reaching envd is signed like every other (auth.go); what goes on to the local
// server is the client's request without envd's authentication headers.

import (
	"context"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/coder/websocket"
)

const tcpRelayReadLimit = 4 << 20 // largest WebSocket message accepted by /tcp

// parsePort reads a port path segment: decimal digits only, 1..65535.
func parsePort(s string) (int, error) {
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > 65535 || s != strconv.Itoa(n) {
		return 0, errf(400, "invalid_port", "port", "port must be a number from 1 to 65535")
	}
	return n, nil
}

// proxyTransport is the relay's own transport: never an HTTP proxy from the environment,
// and bodies passed through as they are (no gzip added and undone on the way).
var proxyTransport = &http.Transport{
	Proxy:               nil,
	DialContext:         (&net.Dialer{Timeout: 10 * time.Second}).DialContext,
	MaxIdleConnsPerHost: 16,
	IdleConnTimeout:     90 * time.Second,
	DisableCompression:  true,
}

var envdAuthHeaders = []string{hdrTimestamp, hdrNonce, hdrBody, hdrSignature, hdrProof}

// handleProxy relays any request under /proxy/{port}/ to http://127.0.0.1:{port}/, the path
// (still escaped as the client sent it) and query kept. The Host header becomes
// 127.0.0.1:{port}: Chromium's DevTools, among others, refuses any other host name.
func (s *Server) handleProxy(w http.ResponseWriter, r *http.Request) error {
	port, err := parsePort(r.PathValue("port"))
	if err != nil {
		return err
	}
	// The rest of the escaped path after /proxy/{port}, so that %2F and the like reach the
	// server as sent. The mux matched the same path, so it has this shape.
	_, rest, _ := strings.Cut(strings.TrimPrefix(r.URL.EscapedPath(), "/proxy/"), "/")
	rawPath := "/" + rest
	path, err := url.PathUnescape(rawPath)
	if err != nil {
		return errf(400, "invalid_path", "path", "bad escape in path: %v", err)
	}
	host := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL = &url.URL{Scheme: "http", Host: host, Path: path, RawPath: rawPath, RawQuery: r.URL.RawQuery}
			pr.Out.Host = host
			for _, h := range envdAuthHeaders {
				pr.Out.Header.Del(h)
			}
		},
		Transport:     proxyTransport,
		FlushInterval: -1, // no buffering: event streams and long polls pass as they come
		ModifyResponse: func(resp *http.Response) error {
			// Only envd proves envd: a local server cannot add a proof of its own. (The proof
			// that s.auth put in w's headers stays; for a 101 answer ReverseProxy writes w's
			// headers plus the server's, see handleUpgradeResponse.)
			resp.Header.Del(hdrProof)
			return nil
		},
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			if r.Context().Err() != nil {
				return // the client is gone
			}
			writeError(w, errf(502, "service_unreachable", "port", "nothing answered on port %d: %v", port, err))
		},
		ErrorLog: log.New(io.Discard, "", 0),
	}
	rp.ServeHTTP(w, r)
	return nil
}

// handleTCP is a websockify: it connects to 127.0.0.1:{port} and carries the TCP byte stream in
// binary WebSocket messages both ways, until either side ends; then both are closed.
func (s *Server) handleTCP(w http.ResponseWriter, r *http.Request) error {
	port, err := parsePort(r.PathValue("port"))
	if err != nil {
		return err
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return errf(502, "service_unreachable", "port", "nothing answered on port %d: %v", port, err)
	}
	return bridge(w, r, conn)
}

// bridge carries a byte stream in binary WebSocket messages both ways (noVNC speaks RFB to a
// VNC server this way) until either side ends; then both are closed.
func bridge(w http.ResponseWriter, r *http.Request, stream net.Conn) error {
	defer stream.Close()
	opts := &websocket.AcceptOptions{InsecureSkipVerify: true, CompressionMode: websocket.CompressionDisabled}
	for _, p := range websocketProtocols(r) {
		if p == "binary" { // noVNC offers it; accepting it tells it to send binary messages
			opts.Subprotocols = []string{"binary"}
		}
	}
	conn, err := websocket.Accept(w, r, opts)
	if err != nil {
		return nil // Accept already answered
	}
	defer conn.CloseNow()
	conn.SetReadLimit(tcpRelayReadLimit)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { // client → server
		defer stream.Close() // ends the copy below too
		for {
			// Text messages are passed on as bytes too: only their payload matters here.
			_, data, err := conn.Read(ctx)
			if err != nil {
				return
			}
			if _, err := stream.Write(data); err != nil {
				return
			}
		}
	}()
	buf := make([]byte, 64<<10)
	for { // server → client
		n, err := stream.Read(buf)
		if n > 0 {
			if conn.Write(ctx, websocket.MessageBinary, buf[:n]) != nil {
				return nil
			}
		}
		if err != nil {
			conn.Close(websocket.StatusNormalClosure, "")
			return nil
		}
	}
}

// websocketProtocols lists the subprotocols the client offers.
func websocketProtocols(r *http.Request) []string {
	var out []string
	for _, v := range r.Header.Values("Sec-WebSocket-Protocol") {
		for _, p := range strings.Split(v, ",") {
			if p = strings.TrimSpace(p); p != "" {
				out = append(out, p)
			}
		}
	}
	return out
}
