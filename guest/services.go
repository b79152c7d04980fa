package main

// Template services: long-running processes (a browser, an X server, a VNC server, ...) that
// a template's sandbox starts when envd starts, one after the other, each once the previous
// one is ready, and that envd keeps running (restarting them with a backoff when they exit).
// The host passes them in E2A_ENVD_SERVICES (main.go) and waits on GET /services/wait before
// it hands the sandbox out.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

const (
	servicesEnv = "E2A_ENVD_SERVICES" // JSON list of ServiceSpec, read (and removed) by main

	serviceReadyWait  = 30 * time.Second       // how long a service may keep the next one waiting
	serviceReadyPoll  = 50 * time.Millisecond  // readiness probe interval while starting
	serviceMinBackoff = 500 * time.Millisecond // first restart delay, doubled per quick exit
	serviceMaxBackoff = 10 * time.Second
	serviceStableRun  = 30 * time.Second // a run this long resets the backoff
	serviceOutLines   = 100              // output lines kept per service
	serviceLineMax    = 4096             // longer output lines are cut
	maxServicesWait   = 120000           // ms, GET /services/wait
)

// ServiceSpec is one service of a template, as the host sends it.
type ServiceSpec struct {
	Name  string            `json:"name"`
	Argv  []string          `json:"argv"`
	User  string            `json:"user"` // "" = the default user (`user`)
	Env   map[string]string `json:"env"`
	Ready ReadySpec         `json:"ready"`
	Cwd   string            `json:"cwd"` // "" = the user's home
}

// ReadySpec says when a service counts as ready: once 127.0.0.1:TCP accepts a connection,
// once the Unix socket Unix accepts one, or (neither set) as soon as it started.
type ReadySpec struct {
	TCP  int    `json:"tcp,omitempty"`
	Unix string `json:"unix,omitempty"`
}

// parseServices decodes and checks E2A_ENVD_SERVICES ("" = no services). Unknown fields are
// errors: a typo in a template ("ready": {"port": 1}) must not pass silently.
func parseServices(s string) ([]ServiceSpec, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	var specs []ServiceSpec
	dec := json.NewDecoder(strings.NewReader(s))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&specs); err != nil {
		return nil, fmt.Errorf("invalid JSON: %v", err)
	}
	if dec.More() {
		return nil, fmt.Errorf("invalid JSON: data after the list")
	}
	names := map[string]bool{}
	for i, sp := range specs {
		switch {
		case sp.Name == "" || strings.ContainsAny(sp.Name, "\x00\n"):
			return nil, fmt.Errorf("service %d: invalid name %q", i, sp.Name)
		case names[sp.Name]:
			return nil, fmt.Errorf("service %q: name used twice", sp.Name)
		case len(sp.Argv) == 0 || sp.Argv[0] == "":
			return nil, fmt.Errorf("service %q: argv is required", sp.Name)
		case sp.Ready.TCP < 0 || sp.Ready.TCP > 65535:
			return nil, fmt.Errorf("service %q: ready.tcp must be a port (1-65535)", sp.Name)
		case sp.Ready.TCP != 0 && sp.Ready.Unix != "":
			return nil, fmt.Errorf("service %q: ready takes tcp or unix, not both", sp.Name)
		case strings.ContainsRune(sp.Cwd+sp.Ready.Unix+sp.User, 0):
			return nil, fmt.Errorf("service %q: NUL byte in cwd, user or ready.unix", sp.Name)
		}
		for _, a := range sp.Argv {
			if strings.ContainsRune(a, 0) {
				return nil, fmt.Errorf("service %q: NUL byte in argv", sp.Name)
			}
		}
		if err := validateEnv(sp.Env); err != nil {
			return nil, fmt.Errorf("service %q: %v", sp.Name, err)
		}
		names[sp.Name] = true
	}
	return specs, nil
}

