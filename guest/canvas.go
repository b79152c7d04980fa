package main

// The canvas: a directory the sandbox's code (an agent) fills with a small web page, served
// to the people watching it (GET /canvas/files/...), and a version number of the directory
// tree that lets their page reload when something changed (GET /canvas/changes).

import (
	"errors"
	"hash/fnv"
	"io/fs"
	"mime"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

const (
	canvasDir         = "/home/user/canvas"
	canvasUser        = "user" // the canvas is read with this user's rights, never envd's
	canvasScanEvery   = 200 * time.Millisecond
	canvasMaxEntries  = 10000 // entries looked at per scan; changes beyond them go unseen
	maxCanvasWait     = 60000 // ms, GET /canvas/changes
	defaultCanvasWait = 25000
)

// canvasWatch keeps the canvas tree's version. The tree is scanned only while some request
// waits on /canvas/changes (and at most once per canvasScanEvery, however many wait): an idle
// sandbox pays nothing, and a change made while nobody waited is still seen by the next scan,
// because the scan compares the tree with the fingerprint of the previous one. Several changes
// between two scans make one version step; clients only compare versions for equality.
type canvasWatch struct {
	dir  string // canvasDir; tests point these elsewhere
	user string

	mu        sync.Mutex
	version   int64
	sig       uint64 // fingerprint of the last scan
	scannedAt time.Time
}

func (c *canvasWatch) init() {
	c.dir, c.user = canvasDir, canvasUser
}

// account is the user the canvas is read as.
func (c *canvasWatch) account() (*User, error) {
	u, err := lookupUser(c.user)
	if err != nil {
		return nil, errf(404, "not_found", "", "there is no canvas: the image has no user %q", c.user)
	}
	return u, nil
}

// current returns the tree's version, scanning first if the last scan is older than
// canvasScanEvery. Concurrent callers wait for one scan and share it.
func (c *canvasWatch) current() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.version != 0 && time.Since(c.scannedAt) < canvasScanEvery {
		return c.version
	}
	sig := c.scan()
	if c.version == 0 || sig != c.sig {
		c.version++
		c.sig = sig
	}
	c.scannedAt = time.Now()
	return c.version
}

// scan fingerprints the tree: every entry's path, type, size and mtime (a missing directory
// has a fingerprint of its own). It runs as the canvas user and follows no symlinks.
func (c *canvasWatch) scan() uint64 {
	h := fnv.New64a()
	u, err := c.account()
	if err != nil {
		return 0
	}
	asUser(u, func() error {
		n := 0
		filepath.WalkDir(c.dir, func(p string, d fs.DirEntry, err error) error {
			if n++; n > canvasMaxEntries {
				return filepath.SkipAll
			}
			if err != nil { // the root missing, or an unreadable directory
				h.Write([]byte("!" + p + "\x00"))
				return nil
			}
			fi, err := d.Info()
			if err != nil {
				return nil // vanished meanwhile: the next scan sees it gone
			}
			h.Write([]byte(p + "\x00" + fi.Mode().Type().String() + "\x00" +
				strconv.FormatInt(fi.Size(), 10) + "\x00" + strconv.FormatInt(fi.ModTime().UnixNano(), 10) + "\x00"))
			return nil
		})
		return nil
	})
	return h.Sum64()
}

// canvasPath checks the relative path of a canvas file request. The mux already redirects
// paths with "." or ".." segments; this is the check that does not depend on that.
func canvasPath(rel string) (string, error) {
	if strings.ContainsRune(rel, 0) {
		return "", errf(400, "invalid_path", "path", "path contains a NUL byte")
	}
	if strings.HasPrefix(rel, "/") || strings.Contains(rel, "\\") {
		return "", errf(400, "invalid_path", "path", "path must be relative to the canvas")
	}
	for _, seg := range strings.Split(rel, "/") {
		if seg == ".." {
			return "", errf(400, "invalid_path", "path", "path must stay inside the canvas")
		}
	}
	if rel == "" || strings.HasSuffix(rel, "/") {
		rel += "index.html"
	}
	return path.Clean(rel), nil
}

// handleCanvasFile serves a file of the canvas, opened with the canvas user's rights: a
// symlink to something that user may not read gives 403/404, never its bytes.
func (s *Server) handleCanvasFile(w http.ResponseWriter, r *http.Request) error {
	rel, err := canvasPath(r.PathValue("path"))
	if err != nil {
		return err
	}
	c := &s.svc.canvas
	u, err := c.account()
	if err != nil {
		return err
	}
	full := filepath.Join(c.dir, rel)
	return asUser(u, func() error {
		f, err := openCanvasFile(full, rel)
		if err != nil {
			return err
		}
		defer f.Close()
		fi, err := f.Stat()
		if err != nil {
			return fsError(err, rel)
		}
		ctype := mime.TypeByExtension(path.Ext(f.Name()))
		if ctype == "" {
			ctype = "application/octet-stream"
		}
		w.Header().Set("Content-Type", ctype)
		w.Header().Set("Cache-Control", "no-store")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		// ServeContent also answers HEAD and Range requests (media seeking).
		http.ServeContent(w, r, "", fi.ModTime(), f)
		return nil
	})
}

// openCanvasFile opens a regular file, or a directory's index.html. Errors name the path as
// requested (rel), not where the canvas is.
func openCanvasFile(full, rel string) (*os.File, error) {
	f, err := openRegular(full, rel)
	if err == errIsDir {
		f, err = openRegular(filepath.Join(full, "index.html"), path.Join(rel, "index.html"))
	}
	if err == errIsDir {
		return nil, errf(404, "not_found", "path", "%s: not a file", rel)
	}
	return f, err
}

var errIsDir = errors.New("is a directory")

func openRegular(full, rel string) (*os.File, error) {
	// O_NONBLOCK: a FIFO planted in the canvas must not hang the request at open.
	f, err := os.OpenFile(full, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) {
			return nil, errf(404, "not_found", "path", "%s: not in the canvas", rel)
		}
		return nil, fsError(err, rel)
	}
	fi, err := f.Stat()
	if err == nil {
		err = notEnvdItself(f, full)
	}
	switch {
	case err != nil:
	case fi.IsDir():
		err = errIsDir
	case !fi.Mode().IsRegular():
		err = errf(404, "not_found", "path", "%s: not a regular file", rel)
	default:
		return f, nil
	}
	f.Close()
	if err == errIsDir {
		return nil, err
	}
	return nil, fsError(err, rel)
}

// handleCanvasChanges is a long poll: it answers {"version": V} as soon as the canvas
// version is not `since` (at once without `since`), or with the current version after
// timeout_ms.
func (s *Server) handleCanvasChanges(w http.ResponseWriter, r *http.Request) error {
	timeout, err := queryMillis(r, "timeout_ms", defaultCanvasWait, maxCanvasWait)
	if err != nil {
		return err
	}
	var since int64 = -1
	if v := r.URL.Query().Get("since"); v != "" {
		if since, err = strconv.ParseInt(v, 10, 64); err != nil {
			return errf(400, "invalid_version", "since", "since must be a version number")
		}
	}
	c := &s.svc.canvas
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(canvasScanEvery)
	defer tick.Stop()
	for {
		v := c.current()
		if v != since {
			writeJSON(w, 200, map[string]int64{"version": v})
			return nil
		}
		select {
		case <-tick.C:
		case <-deadline.C:
			writeJSON(w, 200, map[string]int64{"version": c.current()})
			return nil
		case <-r.Context().Done():
			return nil
		}
	}
}
