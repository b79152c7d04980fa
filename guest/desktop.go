package main

// The computer-use desktop of templates that run an X server (the `cua` template): screenshots,
// mouse and keyboard input and the window list, through ONE long-lived X11 connection
// (github.com/jezek/xgb, pure Go). Inside gVisor a process per screenshot or action (scrot,
// xdotool) costs 60-220 ms; a request over an open connection costs milliseconds.
//
//	desktop.go          routes, handlers, the connection's life (lazy open, reopen, watchdog)
//	desktop_x.go        X requests: screenshot capture, XTEST input, windows, keyboard map
//	desktop_actions.go  Anthropic computer-use actions: parsing, validation, running
//	desktop_keys.go     xdotool key syntax, keysym names and their characters
//	desktop_image.go    pixels → RGBA, down-scaling, PNG encoding
//	desktop_keysyms.go  generated table of X11's keysym names

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jezek/xgb"
)

const (
	// xTimeout bounds one locked stretch of X requests (a screenshot, one action step): an X
	// server that stops answering for that long is treated as gone (the connection is closed,
	// the next request reopens it).
	xTimeout = 20 * time.Second
	// maxActions is the most actions one POST /desktop/actions may carry.
	maxActions = 100
)

func init() {
	// xgb logs every connection without an Xauthority entry (the sandbox's Xvfb has none) and
	// every closed connection to stderr; envd reports what matters itself.
	xgb.Logger = log.New(io.Discard, "", 0)
}

type desktop struct {
	display string

	actMu sync.Mutex // serializes action lists: one list runs at a time, in order

	mu     sync.Mutex // guards x and the state below; held while talking to X (and a few ms between a click's events), never across a wait
	x      *xconn     // nil until first used, or after it broke
	prevKB *keyboard  // the keyboard state of the last connection dropped

	restoreTimer *time.Timer // restores spare keycodes bound for typing (desktop_x.go)
	typing       bool        // a keyboard action runs: leave the spare keycodes bound
}

func (s *Server) desktopRoutes(mux *http.ServeMux) {
	if s.desk == nil && s.cfg.Display != "" {
		s.desk = &desktop{display: s.cfg.Display}
	}
	mux.HandleFunc("GET /desktop/screenshot", h(s.desktopHandler((*desktop).handleScreenshot)))
	mux.HandleFunc("POST /desktop/actions", h(s.desktopHandler((*desktop).handleActions)))
	mux.HandleFunc("GET /desktop/windows", h(s.desktopHandler((*desktop).handleWindows)))
	mux.HandleFunc("GET /desktop/cursor", h(s.desktopHandler((*desktop).handleCursor)))
	unknown := h(s.desktopHandler(func(d *desktop, w http.ResponseWriter, r *http.Request) error {
		return errf(404, "not_found", "", "no route for %s %s", r.Method, r.URL.Path)
	}))
	mux.HandleFunc("/desktop", unknown)
	mux.HandleFunc("/desktop/", unknown)
}

func errNoDesktop() error {
	return errf(404, "no_desktop", "", "this sandbox's template has no desktop")
}

func (s *Server) desktopHandler(f func(d *desktop, w http.ResponseWriter, r *http.Request) error) handlerFunc {
	return func(w http.ResponseWriter, r *http.Request) error {
		if s.desk == nil {
			return errNoDesktop()
		}
		return f(s.desk, w, r)
	}
}

// GET /desktop/screenshot[?width=W] → image/png.
func (d *desktop) handleScreenshot(w http.ResponseWriter, r *http.Request) error {
	width := 0
	if v := r.URL.Query().Get("width"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return errf(400, "invalid_width", "width", "width must be a positive integer, got %q", v)
		}
		width = n
	}
	png, err := d.screenshotPNG(nil, width)
	if err != nil {
		return err
	}
	w.Header().Set("Content-Type", "image/png")
	w.Header().Set("Content-Length", strconv.Itoa(len(png)))
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(200)
	w.Write(png)
	return nil
}

// GET /desktop/cursor → {"x", "y"}.
func (d *desktop) handleCursor(w http.ResponseWriter, r *http.Request) error {
	var px, py int
	err := d.readOnly(func(x *xconn) error {
		var err error
		px, py, err = x.pointer()
		return err
	})
	if err != nil {
		return err
	}
	writeJSON(w, 200, map[string]int{"x": px, "y": py})
	return nil
}

// GET /desktop/windows → {"screen", "focused", "windows"}.
func (d *desktop) handleWindows(w http.ResponseWriter, r *http.Request) error {
	var list windowList
	err := d.readOnly(func(x *xconn) error {
		var err error
		list, err = x.windows()
		return err
	})
	if err != nil {
		return err
	}
	writeJSON(w, 200, list)
	return nil
}