// services is the state behind services.go, relay.go and canvas.go (Server.svc).
type services struct {
	ctx    context.Context // cancelled by stop (tests): supervisors end, services are killed
	cancel context.CancelFunc

	mu      sync.Mutex // guards every service's fields below and changed
	list    []*service
	changed chan struct{} // closed and replaced whenever a service changes state

	canvas canvasWatch // canvas.go
}

type service struct {
	spec     ServiceSpec
	state    string // waiting (for the services before it), starting, ready, backoff
	pid      int    // 0 when not running
	restarts int
	lastExit *serviceExit
	out      []string // the last serviceOutLines lines of stdout and stderr, oldest first
}

// serviceExit is how a service's last run ended.
type serviceExit struct {
	ExitCode *int    `json:"exit_code"` // null when it could not start at all
	Signal   *string `json:"signal"`
	Error    string  `json:"error,omitempty"` // why it could not start
	At       string  `json:"at"`
}

func newServices(specs []ServiceSpec) *services {
	ctx, cancel := context.WithCancel(context.Background())
	ss := &services{ctx: ctx, cancel: cancel, changed: make(chan struct{})}
	for _, sp := range specs {
		ss.list = append(ss.list, &service{spec: sp, state: "waiting"})
	}
	ss.canvas.init()
	return ss
}

// update changes service state under the lock and wakes GET /services/wait.
func (ss *services) update(f func()) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	f()
	close(ss.changed)
	ss.changed = make(chan struct{})
}

// stop ends supervision and kills the services (tests; envd itself never stops them).
func (ss *services) stop() {
	ss.cancel()
	ss.mu.Lock()
	defer ss.mu.Unlock()
	for _, sv := range ss.list {
		if sv.pid > 0 {
			syscall.Kill(-sv.pid, syscall.SIGKILL)
		}
	}
}

func (s *Server) serviceRoutes(mux *http.ServeMux) {
	mux.HandleFunc("GET /services", h(s.handleServices))
	mux.HandleFunc("GET /services/wait", h(s.handleServicesWait))
	// relay.go; "/proxy/{port}" too, or ServeMux would answer it with a redirect.
	mux.HandleFunc("/proxy/{port}", h(s.handleProxy))
	mux.HandleFunc("/proxy/{port}/{path...}", h(s.handleProxy))
	mux.HandleFunc("GET /tcp/{port}", h(s.handleTCP))
	// canvas.go
	mux.HandleFunc("GET /canvas/files/{path...}", h(s.handleCanvasFile))
	mux.HandleFunc("GET /canvas/changes", h(s.handleCanvasChanges))
}

// startServices starts the template's services in order, each once the previous one is
// ready or has had serviceReadyWait, and supervises them; it returns at once.
func (s *Server) startServices() {
	go func() {
		for _, sv := range s.svc.list {
			ready := make(chan struct{})
			go s.superviseService(sv, ready)
			select {
			case <-ready:
			case <-time.After(serviceReadyWait):
				s.logs.add("service %s not ready after %v, starting the next one", sv.spec.Name, serviceReadyWait)
			case <-s.svc.ctx.Done():
				return
			}
		}
	}()
}

