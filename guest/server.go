package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime/debug"
	"strings"
	"sync"
	"time"
)

var version = "dev" // set with -ldflags '-X main.version=...'

// Config is what main (or a test) hands the server.
type Config struct {
	Token    string // required unless Insecure
	Insecure bool   // --insecure-no-token, for tests only
	BaseEnv  []string
	Services []ServiceSpec // the template's services (services.go), from E2A_ENVD_SERVICES
	Display  string        // the X display of a desktop template (desktop.go), "" if none
}

type Server struct {
	cfg    Config
	logs   logRing
	cmds   registry
	nonces nonceCache

	envMu   sync.Mutex
	initEnv map[string]string // set by POST /init

	svc  *services // services.go
	desk *desktop  // desktop.go
}

func NewServer(cfg Config) *Server {
	reaper() // start reaping before the first command
	return &Server{cfg: cfg, svc: newServices(cfg.Services)}
}

// apiError is the protocol's error shape; handlers return it and the adapter
// renders it.
type apiError struct {
	Status  int
	Code    string
	Message string
	Field   string
}

func (e *apiError) Error() string { return e.Code + ": " + e.Message }

func errf(status int, code, field, format string, args ...any) *apiError {
	return &apiError{Status: status, Code: code, Field: field, Message: fmt.Sprintf(format, args...)}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, e *apiError) {
	var field any
	if e.Field != "" {
		field = e.Field
	}
	writeJSON(w, e.Status, map[string]any{"error": map[string]any{
		"code": e.Code, "message": e.Message, "field": field,
	}})
}

type handlerFunc func(w http.ResponseWriter, r *http.Request) error

// h adapts an error-returning handler. Errors after the response started
// cannot be reported in-band; the stream is simply cut.
func h(f handlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		err := f(w, r)
		if err == nil {
			return
		}
		var ae *apiError
		if !errors.As(err, &ae) {
			ae = errf(500, "internal", "", "%v", err)
		}
		writeError(w, ae)
	}
}

func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /health", h(s.handleHealth))
	mux.HandleFunc("POST /init", h(s.handleInit))
	mux.HandleFunc("GET /logs", h(s.handleLogs))

	mux.HandleFunc("POST /commands", h(s.handleStartCommand))
	mux.HandleFunc("GET /commands", h(s.handleListCommands))
	mux.HandleFunc("GET /commands/{pid}", h(s.handleAttachCommand))
	mux.HandleFunc("POST /commands/{pid}/stdin", h(s.handleStdin))
	mux.HandleFunc("POST /commands/{pid}/signal", h(s.handleSignal))

	mux.HandleFunc("GET /pty", h(s.handlePTY))

	mux.HandleFunc("GET /files", h(s.handleReadFile))
	mux.HandleFunc("PUT /files", h(s.handleWriteFile))
	mux.HandleFunc("DELETE /files", h(s.handleDelete))
	mux.HandleFunc("GET /files/list", h(s.handleList))
	mux.HandleFunc("GET /files/stat", h(s.handleStat))
	mux.HandleFunc("POST /files/mkdir", h(s.handleMkdir))
	mux.HandleFunc("POST /files/rename", h(s.handleRename))
	mux.HandleFunc("GET /files/tar", h(s.handleTarDownload))
	mux.HandleFunc("PUT /files/tar", h(s.handleTarUpload))

	s.serviceRoutes(mux) // services.go: /services, /proxy/{port}/..., /tcp/{port}, /canvas/...
	s.desktopRoutes(mux) // desktop.go: /desktop/...

	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, errf(404, "not_found", "", "no route for %s %s", r.Method, r.URL.Path))
	})
	return s.recoverer(s.auth(mux))
}

// auth lets through only requests signed with the token (auth.go) and proves envd's
// knowledge of the token on each answer to them.
func (s *Server) auth(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !s.cfg.Insecure {
			nonce, ae := s.verifyRequest(r, time.Now())
			if ae != nil {
				writeError(w, ae)
				return
			}
			w.Header().Set(hdrProof, answerProof(s.cfg.Token, nonce))
		}
		next.ServeHTTP(w, r)
	})
}

// recoverer turns a panic into a 500 JSON error instead of a dropped connection.
func (s *Server) recoverer(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if v := recover(); v != nil {
				if v == http.ErrAbortHandler {
					panic(v)
				}
				s.logs.add("panic in %s %s: %v", r.Method, r.URL.Path, v)
				fmt.Fprintf(os.Stderr, "envd: panic: %v\n%s", v, debug.Stack())
				writeError(w, errf(500, "internal", "", "internal error"))
			}
		}()
		next.ServeHTTP(w, r)
	})
}

// decodeJSON reads a small JSON request body into v.
func decodeJSON(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, 16<<20))
	if err := dec.Decode(v); err != nil {
		return errf(400, "invalid_json", "", "invalid JSON body: %v", err)
	}
	return nil
}

func (s *Server) handleHealth(w http.ResponseWriter, r *http.Request) error {
	writeJSON(w, 200, map[string]string{"status": "ok", "version": version})
	return nil
}

func (s *Server) handleInit(w http.ResponseWriter, r *http.Request) error {
	var req struct {
		Env map[string]string `json:"env"`
	}
	if err := decodeJSON(r, &req); err != nil {
		return err
	}
	if err := validateEnv(req.Env); err != nil {
		return err
	}
	s.envMu.Lock()
	s.initEnv = req.Env
	s.envMu.Unlock()
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (s *Server) handleLogs(w http.ResponseWriter, r *http.Request) error {
	writeJSON(w, 200, map[string]any{"lines": s.logs.snapshot()})
	return nil
}

func validateEnv(env map[string]string) error {
	for k, v := range env {
		if k == "" || strings.ContainsAny(k, "=\x00") || strings.ContainsRune(v, 0) {
			return errf(400, "invalid_env", "env", "invalid environment variable %q", k)
		}
	}
	return nil
}

// buildEnv layers: fixed defaults, envd's own environment (the image's env,
// minus the token and per-user vars), POST /init env, then the request's env.
func (s *Server) buildEnv(u *User, extra map[string]string) []string {
	env := map[string]string{
		"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"LANG": "C.UTF-8",
	}
	for _, kv := range s.cfg.BaseEnv {
		k, v, ok := strings.Cut(kv, "=")
		// envd's own settings (token, services, display) are never a child's business
		if !ok || strings.HasPrefix(k, "E2A_ENVD_") {
			continue
		}
		switch k {
		case "HOME", "USER", "LOGNAME", "SHELL", "PWD", "OLDPWD":
			continue
		}
		env[k] = v
	}
	env["HOME"], env["USER"], env["LOGNAME"], env["SHELL"] = u.Home, u.Name, u.Name, u.Shell
	s.envMu.Lock()
	for k, v := range s.initEnv {
		env[k] = v
	}
	s.envMu.Unlock()
	for k, v := range extra {
		env[k] = v
	}
	out := make([]string, 0, len(env))
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	return out
}
