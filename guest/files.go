package main

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// resolvePath makes p absolute: relative paths are relative to the user's home.
func resolvePath(u *User, p string) (string, error) {
	if p == "" {
		return "", errf(400, "invalid_path", "path", "path is required")
	}
	if strings.ContainsRune(p, 0) {
		return "", errf(400, "invalid_path", "path", "path contains a NUL byte")
	}
	if !filepath.IsAbs(p) {
		p = filepath.Join(u.Home, p)
	}
	return filepath.Clean(p), nil
}

// requestUser resolves the optional user (query or body) of a file request.
func requestUser(name string) (*User, error) {
	u, err := lookupUser(name)
	if err != nil {
		return nil, errf(400, "invalid_user", "user", "unknown user %q", name)
	}
	return u, nil
}

// queryPath resolves ?path= (and ?user=) of a request.
func queryPath(r *http.Request) (string, *User, error) {
	u, err := requestUser(r.URL.Query().Get("user"))
	if err != nil {
		return "", nil, err
	}
	p, err := resolvePath(u, r.URL.Query().Get("path"))
	return p, u, err
}

// fsError maps filesystem errors onto protocol errors.
func fsError(err error, path string) error {
	var ae *apiError
	switch {
	case errors.As(err, &ae):
		return err
	case errors.Is(err, fs.ErrNotExist), errors.Is(err, syscall.ENOTDIR):
		return errf(404, "not_found", "path", "%s: no such file or directory", path)
	case errors.Is(err, fs.ErrPermission):
		return errf(403, "permission_denied", "path", "%s: permission denied", path)
	case errors.Is(err, fs.ErrExist):
		return errf(409, "already_exists", "path", "%s already exists", path)
	case errors.Is(err, syscall.ENOTEMPTY):
		return errf(409, "not_empty", "path", "%s is not empty", path)
	case errors.Is(err, syscall.EISDIR):
		return errf(400, "is_directory", "path", "%s is a directory", path)
	case errors.Is(err, syscall.ENAMETOOLONG):
		return errf(400, "invalid_path", "path", "%s: a name in the path is too long", path)
	case errors.Is(err, syscall.ELOOP):
		return errf(400, "invalid_path", "path", "%s: too many levels of symbolic links", path)
	case errors.Is(err, syscall.EINVAL), errors.Is(err, syscall.EXDEV):
		return errf(400, "invalid_path", "path", "%s: %v", path, err)
	case errors.Is(err, syscall.EROFS):
		return errf(403, "read_only", "path", "%s is on a read-only filesystem", path)
	case errors.Is(err, syscall.EBUSY):
		return errf(409, "busy", "path", "%s is busy", path)
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		// EDQUOT: the sandbox's own disk limit (docs/runtime.md, "Disk").
		return errf(507, "no_space", "path", "no space left: %v", err)
	}
	return errf(500, "io_error", "path", "%s: %v", path, err)
}

type entry struct {
	Name  string `json:"name"`
	Path  string `json:"path"`
	Type  string `json:"type"`
	Size  int64  `json:"size"`
	Mode  string `json:"mode"`
	Mtime string `json:"mtime"`
}

func makeEntry(path string, fi fs.FileInfo) entry {
	t := "other"
	switch {
	case fi.Mode().IsRegular():
		t = "file"
	case fi.IsDir():
		t = "dir"
	case fi.Mode()&fs.ModeSymlink != 0:
		t = "symlink"
	}
	return entry{
		Name: fi.Name(), Path: path, Type: t, Size: fi.Size(),
		Mode:  fmt.Sprintf("%04o", unixPerm(fi.Mode())),
		Mtime: fi.ModTime().UTC().Format(time.RFC3339),
	}
}

// unixPerm converts Go's FileMode permission bits to the octal Unix form.
func unixPerm(m fs.FileMode) uint32 {
	p := uint32(m.Perm())
	if m&fs.ModeSetuid != 0 {
		p |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		p |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		p |= 0o1000
	}
	return p
}

func statEntry(path string) (entry, error) {
	fi, err := os.Lstat(path)
	if err != nil {
		return entry{}, fsError(err, path)
	}
	return makeEntry(path, fi), nil
}

// mkdirAll creates dir and missing parents. It runs with the request's user's credentials
// (asUser), so what it creates is that user's, and it can create only what the user may.
func mkdirAll(dir string) error {
	fi, err := os.Stat(dir)
	if err == nil {
		if !fi.IsDir() {
			return errf(400, "not_directory", "path", "%s is not a directory", dir)
		}
		return nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return fsError(err, dir)
	}
	if parent := filepath.Dir(dir); parent != dir {
		if err := mkdirAll(parent); err != nil {
			return err
		}
	}
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return fsError(err, dir)
	}
	return nil
}

func parseMode(s string, def uint32) (uint32, error) {
	if s == "" {
		return def, nil
	}
	m, err := strconv.ParseUint(s, 8, 32)
	if err != nil || m > 0o7777 {
		return 0, errf(400, "invalid_mode", "mode", "mode must be octal, e.g. 0644")
	}
	return uint32(m), nil
}

