package main

import (
	"archive/tar"
	"errors"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"
)

// handleTarDownload streams a tar of DIR's contents (names relative to DIR), read with the
// credentials of the request's user: what that user cannot read is left out.
func (s *Server) handleTarDownload(w http.ResponseWriter, r *http.Request) error {
	dir, u, err := queryPath(r)
	if err != nil {
		return err
	}
	return asUser(u, func() error { return tarDownload(w, dir) })
}

func tarDownload(w http.ResponseWriter, dir string) error {
	fi, err := os.Stat(dir)
	if err != nil {
		return fsError(err, dir)
	}
	if !fi.IsDir() {
		return errf(400, "not_directory", "path", "%s is not a directory", dir)
	}
	// Walk the directory itself, not a symlink to it, and never envd's own /proc directory.
	root, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return fsError(err, dir)
	}
	if isEnvdProcPath(root) {
		return envdProcError(dir)
	}
	// A directory the user may not read is a 403 now, not a stream cut after its headers.
	d, err := os.Open(root)
	if err != nil {
		return fsError(err, dir)
	}
	d.Close()
	w.Header().Set("Content-Type", "application/x-tar")
	tw := tar.NewWriter(w)
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if p == root {
				return err
			}
			return nil // unreadable or vanished entry: skip it, keep the archive going
		}
		if p == root {
			return nil
		}
		if isEnvdProcPath(p) {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return nil
		}
		return addTarEntry(tw, p, filepath.ToSlash(rel), info)
	})
	if err == nil {
		err = tw.Close()
	}
	if err != nil {
		panic(http.ErrAbortHandler) // mid-stream: cutting the connection is the only signal left
	}
	return nil
}

func addTarEntry(tw *tar.Writer, full, name string, info fs.FileInfo) error {
	hdr := &tar.Header{
		Name:    name,
		Mode:    int64(unixPerm(info.Mode())),
		ModTime: info.ModTime(),
		Format:  tar.FormatPAX,
	}
	if st, ok := info.Sys().(*syscall.Stat_t); ok {
		hdr.Uid, hdr.Gid = int(st.Uid), int(st.Gid)
	}
	var f *os.File
	switch {
	case info.Mode().IsRegular():
		var err error
		if f, err = os.Open(full); err != nil {
			return nil // unreadable: skip
		}
		defer f.Close()
		hdr.Typeflag, hdr.Size = tar.TypeReg, info.Size()
	case info.IsDir():
		hdr.Typeflag, hdr.Name = tar.TypeDir, name+"/"
	case info.Mode()&fs.ModeSymlink != 0:
		target, err := os.Readlink(full)
		if err != nil {
			return nil
		}
		hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, target
	default:
		return nil // sockets, fifos, devices are not archived
	}
	if err := tw.WriteHeader(hdr); err != nil {
		return err
	}
	if f == nil {
		return nil
	}
	// The file may change while we read it; the header's size is what counts.
	n, err := io.CopyN(tw, f, hdr.Size)
	if err != nil && err != io.EOF {
		return err
	}
	if n < hdr.Size {
		_, err = io.CopyN(tw, zeroReader{}, hdr.Size-n)
	}
	return err
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// handleTarUpload extracts a tar stream into DIR, with the credentials of the request's user.
// Entries are applied in order, so entries before a rejected one remain on disk.
func (s *Server) handleTarUpload(w http.ResponseWriter, r *http.Request) error {
	dir, u, err := queryPath(r)
	if err != nil {
		return err
	}
	return asUser(u, func() error { return tarUpload(w, r, dir) })
}

func tarUpload(w http.ResponseWriter, r *http.Request, dir string) error {
	if err := mkdirAll(dir); err != nil {
		return err
	}
	// os.Root confines every operation to dir even if the sandbox races us by
	// swapping in symlinks; the explicit checks below give the clean 400.
	root, err := os.OpenRoot(dir)
	if err != nil {
		return fsError(err, dir)
	}
	defer root.Close()
	x := extractor{root: root}
	tr := tar.NewReader(r.Body)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return errf(400, "invalid_tar", "", "reading tar: %v", err)
		}
		if err := x.extract(hdr, tr); err != nil {
			return err
		}
	}
	writeJSON(w, 200, map[string]int64{"files": x.files, "bytes": x.bytes})
	return nil
}