// superviseService runs sv for ever: start, wait for readiness, wait for the exit, back off,
// start again. ready is closed the first time sv is ready.
func (s *Server) superviseService(sv *service, ready chan struct{}) {
	ss := s.svc
	var readyOnce sync.Once
	markReady := func() { readyOnce.Do(func() { close(ready) }) }
	backoff := serviceMinBackoff
	for {
		started := time.Now()
		ex := serviceExit{}
		pid, exitCh, err := s.spawnService(sv)
		if err != nil {
			ex.Error = err.Error()
			s.logs.add("service %s cannot start: %v", sv.spec.Name, err)
		} else {
			ws, ok := s.watchService(sv, pid, exitCh, markReady)
			if !ok {
				return // stopped
			}
			// Whatever the service left in its process group (a browser's helper processes)
			// would hold its ports and sockets against the next run.
			syscall.Kill(-pid, syscall.SIGKILL)
			info := exitFromStatus(ws)
			ex.ExitCode = &info.Code
			if info.Signal != "" {
				ex.Signal = &info.Signal
			}
		}
		if time.Since(started) >= serviceStableRun {
			backoff = serviceMinBackoff
		}
		ex.At = time.Now().UTC().Format(time.RFC3339Nano)
		ss.update(func() {
			sv.state, sv.pid, sv.lastExit = "backoff", 0, &ex
			sv.restarts++
		})
		if ex.ExitCode != nil {
			msg := fmt.Sprintf("service %s exited pid=%d exit_code=%d", sv.spec.Name, pid, *ex.ExitCode)
			if ex.Signal != nil {
				msg += " signal=" + *ex.Signal
			}
			s.logs.add("%s, restarting in %v", msg, backoff)
		}
		select {
		case <-time.After(backoff):
		case <-ss.ctx.Done():
			return
		}
		backoff = min(2*backoff, serviceMaxBackoff)
	}
}

// watchService follows one run of sv: it probes readiness every serviceReadyPoll until ready
// and returns the exit status; false if supervision was stopped meanwhile.
func (s *Server) watchService(sv *service, pid int, exitCh <-chan syscall.WaitStatus, markReady func()) (syscall.WaitStatus, bool) {
	ss := s.svc
	ss.update(func() { sv.state, sv.pid = "starting", pid })
	tick := time.NewTicker(serviceReadyPoll)
	defer tick.Stop()
	poll := tick.C
	for {
		if poll != nil && sv.spec.Ready.probe() {
			poll = nil // ready: stop probing
			ss.update(func() { sv.state = "ready" })
			s.logs.add("service %s ready pid=%d", sv.spec.Name, pid)
			markReady()
		}
		select {
		case ws := <-exitCh:
			return ws, true
		case <-poll:
		case <-ss.ctx.Done():
			syscall.Kill(-pid, syscall.SIGKILL)
			<-exitCh
			return 0, false
		}
	}
}

