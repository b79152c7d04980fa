// Command envd is e2a's in-sandbox agent: it runs as PID 1 inside each
// sandbox and serves the HTTP protocol in docs/protocol.md.
package main

import (
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"
)

const tokenEnv = "E2A_ENVD_TOKEN"

func main() {
	listen := flag.String("listen", "0.0.0.0:49983", "address to listen on")
	insecure := flag.Bool("insecure-no-token", false, "accept requests without a token (tests only)")
	flag.Parse()

	token := os.Getenv(tokenEnv)
	os.Unsetenv(tokenEnv) // never leaks into children
	if token == "" && !*insecure {
		fmt.Fprintf(os.Stderr, "envd: %s is required (or --insecure-no-token)\n", tokenEnv)
		os.Exit(2)
	}

	// Listen first: sandbox creation waits on this port.
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintf(os.Stderr, "envd: %v\n", err)
		os.Exit(1)
	}
	srv := NewServer(Config{Token: token, Insecure: *insecure, BaseEnv: os.Environ()})
	srv.logs.add("envd %s started, pid %d, listening on %s", version, os.Getpid(), ln.Addr())
	hs := &http.Server{Handler: srv.Handler(), ReadHeaderTimeout: 30 * time.Second}
	err = hs.Serve(ln)
	fmt.Fprintf(os.Stderr, "envd: %v\n", err)
	os.Exit(1)
}
