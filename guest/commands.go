package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

const maxEndedCommands = 64

// Command is one process started through POST /commands.
type Command struct {
	Pid        int       `json:"pid"`
	Cmd        *string   `json:"cmd"`
	Argv       []string  `json:"argv"`
	User       string    `json:"user"`
	Cwd        string    `json:"cwd"`
	Background bool      `json:"background"`
	StartedAt  time.Time `json:"started_at"`

	out output

	stdinMu     sync.Mutex // serialises writers so request data is not interleaved
	stdin       *os.File   // never nil; Close is safe concurrently with Write
	stdinClosed bool

	mu       sync.Mutex
	exited   bool
	exit     exitInfo
	timedOut bool
}

// registry holds running commands and the last maxEndedCommands ended ones.
type registry struct {
	mu      sync.Mutex
	running map[int]*Command
	ended   []*Command // oldest first
}

func (r *registry) add(c *Command) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.running == nil {
		r.running = map[int]*Command{}
	}
	r.running[c.Pid] = c
}

func (r *registry) finish(c *Command) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.running[c.Pid] == c {
		delete(r.running, c.Pid)
	}
	r.ended = append(r.ended, c)
	if len(r.ended) > maxEndedCommands {
		r.ended = r.ended[1:]
	}
}

func (r *registry) get(pid int) *Command {
	r.mu.Lock()
	defer r.mu.Unlock()
	if c, ok := r.running[pid]; ok {
		return c
	}
	for i := len(r.ended) - 1; i >= 0; i-- { // newest first: pids get reused
		if r.ended[i].Pid == pid {
			return r.ended[i]
		}
	}
	return nil
}

func (r *registry) list() []*Command {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]*Command, 0, len(r.running))
	for _, c := range r.running {
		out = append(out, c)
	}
	return out
}

type startRequest struct {
	Cmd        *string           `json:"cmd"`
	Argv       []string          `json:"argv"`
	Env        map[string]string `json:"env"`
	Cwd        string            `json:"cwd"`
	User       string            `json:"user"`
	Stdin      string            `json:"stdin"`
	KeepStdin  bool              `json:"keep_stdin"`
	Timeout    float64           `json:"timeout"`
	Background bool              `json:"background"`
}

func (s *Server) handleStartCommand(w http.ResponseWriter, r *http.Request) error {
	var req startRequest
	if err := decodeJSON(r, &req); err != nil {
		return err
	}
	c, err := s.startCommand(&req)
	if err != nil {
		return err
	}
	if req.Background {
		writeJSON(w, 200, map[string]int{"pid": c.Pid})
		return nil
	}
	s.stream(w, r, c)
	return nil
}

