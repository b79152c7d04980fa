// Command envd is e2a's in-sandbox agent: it runs as PID 1 inside each
// sandbox and serves the HTTP protocol in docs/protocol.md.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"syscall"
	"time"
)

const tokenEnv = "E2A_ENVD_TOKEN"

func main() {
	// The host passes the sandbox's own address and e2a's port (ENVD_PORT in
	// e2a/runtime/runsc.py, the one place it is defined).
	listen := flag.String("listen", "", "address to listen on, e.g. 10.201.0.2:984 (required)")
	insecure := flag.Bool("insecure-no-token", false, "accept requests without a token (tests only)")
	flag.Parse()
	if *listen == "" {
		fmt.Fprintln(os.Stderr, "envd: --listen is required")
		os.Exit(2)
	}

	token := os.Getenv(tokenEnv)
	if token != "" {
		if err := scrubInitialEnv(tokenEnv); err != nil {
			fmt.Fprintf(os.Stderr, "envd: cannot remove %s from /proc/self/environ: %v\n", tokenEnv, err)
		}
	}
	os.Unsetenv(tokenEnv) // never leaks into children
	if token == "" && !*insecure {
		fmt.Fprintf(os.Stderr, "envd: %s is required (or --insecure-no-token)\n", tokenEnv)
		os.Exit(2)
	}

	// The template's services: only envd needs them, no child may inherit them.
	specs, err := parseServices(os.Getenv(servicesEnv))
	os.Unsetenv(servicesEnv)
	if err != nil {
		fmt.Fprintf(os.Stderr, "envd: %s: %v\n", servicesEnv, err)
		os.Exit(2)
	}

	// Listen first: sandbox creation waits on this port.
	ln, err := listenExclusive(*listen)
	if err != nil {
		fmt.Fprintf(os.Stderr, "envd: %v\n", err)
		os.Exit(1)
	}
	srv := NewServer(Config{Token: token, Insecure: *insecure, BaseEnv: os.Environ(), Services: specs,
		Display: os.Getenv("E2A_ENVD_DISPLAY")}) // the desktop's X display (desktop.go), "" if none
	srv.logs.add("envd %s started, pid %d, listening on %s", version, os.Getpid(), ln.Addr())
	hs := &http.Server{Handler: srv.Handler(), ReadHeaderTimeout: 30 * time.Second}
	srv.startServices() // in the background; the host waits on GET /services/wait
	go watchTermLog(termLogPath, termLogMax, termLogEvery, srv.logs.add, nil)
	err = hs.Serve(ln)
	fmt.Fprintf(os.Stderr, "envd: %v\n", err)
	os.Exit(1)
}

// listenExclusive listens without SO_REUSEADDR (which Go sets on every listener by default).
// gVisor lets a second socket bind an address and port that a listening socket holds as long
// as both set SO_REUSEADDR (Linux refuses that for a listening socket), so with Go's default
// any process in the sandbox, whatever its user, could bind envd's address beside envd and
// receive the host's next connections. Without the flag on envd's socket every such bind
// fails with EADDRINUSE, whatever flags the other socket sets (SO_REUSEADDR, SO_REUSEPORT, the
// wildcard address, IPv4-mapped IPv6), and privileged ports are no help: gVisor does not
// reserve ports below 1024 for CAP_NET_BIND_SERVICE.
func listenExclusive(addr string) (net.Listener, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 0)
		})
		if err != nil {
			return err
		}
		return serr
	}}
	return lc.Listen(context.Background(), "tcp", addr)
}