// Every file handler below does its file system work inside asUser, with the credentials of
// the request's user (default `user`), so it can do exactly what that user can.

func (s *Server) handleReadFile(w http.ResponseWriter, r *http.Request) error {
	path, u, err := queryPath(r)
	if err != nil {
		return err
	}
	return asUser(u, func() error { return readFile(w, path) })
}

func readFile(w http.ResponseWriter, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fsError(err, path)
	}
	defer f.Close()
	if err := notEnvdItself(f, path); err != nil {
		return err
	}
	fi, err := f.Stat()
	if err != nil {
		return fsError(err, path)
	}
	if fi.IsDir() {
		return errf(400, "is_directory", "path", "%s is a directory", path)
	}
	// Read the first chunk before answering: a file that cannot be read (some /proc files,
	// devices) is an error with a reason, not a 200 cut short.
	buf := make([]byte, 64<<10)
	n, err := io.ReadFull(f, buf)
	eof := err == io.EOF || err == io.ErrUnexpectedEOF
	if err != nil && !eof {
		return readError(err, path)
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	if size := fi.Size(); fi.Mode().IsRegular() && size > 0 && !pseudoFile(f) {
		// A real file has an honest size: send exactly that many bytes. (A /proc or /sys file
		// says 0 or 4096 whatever it holds, so it goes without Content-Length.)
		first := min(int64(n), size)
		w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
		w.WriteHeader(200)
		if _, err := w.Write(buf[:first]); err != nil {
			panic(http.ErrAbortHandler)
		}
		if first < size {
			if _, err := io.CopyN(w, f, size-first); err != nil {
				panic(http.ErrAbortHandler) // cut the connection so the client sees a short body
			}
		}
		return nil
	}
	w.WriteHeader(200)
	if _, err := w.Write(buf[:n]); err != nil {
		panic(http.ErrAbortHandler)
	}
	if !eof {
		// Plain reads and writes (no sendfile: pseudo files and devices do not all support it).
		if _, err := io.CopyBuffer(struct{ io.Writer }{w}, struct{ io.Reader }{f}, buf); err != nil {
			panic(http.ErrAbortHandler)
		}
	}
	return nil
}

// readError maps a failed read of a file that did open.
func readError(err error, path string) error {
	switch {
	case errors.Is(err, fs.ErrPermission):
		return errf(403, "permission_denied", "path", "%s: permission denied", path)
	case errors.Is(err, syscall.EISDIR):
		return errf(400, "is_directory", "path", "%s is a directory", path)
	}
	return errf(400, "unreadable", "path", "%s cannot be read as a file: %v", path, err)
}

// pseudoFile says whether f lives on a file system whose sizes mean nothing (procfs, sysfs,
// cgroupfs).
func pseudoFile(f *os.File) bool {
	var st syscall.Statfs_t
	if err := syscall.Fstatfs(int(f.Fd()), &st); err != nil {
		return true
	}
	switch uint32(st.Type) {
	case 0x9fa0, 0x62656572, 0x27e0eb, 0x63677270: // proc, sysfs, cgroup, cgroup2
		return true
	}
	return false
}

// notEnvdItself refuses a file of envd's own /proc directory, whatever path (a symlink, /proc/
// self, /proc/<pid>/root/...) led to it. envd's threads pass the kernel's same-process checks
// on those files whichever user they act as, and they hold envd's memory and descriptors.
func notEnvdItself(f *os.File, path string) error {
	real, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(int(f.Fd())))
	if err != nil {
		real = path
	}
	if isEnvdProcPath(real) || isEnvdProcPath(path) {
		return envdProcError(path)
	}
	return nil
}

func envdProcError(path string) error {
	return errf(403, "permission_denied", "path",
		"%s belongs to envd, the sandbox's agent, and is not served", path)
}

// isEnvdProcPath: p (absolute, clean) is in /proc/<pid> of envd's process or one of its
// threads, or in /proc/self or /proc/thread-self (which, opened by envd, are envd's).
func isEnvdProcPath(p string) bool {
	rest, ok := strings.CutPrefix(filepath.Clean(p)+"/", "/proc/")
	if !ok {
		return false
	}
	first, _, _ := strings.Cut(rest, "/")
	switch first {
	case "self", "thread-self":
		return true
	case "":
		return false
	}
	for _, c := range first {
		if c < '0' || c > '9' {
			return false
		}
	}
	if first == strconv.Itoa(os.Getpid()) {
		return true
	}
	_, err := os.Lstat("/proc/self/task/" + first) // one of envd's threads?
	return !errors.Is(err, fs.ErrNotExist)
}

func (s *Server) handleWriteFile(w http.ResponseWriter, r *http.Request) error {
	path, u, err := queryPath(r)
	if err != nil {
		return err
	}
	mode, err := parseMode(r.URL.Query().Get("mode"), 0o644)
	if err != nil {
		return err
	}
	return asUser(u, func() error { return writeFile(w, r, path, mode) })
}