// startCommand validates the request and starts the process; every failure
// here is reported before any stream begins.
func (s *Server) startCommand(req *startRequest) (*Command, error) {
	hasCmd, hasArgv := req.Cmd != nil && *req.Cmd != "", len(req.Argv) > 0
	if hasCmd == hasArgv {
		return nil, errf(400, "invalid_command", "cmd", "exactly one of cmd or argv is required")
	}
	if req.Timeout < 0 {
		return nil, errf(400, "invalid_timeout", "timeout", "timeout must be >= 0")
	}
	if err := validateEnv(req.Env); err != nil {
		return nil, err
	}
	u, err := lookupUser(req.User)
	if err != nil {
		return nil, errf(400, "invalid_user", "user", "unknown user %q", req.User)
	}
	cred, err := u.credential()
	if err != nil {
		return nil, errf(400, "invalid_user", "user", "%v", err)
	}
	cwd, err := commandCwd(u, req.Cwd)
	if err != nil {
		return nil, err
	}
	env := s.buildEnv(u, req.Env)

	var path string
	var argv []string
	if hasCmd {
		if strings.ContainsRune(*req.Cmd, 0) {
			return nil, errf(400, "invalid_command", "cmd", "command contains a NUL byte")
		}
		path = shellPath()
		argv = []string{path, "-c", *req.Cmd}
	} else {
		for _, a := range req.Argv {
			if strings.ContainsRune(a, 0) {
				return nil, errf(400, "invalid_command", "argv", "argv contains a NUL byte")
			}
		}
		path, err = lookPath(req.Argv[0], env, cwd)
		if err != nil {
			return nil, errf(400, "executable_not_found", "argv", "%s: %v", req.Argv[0], err)
		}
		argv = req.Argv
	}

	stdinR, stdinW, err := os.Pipe()
	if err != nil {
		return nil, err
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		stdinR.Close()
		stdinW.Close()
		return nil, err
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		for _, f := range []*os.File{stdinR, stdinW, outR, outW} {
			f.Close()
		}
		return nil, err
	}
	// Fd() also puts the child's ends back into blocking mode.
	attr := &syscall.ProcAttr{
		Dir:   cwd,
		Env:   env,
		Files: []uintptr{stdinR.Fd(), outW.Fd(), errW.Fd()},
		Sys:   &syscall.SysProcAttr{Setsid: true, Credential: cred},
	}
	pid, exitCh, err := reaper().Start(path, argv, attr)
	stdinR.Close()
	outW.Close()
	errW.Close()
	if err != nil {
		stdinW.Close()
		outR.Close()
		errR.Close()
		return nil, errf(400, "start_failed", "", "cannot start %s: %v", argv[0], err)
	}

	c := &Command{
		Pid: pid, Argv: req.Argv, User: u.Name, Cwd: cwd,
		Background: req.Background, StartedAt: time.Now().UTC(), stdin: stdinW,
	}
	if hasCmd {
		c.Cmd = req.Cmd
	}
	desc := strings.Join(argv, " ")
	if hasCmd {
		desc = *req.Cmd
	}
	s.logs.add("command started pid=%d user=%s cmd=%s", pid, u.Name, shortCmd(desc))

	// Initial stdin is written asynchronously so a process that never reads it
	// cannot block the request. The lock is taken here, before the command is
	// visible, so later POST .../stdin data always comes after it; without
	// keep_stdin, stdin counts as closed for the API from the start.
	c.stdinMu.Lock()
	c.stdinClosed = !req.KeepStdin
	go func() {
		defer c.stdinMu.Unlock()
		if req.Stdin != "" {
			io.WriteString(c.stdin, req.Stdin)
		}
		if !req.KeepStdin {
			c.closeStdinLocked()
		}
	}()

	s.cmds.add(c)

	var readers sync.WaitGroup
	var taking atomic.Int32 // readers between a read that returned bytes and their append
	pipes := []*os.File{outR, errR}
	for i, f := range pipes {
		readers.Add(1)
		go func(stream int, f *os.File) {
			defer readers.Done()
			defer f.Close()
			buf := make([]byte, 32<<10)
			for {
				n, err := f.Read(buf)
				if n > 0 {
					taking.Add(1)
					c.out.append(stream, buf[:n]) // dropped silently once exited
					taking.Add(-1)
				}
				if err != nil {
					return
				}
			}
		}(i, f)
	}

	var timer *time.Timer
	if req.Timeout > 0 {
		timer = time.AfterFunc(time.Duration(req.Timeout*float64(time.Second)), func() {
			c.mu.Lock()
			c.timedOut = !c.exited
			c.mu.Unlock()
			syscall.Kill(-pid, syscall.SIGKILL)
		})
	}

	go func() {
		ws := <-exitCh
		if timer != nil {
			timer.Stop()
		}
		// Let the readers take what the command wrote. A backgrounded grandchild may
		// hold the pipes open forever; it must not keep the command from ending, so
		// once the pipes are empty (and no reader holds bytes it read) the command
		// ends after a short wait for EOF. Bytes still in a pipe are waited for (up
		// to drainCap): a starved sandbox may not run the readers for a while, and
		// output written before the exit was dropped then (seen under 200 busy loops).
		drained := make(chan struct{})
		go func() { readers.Wait(); close(drained) }()
		waitDrained(drained, func() bool { return taking.Load() > 0 || unread(pipes) })
		c.mu.Lock()
		c.exited = true
		c.exit = exitFromStatus(ws)
		c.exit.TimedOut = c.timedOut
		info := c.exit
		c.mu.Unlock()
		// Not under stdinMu: a writer blocked on a full pipe holds it, and
		// closing the file is what unblocks that writer.
		c.stdin.Close()
		c.out.close()
		s.cmds.finish(c)
		msg := fmt.Sprintf("command exited pid=%d exit_code=%d", pid, info.Code)
		if info.Signal != "" {
			msg += " signal=" + info.Signal
		}
		if info.TimedOut {
			msg += " timed_out"
		}
		s.logs.add("%s", msg)
	}()
	return c, nil
}

