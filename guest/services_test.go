package main

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

// startServicesServer is startServer with template services, started as main starts them.
func startServicesServer(t *testing.T, token string, specs []ServiceSpec) *testServer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := NewServer(Config{Token: token, Insecure: token == "", BaseEnv: os.Environ(), Services: specs})
	hs := &http.Server{Handler: srv.Handler()}
	go hs.Serve(ln)
	srv.startServices()
	t.Cleanup(func() { srv.svc.stop(); hs.Close() })
	return &testServer{t: t, base: "http://" + ln.Addr().String(), token: token, srv: srv}
}

// helperService is a service run by this test binary (TestServiceHelperProcess): mode is
// "tcp" (listen on addr), "unix" (listen on the socket addr), "env" (print the environment)
// or "sleep"; each prints "hello from <mode>" first, after delay.
func helperService(name, mode, addr string, delay time.Duration, ready ReadySpec) ServiceSpec {
	return ServiceSpec{
		Name: name, User: "root", Ready: ready,
		Argv: []string{os.Args[0], "-test.run=^TestServiceHelperProcess$"},
		Env: map[string]string{
			"ENVD_TEST_SERVICE": mode, "ENVD_TEST_ADDR": addr,
			"ENVD_TEST_DELAY": delay.String(), "SPEC_VAR": "from-spec",
		},
	}
}

func TestServiceHelperProcess(t *testing.T) {
	mode := os.Getenv("ENVD_TEST_SERVICE")
	if mode == "" {
		return // not run as a service
	}
	delay, _ := time.ParseDuration(os.Getenv("ENVD_TEST_DELAY"))
	time.Sleep(delay)
	fmt.Println("hello from", mode)
	switch mode {
	case "tcp", "unix":
		ln, err := net.Listen(mode, os.Getenv("ENVD_TEST_ADDR"))
		if err != nil {
			fmt.Println(err)
			os.Exit(1)
		}
		for {
			c, err := ln.Accept()
			if err != nil {
				os.Exit(1)
			}
			c.Close()
		}
	case "env":
		for _, kv := range os.Environ() {
			fmt.Println(kv)
		}
	}
	time.Sleep(time.Hour)
	os.Exit(0)
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func servicesNow(ts *testServer) servicesStatus {
	ts.t.Helper()
	var st servicesStatus
	expect(ts.t, ts.json("GET", "/services", nil), 200, &st)
	return st
}

func logIndex(s *Server, substr string) int {
	for i, l := range s.logs.snapshot() {
		if strings.Contains(l.Message, substr) {
			return i
		}
	}
	return -1
}

func TestServicesStartInOrderEachOnceThePreviousIsReady(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("services run as root here")
	}
	port := freePort(t)
	sock := t.TempDir() + "/b.sock"
	ts := startServicesServer(t, "tok", []ServiceSpec{
		helperService("a", "tcp", fmt.Sprintf("127.0.0.1:%d", port), 400*time.Millisecond, ReadySpec{TCP: port}),
		helperService("b", "unix", sock, 200*time.Millisecond, ReadySpec{Unix: sock}),
		helperService("c", "sleep", "", 0, ReadySpec{}),
	})
	var st servicesStatus
	waitFor(t, "a starting", func() bool { st = servicesNow(ts); return st.Services[0].State == "starting" })
	if st.Ready || len(st.Services) != 3 || st.Services[0].State != "starting" || st.Services[0].Pid == nil ||
		st.Services[1].State != "waiting" || st.Services[2].State != "waiting" {
		t.Fatalf("right after start: %+v", st)
	}
	// Not ready within 100 ms: the wait answers 200 with ready false.
	expect(t, ts.json("GET", "/services/wait?timeout_ms=100", nil), 200, &st)
	if st.Ready {
		t.Fatalf("ready too early: %+v", st)
	}
	start := time.Now()
	expect(t, ts.json("GET", "/services/wait?timeout_ms=10000", nil), 200, &st)
	if !st.Ready || time.Since(start) > 5*time.Second {
		t.Fatalf("not ready: %+v", st)
	}
	for _, sv := range st.Services {
		if sv.State != "ready" || !sv.Ready || sv.Pid == nil || sv.Restarts != 0 || sv.LastExit != nil {
			t.Fatalf("service %+v", sv)
		}
	}
	// Each started only once the one before it was ready.
	order := []int{
		logIndex(ts.srv, "service a started"), logIndex(ts.srv, "service a ready"),
		logIndex(ts.srv, "service b started"), logIndex(ts.srv, "service b ready"),
		logIndex(ts.srv, "service c started"), logIndex(ts.srv, "service c ready"),
	}
	for i := 1; i < len(order); i++ {
		if order[i-1] < 0 || order[i] <= order[i-1] {
			t.Fatalf("log order %v: %+v", order, ts.srv.logs.snapshot())
		}
	}
	waitFor(t, "output", func() bool {
		out := servicesNow(ts).Services[0].Output
		return len(out) == 1 && out[0] == "hello from tcp"
	})
}