type extractor struct {
	root  *os.Root
	files int64 // entries written (files, dirs, symlinks)
	bytes int64 // regular file bytes written
}

// safeName cleans a tar entry name, rejecting absolute names and escapes.
func safeName(name string) (string, error) {
	if strings.ContainsRune(name, 0) || strings.HasPrefix(name, "/") || strings.HasPrefix(name, `\`) {
		return "", errf(400, "unsafe_path", "", "unsafe tar entry %q", name)
	}
	c := path.Clean(name)
	if c == ".." || strings.HasPrefix(c, "../") {
		return "", errf(400, "unsafe_path", "", "tar entry %q escapes the target directory", name)
	}
	return c, nil
}

// ensureDir creates every component of rel as a directory owned by the user,
// refusing to go through a symlink.
func (x *extractor) ensureDir(rel string) error {
	if rel == "." {
		return nil
	}
	cur := ""
	for _, part := range strings.Split(rel, "/") {
		cur = path.Join(cur, part)
		fi, err := x.root.Lstat(cur)
		switch {
		case err == nil && fi.Mode()&fs.ModeSymlink != 0:
			return errf(400, "unsafe_path", "", "%q would write through a symlink", cur)
		case err == nil && !fi.IsDir():
			return errf(400, "not_directory", "", "%q is not a directory", cur)
		case err == nil:
			continue
		case !errors.Is(err, fs.ErrNotExist):
			return fsError(err, cur)
		}
		if err := x.root.Mkdir(cur, 0o755); err != nil {
			return fsError(err, cur)
		}
	}
	return nil
}

func (x *extractor) extract(hdr *tar.Header, body io.Reader) error {
	name, err := safeName(hdr.Name)
	if err != nil {
		return err
	}
	mode := fs.FileMode(hdr.Mode & 0o777)
	switch hdr.Typeflag {
	case tar.TypeDir:
		if err := x.ensureDir(name); err != nil {
			return err
		}
		if name != "." {
			x.root.Chmod(name, mode)
		}
	case tar.TypeReg, tar.TypeRegA:
		if name == "." {
			return errf(400, "unsafe_path", "", "file entry %q names the target directory", hdr.Name)
		}
		if err := x.ensureDir(path.Dir(name)); err != nil {
			return err
		}
		if fi, err := x.root.Lstat(name); err == nil {
			if fi.Mode()&fs.ModeSymlink != 0 {
				return errf(400, "unsafe_path", "", "%q would write through a symlink", name)
			}
			if fi.IsDir() {
				return errf(400, "is_directory", "", "%q is a directory", name)
			}
		}
		f, err := x.root.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|syscall.O_NOFOLLOW, 0o600)
		if err != nil {
			return fsError(err, name)
		}
		n, err := io.Copy(f, body)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
				return fsError(err, name) // the sandbox's disk limit: 507, not a bad tar
			}
			return errf(400, "invalid_tar", "", "writing %q: %v", name, err)
		}
		x.bytes += n
		x.root.Chmod(name, mode)
	case tar.TypeSymlink:
		if name == "." {
			return errf(400, "unsafe_path", "", "symlink entry %q names the target directory", hdr.Name)
		}
		if err := x.ensureDir(path.Dir(name)); err != nil {
			return err
		}
		if fi, err := x.root.Lstat(name); err == nil {
			if fi.IsDir() {
				return errf(400, "is_directory", "", "%q is a directory", name)
			}
			x.root.Remove(name)
		}
		// The target may point anywhere; later entries still cannot write through it.
		if err := x.root.Symlink(hdr.Linkname, name); err != nil {
			return fsError(err, name)
		}
	default:
		return nil // hard links, devices, fifos: not supported, skipped
	}
	x.files++
	return nil
}