func (c *Command) closeStdinLocked() {
	c.stdin.Close()
	c.stdinClosed = true
}

func (c *Command) exitState() (bool, exitInfo) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.exited, c.exit
}

func shellPath() string {
	if st, err := os.Stat("/bin/bash"); err == nil && st.Mode().IsRegular() {
		return "/bin/bash"
	}
	return "/bin/sh"
}

func commandCwd(u *User, cwd string) (string, error) {
	if cwd == "" {
		if st, err := os.Stat(u.Home); err == nil && st.IsDir() {
			return u.Home, nil
		}
		return "/", nil
	}
	p, err := resolvePath(u, cwd)
	if err != nil {
		return "", errf(400, "invalid_cwd", "cwd", "%v", err)
	}
	st, err := os.Stat(p)
	if err != nil || !st.IsDir() {
		return "", errf(400, "invalid_cwd", "cwd", "%s is not a directory", p)
	}
	return p, nil
}

// lookPath finds an executable using the child's PATH, not envd's.
func lookPath(name string, env []string, cwd string) (string, error) {
	isExec := func(p string) bool {
		st, err := os.Stat(p)
		return err == nil && st.Mode().IsRegular() && st.Mode().Perm()&0o111 != 0
	}
	if strings.Contains(name, "/") {
		if !filepath.IsAbs(name) {
			name = filepath.Join(cwd, name)
		}
		if isExec(name) {
			return name, nil
		}
		return "", errors.New("not found or not executable")
	}
	path := ""
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			path = v
		}
	}
	for _, dir := range filepath.SplitList(path) {
		if dir == "" {
			dir = "."
		}
		if !filepath.IsAbs(dir) {
			dir = filepath.Join(cwd, dir)
		}
		if p := filepath.Join(dir, name); isExec(p) {
			return p, nil
		}
	}
	return "", errors.New("not found in PATH")
}

// NDJSON events; structs keep "type" as the first key, as in the protocol doc.
type startEvent struct {
	Type string `json:"type"`
	Pid  int    `json:"pid"`
}

type dataEvent struct {
	Type string `json:"type"`
	Data string `json:"data"`
}

type droppedEvent struct {
	Type  string `json:"type"`
	Bytes int64  `json:"bytes"`
}

type exitEvent struct {
	Type     string  `json:"type"`
	ExitCode int     `json:"exit_code"`
	Signal   *string `json:"signal"`
	TimedOut bool    `json:"timed_out"`
}

// stream writes a command's NDJSON event stream from the beginning: start,
// (dropped), buffered and live output, exit. Returns early if the client goes
// away; the command itself is unaffected.
func (s *Server) stream(w http.ResponseWriter, r *http.Request, c *Command) {
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(200)
	rc := http.NewResponseController(w)
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)

	wake := c.out.follow()
	defer c.out.unfollow(wake)

	if enc.Encode(startEvent{"start", c.Pid}) != nil {
		return
	}
	var cur cursor
	for {
		chunks, dropped, done := c.out.readFrom(&cur)
		if dropped > 0 {
			enc.Encode(droppedEvent{"dropped", dropped})
		}
		for _, ch := range chunks {
			if txt := cur.text(ch.stream, ch.data, false); txt != "" {
				if enc.Encode(dataEvent{streamNames[ch.stream], txt}) != nil {
					return
				}
			}
		}
		if done {
			for st := range cur.pending {
				if len(cur.pending[st]) > 0 {
					enc.Encode(dataEvent{streamNames[st], cur.text(st, nil, true)})
				}
			}
			_, info := c.exitState()
			ev := exitEvent{Type: "exit", ExitCode: info.Code, TimedOut: info.TimedOut}
			if info.Signal != "" {
				ev.Signal = &info.Signal
			}
			enc.Encode(ev)
			rc.Flush()
			return
		}
		if rc.Flush() != nil {
			return
		}
		if len(chunks) > 0 {
			continue // more may be buffered beyond the read budget
		}
		select {
		case <-wake:
		case <-r.Context().Done():
			return
		}
	}
}