func TestServiceRestartsWithBackoffAfterItIsKilled(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("services run as root here")
	}
	ts := startServicesServer(t, "", []ServiceSpec{helperService("s", "sleep", "", 0, ReadySpec{})})
	var st servicesStatus
	expect(t, ts.json("GET", "/services/wait", nil), 200, &st)
	pid := *st.Services[0].Pid

	for i, minGap := range []time.Duration{500 * time.Millisecond, time.Second} {
		killed := time.Now()
		syscall.Kill(pid, syscall.SIGKILL)
		waitFor(t, "the restart", func() bool {
			st = servicesNow(ts)
			return st.Services[0].Restarts == i+1 && st.Services[0].Pid != nil
		})
		if gap := time.Since(killed); gap < minGap-50*time.Millisecond || gap > minGap+time.Second {
			t.Fatalf("restart %d after %v, want about %v", i+1, gap, minGap)
		}
		sv := st.Services[0]
		if *sv.Pid == pid || sv.LastExit == nil || sv.LastExit.ExitCode == nil || *sv.LastExit.ExitCode != 137 ||
			sv.LastExit.Signal == nil || *sv.LastExit.Signal != "SIGKILL" {
			t.Fatalf("after restart %d: %+v %+v", i+1, sv, sv.LastExit)
		}
		pid = *sv.Pid
		expect(t, ts.json("GET", "/services/wait", nil), 200, &st)
		if !st.Ready {
			t.Fatalf("not ready again: %+v", st)
		}
	}
	if logIndex(ts.srv, "service s exited pid=") < 0 {
		t.Fatal("no exit line in the log")
	}
}

func TestServiceThatCannotStartIsRetried(t *testing.T) {
	ts := startServicesServer(t, "", []ServiceSpec{{Name: "broken", Argv: []string{"/no/such/binary"}}})
	waitFor(t, "two attempts", func() bool { return servicesNow(ts).Services[0].Restarts >= 2 })
	sv := servicesNow(ts).Services[0]
	if sv.Ready || sv.Pid != nil || sv.LastExit == nil || sv.LastExit.ExitCode != nil ||
		!strings.Contains(sv.LastExit.Error, "/no/such/binary") {
		t.Fatalf("%+v %+v", sv, sv.LastExit)
	}
	var st servicesStatus
	expect(t, ts.json("GET", "/services/wait?timeout_ms=50", nil), 200, &st)
	if st.Ready {
		t.Fatal("a broken service counts as ready")
	}
	expectError(t, ts.json("GET", "/services/wait?timeout_ms=120001", nil), 400, "invalid_timeout")
	expectError(t, ts.json("GET", "/services/wait?timeout_ms=x", nil), 400, "invalid_timeout")
}

func TestNoServicesAreReadyAtOnce(t *testing.T) {
	ts := startServer(t, "tok")
	var st servicesStatus
	expect(t, ts.json("GET", "/services/wait?timeout_ms=100000", nil), 200, &st)
	if !st.Ready || st.Services == nil || len(st.Services) != 0 {
		t.Fatalf("%+v", st)
	}
}

// E2A_ENVD_SERVICES reaches neither commands nor the services themselves; a service gets the
// environment a command of its user gets, plus its spec's env.
func TestServicesEnvIsNotInherited(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("services run as root here")
	}
	t.Setenv(servicesEnv, `[{"name": "x", "argv": ["true"]}]`)
	ts := startServicesServer(t, "", []ServiceSpec{helperService("env", "env", "", 0, ReadySpec{})})
	r := ts.run(map[string]any{"cmd": "env"})
	if strings.Contains(r.stdout, servicesEnv) || !strings.Contains(r.stdout, "HOME=") {
		t.Fatalf("command env: %s", r.stdout)
	}
	waitFor(t, "the service's env", func() bool {
		return strings.Contains(strings.Join(servicesNow(ts).Services[0].Output, "\n"), "SPEC_VAR=from-spec")
	})
	out := strings.Join(servicesNow(ts).Services[0].Output, "\n")
	if strings.Contains(out, servicesEnv) || !strings.Contains(out, "HOME=/root") || !strings.Contains(out, "USER=root") {
		t.Fatalf("service env: %s", out)
	}
}

func TestParseServices(t *testing.T) {
	specs, err := parseServices(`[{"name": "chromium", "argv": ["chromium", "--headless"], "ready": {"tcp": 9222},
		"env": {"K": "V"}, "cwd": "/tmp"}, {"name": "x", "argv": ["Xvfb"], "user": "root", "ready": {"unix": "/tmp/.X11-unix/X0"}},
		{"name": "plain", "argv": ["sleep", "1"], "ready": {}}]`)
	if err != nil || len(specs) != 3 || specs[0].Ready.TCP != 9222 || specs[0].Env["K"] != "V" || specs[0].User != "" ||
		specs[1].Ready.Unix != "/tmp/.X11-unix/X0" || specs[2].Ready != (ReadySpec{}) {
		t.Fatalf("%+v %v", specs, err)
	}
	if specs, err := parseServices(""); err != nil || specs != nil {
		t.Fatalf("empty: %v %v", specs, err)
	}
	for _, bad := range []string{
		`{`, `{"name": "a"}`, `[{"name": "a", "argv": ["x"]}] x`,
		`[{"name": "a", "argv": ["x"], "ready": {"port": 1}}]`,
		`[{"argv": ["x"]}]`, `[{"name": "a"}]`, `[{"name": "a", "argv": [""]}]`,
		`[{"name": "a", "argv": ["x"]}, {"name": "a", "argv": ["y"]}]`,
		`[{"name": "a", "argv": ["x"], "ready": {"tcp": 70000}}]`,
		`[{"name": "a", "argv": ["x"], "ready": {"tcp": 1, "unix": "/s"}}]`,
		`[{"name": "a", "argv": ["x"], "env": {"A=B": "c"}}]`,
		`[{"name": "a", "argv": ["x\u0000"]}]`,
	} {
		if _, err := parseServices(bad); err == nil {
			t.Errorf("accepted %s", bad)
		}
	}
}