func writeFile(w http.ResponseWriter, r *http.Request, path string, mode uint32) error {
	if fi, err := os.Stat(path); err == nil && fi.IsDir() {
		return errf(400, "is_directory", "path", "%s is a directory", path)
	}
	dir := filepath.Dir(path)
	if err := mkdirAll(dir); err != nil {
		return err
	}
	// Write beside the target and rename, so readers never see a partial file.
	tmp, err := os.CreateTemp(dir, ".envd-upload-*")
	if err != nil {
		return fsError(err, path)
	}
	ok := false
	defer func() {
		if !ok {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	n, err := io.Copy(tmp, r.Body)
	if err != nil {
		if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
			return fsError(err, path)
		}
		return errf(400, "upload_failed", "", "reading request body: %v", err)
	}
	if err := tmp.Chmod(fs.FileMode(mode & 0o777)); err != nil {
		return fsError(err, path)
	}
	if mode&0o7000 != 0 {
		syscall.Chmod(tmp.Name(), mode)
	}
	if err := tmp.Close(); err != nil {
		return fsError(err, path)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fsError(err, path)
	}
	ok = true
	writeJSON(w, 200, map[string]any{"path": path, "size": n})
	return nil
}

func (s *Server) handleDelete(w http.ResponseWriter, r *http.Request) error {
	path, u, err := queryPath(r)
	if err != nil {
		return err
	}
	if path == "/" {
		return errf(400, "invalid_path", "path", "refusing to delete /")
	}
	recursive := r.URL.Query().Get("recursive")
	return asUser(u, func() error {
		fi, err := os.Lstat(path)
		if err != nil {
			return fsError(err, path)
		}
		if fi.IsDir() && (recursive == "true" || recursive == "1") {
			err = os.RemoveAll(path)
		} else {
			err = os.Remove(path)
		}
		if err != nil {
			if errors.Is(err, syscall.ENOTEMPTY) || errors.Is(err, syscall.EEXIST) {
				return errf(409, "not_empty", "path", "%s is not empty (use recursive=true)", path)
			}
			return fsError(err, path)
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	})
}

func (s *Server) handleList(w http.ResponseWriter, r *http.Request) error {
	path, u, err := queryPath(r)
	if err != nil {
		return err
	}
	return asUser(u, func() error {
		fi, err := os.Stat(path)
		if err != nil {
			return fsError(err, path)
		}
		if !fi.IsDir() {
			return errf(400, "not_directory", "path", "%s is not a directory", path)
		}
		des, err := os.ReadDir(path) // sorted by name
		if err != nil {
			return fsError(err, path)
		}
		entries := make([]entry, 0, len(des))
		for _, de := range des {
			info, err := de.Info()
			if err != nil {
				continue // vanished meanwhile
			}
			entries = append(entries, makeEntry(filepath.Join(path, de.Name()), info))
		}
		writeJSON(w, 200, map[string]any{"entries": entries})
		return nil
	})
}

func (s *Server) handleStat(w http.ResponseWriter, r *http.Request) error {
	path, u, err := queryPath(r)
	if err != nil {
		return err
	}
	return asUser(u, func() error {
		e, err := statEntry(path)
		if err != nil {
			return err
		}
		writeJSON(w, 200, e)
		return nil
	})
}

func (s *Server) handleMkdir(w http.ResponseWriter, r *http.Request) error {
	var req struct {
		Path    string `json:"path"`
		Parents bool   `json:"parents"`
		User    string `json:"user"`
	}
	if err := decodeJSON(r, &req); err != nil {
		return err
	}
	u, err := requestUser(req.User)
	if err != nil {
		return err
	}
	path, err := resolvePath(u, req.Path)
	if err != nil {
		return err
	}
	return asUser(u, func() error {
		var err error
		if req.Parents {
			err = mkdirAll(path)
		} else {
			err = os.Mkdir(path, 0o755)
		}
		if err != nil {
			return fsError(err, path)
		}
		e, err := statEntry(path)
		if err != nil {
			return err
		}
		writeJSON(w, 200, e)
		return nil
	})
}

func (s *Server) handleRename(w http.ResponseWriter, r *http.Request) error {
	var req struct {
		From string `json:"from"`
		To   string `json:"to"`
		User string `json:"user"`
	}
	if err := decodeJSON(r, &req); err != nil {
		return err
	}
	u, err := requestUser(req.User)
	if err != nil {
		return err
	}
	from, err := resolvePath(u, req.From)
	if err != nil {
		return err
	}
	to, err := resolvePath(u, req.To)
	if err != nil {
		return err
	}
	return asUser(u, func() error {
		if _, err := os.Lstat(from); err != nil {
			return fsError(err, from)
		}
		if err := os.Rename(from, to); err != nil {
			return fsError(err, to)
		}
		e, err := statEntry(to)
		if err != nil {
			return err
		}
		writeJSON(w, 200, e)
		return nil
	})
}