func (s *Server) commandFromPath(r *http.Request) (*Command, error) {
	pid, err := strconv.Atoi(r.PathValue("pid"))
	if err != nil {
		return nil, errf(400, "invalid_pid", "pid", "pid must be a number")
	}
	c := s.cmds.get(pid)
	if c == nil {
		return nil, errf(404, "command_not_found", "pid", "no command with pid %d", pid)
	}
	return c, nil
}

func (s *Server) handleListCommands(w http.ResponseWriter, r *http.Request) error {
	writeJSON(w, 200, map[string]any{"commands": s.cmds.list()})
	return nil
}

func (s *Server) handleAttachCommand(w http.ResponseWriter, r *http.Request) error {
	c, err := s.commandFromPath(r)
	if err != nil {
		return err
	}
	s.stream(w, r, c)
	return nil
}

func (s *Server) handleStdin(w http.ResponseWriter, r *http.Request) error {
	c, err := s.commandFromPath(r)
	if err != nil {
		return err
	}
	var req struct {
		Data string `json:"data"`
		EOF  bool   `json:"eof"`
	}
	if err := decodeJSON(r, &req); err != nil {
		return err
	}
	if exited, _ := c.exitState(); exited {
		return errf(409, "command_exited", "pid", "command %d has exited", c.Pid)
	}
	c.stdinMu.Lock()
	defer c.stdinMu.Unlock()
	if c.stdinClosed {
		return errf(409, "stdin_closed", "pid", "stdin of command %d is closed", c.Pid)
	}
	if req.Data != "" {
		// A process that stops reading must not pin this request forever.
		c.stdin.SetWriteDeadline(time.Now().Add(30 * time.Second))
		if _, err := io.WriteString(c.stdin, req.Data); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return errf(504, "stdin_timeout", "data", "process is not reading stdin")
			}
			c.closeStdinLocked()
			return errf(409, "stdin_closed", "pid", "writing stdin: %v", err)
		}
	}
	if req.EOF {
		c.closeStdinLocked()
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) handleSignal(w http.ResponseWriter, r *http.Request) error {
	c, err := s.commandFromPath(r)
	if err != nil {
		return err
	}
	var req struct {
		Signal json.RawMessage `json:"signal"`
	}
	if err := decodeJSON(r, &req); err != nil {
		return err
	}
	// Accept "SIGTERM", "TERM", "15" or 15.
	name := strings.Trim(string(req.Signal), `"`)
	sig, err := parseSignal(name)
	if err != nil || name == "" {
		return errf(400, "invalid_signal", "signal", "unknown signal %s", string(req.Signal))
	}
	if exited, _ := c.exitState(); exited {
		return errf(409, "command_exited", "pid", "command %d has exited", c.Pid)
	}
	if err := syscall.Kill(-c.Pid, sig); err != nil {
		return errf(409, "command_exited", "pid", "signal: %v", err)
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

const (
	drainQuiet = 200 * time.Millisecond // how long empty pipes are given to reach EOF
	drainCap   = 3 * time.Second        // the longest output still in a pipe is waited for
)

// waitDrained returns when drained is closed, or once pending() has said no for
// drainQuiet, or after drainCap.
func waitDrained(drained <-chan struct{}, pending func() bool) {
	limit := time.After(drainCap)
	quietSince := time.Now()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-drained:
			return
		case <-limit:
			return
		case <-tick.C:
			if pending() {
				quietSince = time.Now()
			} else if time.Since(quietSince) >= drainQuiet {
				return
			}
		}
	}
}

// unread reports whether any of the pipes holds bytes not yet read (FIONREAD,
// through the raw connection: Fd() would put the file in blocking mode).
func unread(pipes []*os.File) bool {
	for _, f := range pipes {
		rc, err := f.SyscallConn()
		if err != nil {
			continue
		}
		var n int32
		rc.Control(func(fd uintptr) {
			syscall.Syscall(syscall.SYS_IOCTL, fd, syscall.TIOCINQ, uintptr(unsafe.Pointer(&n)))
		})
		if n > 0 {
			return true
		}
	}
	return false
}