// POST /desktop/actions {"actions": [...]} → {"results": [...]}.
func (d *desktop) handleActions(w http.ResponseWriter, r *http.Request) error {
	var req struct {
		Actions json.RawMessage `json:"actions"`
	}
	if err := decodeJSON(r, &req); err != nil {
		return err
	}
	var list []rawAction
	if len(req.Actions) == 0 || string(req.Actions) == "null" {
		return errf(400, "invalid_action", "actions", "actions: missing (want {\"actions\": [{\"action\": ...}, ...]})")
	}
	if err := json.Unmarshal(req.Actions, &list); err != nil {
		return errf(400, "invalid_action", "actions", "actions: must be a list of actions")
	}
	acts, err := parseActions(list)
	if err != nil {
		return err
	}
	d.actMu.Lock()
	defer d.actMu.Unlock()
	if r.Context().Err() != nil {
		return errf(499, "canceled", "", "request canceled while waiting for the previous action list")
	}
	results, err := d.run(r.Context(), acts)
	if err != nil {
		return err
	}
	writeJSON(w, 200, map[string]any{"results": results})
	return nil
}

// withX runs f holding the lock, on a live connection, with the watchdog armed. With want == nil
// the connection is checked with a round trip first (which also refreshes the screen size) and
// (re)opened if needed; with want != nil f runs only on that very connection: an action list
// never continues on a new X server.
func (d *desktop) withX(want *xconn, f func(x *xconn) error) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	x, err := d.conn(want)
	if err != nil {
		return err
	}
	t := time.AfterFunc(xTimeout, func() { x.kill(fmt.Errorf("the X server did not answer within %v", xTimeout)) })
	defer t.Stop()
	err = f(x)
	if err != nil && x.isDead() && d.x == x {
		d.drop()
	}
	return err
}

// drop forgets the connection (under d.mu), remembering its spare-keycode bindings for the next
// one: if it reaches the same X server, they are still there to be undone.
func (d *desktop) drop() {
	if d.x != nil {
		d.x.close()
		if d.x.kb != nil {
			d.prevKB = d.x.kb
		}
		d.x = nil
	}
}

// readOnly is withX for requests that change nothing: retried once on a new connection if the
// X server went away under them (Xvfb restarted).
func (d *desktop) readOnly(f func(x *xconn) error) error {
	err := d.withX(nil, f)
	if err != nil && isConnLost(err) {
		err = d.withX(nil, f)
	}
	return err
}

// conn returns the live connection (under d.mu).
func (d *desktop) conn(want *xconn) (*xconn, error) {
	if want != nil {
		if d.x != want || want.isDead() {
			return nil, &xError{lost: true, err: errors.New("the X connection was lost (X server restarted?)")}
		}
		return want, nil
	}
	if x := d.x; x != nil {
		if !x.isDead() {
			if err := x.refreshScreen(); err == nil {
				return x, nil
			}
		}
		d.drop()
	}
	x, err := dialX(d.display)
	if err != nil {
		var xe *xError
		if errors.As(err, &xe) && xe.starting {
			return nil, errf(503, "desktop_starting", "", "the desktop (X display %s) is not up yet: %v", d.display, xe.err)
		}
		return nil, errf(502, "desktop_error", "", "cannot connect to X display %s: %v", d.display, err)
	}
	x.inherited, d.prevKB = d.prevKB, nil
	d.x = x
	return x, nil
}

// xError is a failure talking to X.
type xError struct {
	lost     bool // the connection broke (or was closed by the watchdog)
	starting bool // the X server is not listening (yet)
	err      error
}

func (e *xError) Error() string { return e.err.Error() }
func (e *xError) Unwrap() error { return e.err }

func isConnLost(err error) bool {
	var xe *xError
	return errors.As(err, &xe) && xe.lost
}

// asXError classifies an error from xgb: io.EOF (and friends) mean the connection is gone; an
// xgb.Error is an X protocol error.
func asXError(x *xconn, err error) error {
	if err == nil {
		return nil
	}
	var xe *xError
	if errors.As(err, &xe) {
		return err
	}
	if x.isDead() || errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) {
		if why := x.deathReason(); why != nil {
			err = why
		}
		return &xError{lost: true, err: fmt.Errorf("X connection lost: %w", err)}
	}
	return &xError{err: fmt.Errorf("X error: %w", err)}
}

// isNotListening tells whether a dial failed because nothing listens at the socket yet.
func isNotListening(err error) bool {
	return errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) ||
		errors.Is(err, syscall.EAGAIN) || errors.Is(err, syscall.ETIMEDOUT) ||
		errors.Is(err, context.DeadlineExceeded) || strings.Contains(err.Error(), "i/o timeout")
}

// sleepCtx sleeps for d, or until ctx ends (then it returns ctx's error).
func sleepCtx(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
