package main

import (
	"context"
	"encoding/json"
	"net/http"
	"strconv"
	"syscall"
	"time"

	"github.com/coder/websocket"
	"github.com/creack/pty"
)

// handlePTY runs a login shell on a pseudo-terminal bridged to a WebSocket:
// binary frames carry terminal bytes both ways, text frames carry JSON control.
func (s *Server) handlePTY(w http.ResponseWriter, r *http.Request) error {
	q := r.URL.Query()
	cols, err := dimension(q.Get("cols"), 80, "cols")
	if err != nil {
		return err
	}
	rows, err := dimension(q.Get("rows"), 24, "rows")
	if err != nil {
		return err
	}
	u, err := requestUser(q.Get("user"))
	if err != nil {
		return err
	}
	cred, err := u.credential()
	if err != nil {
		return errf(400, "invalid_user", "user", "%v", err)
	}
	cwd, err := commandCwd(u, q.Get("cwd"))
	if err != nil {
		return err
	}
	env := append(s.buildEnv(u, nil), "TERM=xterm-256color")

	// Validation errors above are JSON; from here on we speak WebSocket.
	conn, err := websocket.Accept(w, r, &websocket.AcceptOptions{InsecureSkipVerify: true})
	if err != nil {
		return nil // Accept already wrote an HTTP error
	}
	defer conn.CloseNow()
	conn.SetReadLimit(1 << 20)

	ptmx, tty, err := pty.Open()
	if err != nil {
		conn.Close(websocket.StatusInternalError, "pty: "+err.Error())
		return nil
	}
	defer ptmx.Close()
	pty.Setsize(ptmx, &pty.Winsize{Cols: uint16(cols), Rows: uint16(rows)})
	shell := shellPath()
	attr := &syscall.ProcAttr{
		Dir:   cwd,
		Env:   env,
		Files: []uintptr{tty.Fd(), tty.Fd(), tty.Fd()},
		Sys:   &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0, Credential: cred},
	}
	pid, exitCh, err := reaper().Start(shell, []string{shell, "-l"}, attr)
	tty.Close()
	if err != nil {
		conn.Close(websocket.StatusInternalError, "start: "+err.Error())
		return nil
	}
	s.logs.add("pty started pid=%d user=%s", pid, u.Name)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	outDone := make(chan struct{})
	go func() { // terminal → client
		defer close(outDone)
		buf := make([]byte, 32<<10)
		for {
			n, err := ptmx.Read(buf)
			if n > 0 {
				if conn.Write(ctx, websocket.MessageBinary, buf[:n]) != nil {
					// Client gone: keep draining so the shell never blocks on output.
					continue
				}
			}
			if err != nil {
				return
			}
		}
	}()

	exited := make(chan struct{})
	go func() { // client → terminal
		for {
			typ, data, err := conn.Read(ctx)
			if err != nil {
				// Client went away: hang up the session like a closed terminal,
				// and make sure it really ends.
				syscall.Kill(-pid, syscall.SIGHUP)
				select {
				case <-exited:
				case <-time.After(3 * time.Second):
					syscall.Kill(-pid, syscall.SIGKILL)
				}
				return
			}
			if typ == websocket.MessageBinary {
				ptmx.Write(data)
				continue
			}
			var msg struct {
				Type string `json:"type"`
				Cols int    `json:"cols"`
				Rows int    `json:"rows"`
			}
			if json.Unmarshal(data, &msg) == nil && msg.Type == "resize" &&
				msg.Cols > 0 && msg.Rows > 0 && msg.Cols <= 10000 && msg.Rows <= 10000 {
				pty.Setsize(ptmx, &pty.Winsize{Cols: uint16(msg.Cols), Rows: uint16(msg.Rows)})
			}
		}
	}()

	info := exitFromStatus(<-exitCh)
	close(exited)
	// Let the last output reach the client: the reader ends at the terminal's hang-up, at
	// once when the shell was its last holder. Background jobs may hold it open, so the wait
	// is bounded, but not tightly: on a busy node the reader may be scheduled only hundreds
	// of milliseconds later (200 ms lost the shell's last lines there).
	select {
	case <-outDone:
	case <-time.After(2 * time.Second):
	}
	s.logs.add("pty exited pid=%d exit_code=%d", pid, info.Code)
	msg, _ := json.Marshal(map[string]any{"type": "exit", "exit_code": info.Code})
	wctx, wcancel := context.WithTimeout(ctx, 5*time.Second)
	defer wcancel()
	if conn.Write(wctx, websocket.MessageText, msg) == nil {
		conn.Close(websocket.StatusNormalClosure, "")
	}
	return nil
}

func dimension(s string, def int, field string) (int, error) {
	if s == "" {
		return def, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > 10000 {
		return 0, errf(400, "invalid_size", field, "%s must be between 1 and 10000", field)
	}
	return n, nil
}