// probe says whether the service answers as its ReadySpec says.
func (r ReadySpec) probe() bool {
	var network, addr string
	switch {
	case r.TCP != 0:
		network, addr = "tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(r.TCP))
	case r.Unix != "":
		network, addr = "unix", r.Unix
	default:
		return true
	}
	c, err := net.DialTimeout(network, addr, time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// spawnService starts one run of sv the way POST /commands starts a command: as its user (uid,
// gid, groups), in its own session and process group, with the environment commands get plus
// the spec's env; stdin is /dev/null, stdout and stderr go to one pipe read into sv.out.
func (s *Server) spawnService(sv *service) (int, <-chan syscall.WaitStatus, error) {
	sp := sv.spec
	// Looked up on every start: the image may change its users at runtime.
	u, err := lookupUser(sp.User)
	if err != nil {
		return 0, nil, fmt.Errorf("unknown user %q", sp.User)
	}
	cred, err := u.credential()
	if err != nil {
		return 0, nil, err
	}
	cwd, err := commandCwd(u, sp.Cwd)
	if err != nil {
		return 0, nil, err
	}
	env := s.buildEnv(u, sp.Env)
	path, err := lookPath(sp.Argv[0], env, cwd)
	if err != nil {
		return 0, nil, fmt.Errorf("%s: %v", sp.Argv[0], err)
	}
	null, err := os.Open(os.DevNull)
	if err != nil {
		return 0, nil, err
	}
	defer null.Close()
	outR, outW, err := os.Pipe()
	if err != nil {
		return 0, nil, err
	}
	attr := &syscall.ProcAttr{
		Dir:   cwd,
		Env:   env,
		Files: []uintptr{null.Fd(), outW.Fd(), outW.Fd()},
		Sys:   &syscall.SysProcAttr{Setsid: true, Credential: cred},
	}
	pid, exitCh, err := reaper().Start(path, sp.Argv, attr)
	outW.Close()
	if err != nil {
		outR.Close()
		return 0, nil, fmt.Errorf("cannot start %s: %v", sp.Argv[0], err)
	}
	s.logs.add("service %s started pid=%d user=%s cmd=%s", sp.Name, pid, u.Name, shortCmd(strings.Join(sp.Argv, " ")))
	// The reader ends when every writer is gone, which may be after the service: its children
	// can hold the pipe. Lines of an old run may then still arrive; they are output all the same.
	go s.svc.readOutput(sv, outR)
	return pid, exitCh, nil
}

// readOutput keeps the last serviceOutLines lines of f in sv.out.
func (ss *services) readOutput(sv *service, f *os.File) {
	defer f.Close()
	br := bufio.NewReaderSize(f, serviceLineMax)
	long := false // inside a line longer than serviceLineMax: drop its rest
	for {
		line, err := br.ReadSlice('\n')
		if len(line) > 0 && !long {
			text := strings.ToValidUTF8(string(bytes.TrimRight(line, "\r\n")), "\uFFFD")
			ss.mu.Lock()
			sv.out = append(sv.out, text)
			if len(sv.out) > serviceOutLines {
				sv.out = append(sv.out[:0], sv.out[len(sv.out)-serviceOutLines:]...)
			}
			ss.mu.Unlock()
		}
		long = err == bufio.ErrBufferFull
		if err != nil && !long {
			return
		}
	}
}

type serviceStatus struct {
	Name     string       `json:"name"`
	State    string       `json:"state"`
	Pid      *int         `json:"pid"` // null when not running
	Restarts int          `json:"restarts"`
	Ready    bool         `json:"ready"`
	LastExit *serviceExit `json:"last_exit"`
	Output   []string     `json:"output"`
}

type servicesStatus struct {
	Ready    bool            `json:"ready"`
	Services []serviceStatus `json:"services"`
}

// status is a snapshot of every service, and the channel that is closed on the next change.
func (ss *services) status() (servicesStatus, <-chan struct{}) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	st := servicesStatus{Ready: true, Services: []serviceStatus{}}
	for _, sv := range ss.list {
		one := serviceStatus{
			Name: sv.spec.Name, State: sv.state, Restarts: sv.restarts, Ready: sv.state == "ready",
			LastExit: sv.lastExit, Output: append([]string{}, sv.out...),
		}
		if sv.pid > 0 {
			pid := sv.pid
			one.Pid = &pid
		}
		st.Ready = st.Ready && one.Ready
		st.Services = append(st.Services, one)
	}
	return st, ss.changed
}

func (s *Server) handleServices(w http.ResponseWriter, r *http.Request) error {
	st, _ := s.svc.status()
	writeJSON(w, 200, st)
	return nil
}

// handleServicesWait answers once every service is ready or after timeout_ms, 200 either
// way: the caller reads "ready".
func (s *Server) handleServicesWait(w http.ResponseWriter, r *http.Request) error {
	timeout, err := queryMillis(r, "timeout_ms", 30000, maxServicesWait)
	if err != nil {
		return err
	}
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		st, changed := s.svc.status()
		if st.Ready {
			writeJSON(w, 200, st)
			return nil
		}
		select {
		case <-changed:
		case <-deadline.C:
			st, _ = s.svc.status()
			writeJSON(w, 200, st)
			return nil
		case <-r.Context().Done():
			return nil
		}
	}
}

// queryMillis parses an optional query parameter of milliseconds in 0..max.
func queryMillis(r *http.Request, name string, def, max int) (time.Duration, error) {
	v := r.URL.Query().Get(name)
	if v == "" {
		return time.Duration(def) * time.Millisecond, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 || n > max {
		return 0, errf(400, "invalid_timeout", name, "%s must be a number of milliseconds from 0 to %d", name, max)
	}
	return time.Duration(n) * time.Millisecond, nil
}
