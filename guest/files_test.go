package main

import (
	"archive/tar"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

func q(p string) string { return url.QueryEscape(p) }

func TestFileWriteReadRoundTrip(t *testing.T) {
	ts := startServer(t, "")
	data := make([]byte, 5<<20+123)
	rand.Read(data)
	path := filepath.Join(t.TempDir(), "new/parents/blob.bin")

	var put struct {
		Path string
		Size int64
	}
	expect(t, ts.do("PUT", "/files?mode=0600&path="+q(path), bytes.NewReader(data)), 200, &put)
	if put.Path != path || put.Size != int64(len(data)) {
		t.Fatalf("put %+v", put)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("stat %v %v", fi, err)
	}
	leftovers, _ := filepath.Glob(filepath.Join(filepath.Dir(path), ".envd-upload-*"))
	if len(leftovers) != 0 {
		t.Fatalf("temp files left: %v", leftovers)
	}

	resp := ts.do("GET", "/files?path="+q(path), nil)
	defer resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Length") != strconv.Itoa(len(data)) {
		t.Fatalf("status %d length %q", resp.StatusCode, resp.Header.Get("Content-Length"))
	}
	h := sha256.New()
	io.Copy(h, resp.Body)
	if want := sha256.Sum256(data); !bytes.Equal(h.Sum(nil), want[:]) {
		t.Fatal("checksum mismatch")
	}

	expectError(t, ts.do("GET", "/files?path="+q(filepath.Dir(path)), nil), 400, "is_directory")
	expectError(t, ts.do("GET", "/files?path="+q(path+".missing"), nil), 404, "not_found")
	expectError(t, ts.do("GET", "/files?path=a%00b", nil), 400, "invalid_path")
	expectError(t, ts.do("PUT", "/files?mode=999&path="+q(path), nil), 400, "invalid_mode")
}

func TestFileOperations(t *testing.T) {
	ts := startServer(t, "")
	dir := t.TempDir()

	var e entry
	expect(t, ts.json("POST", "/files/mkdir", map[string]any{"path": dir + "/a/b", "parents": true}), 200, &e)
	if e.Type != "dir" || e.Name != "b" || e.Path != dir+"/a/b" || e.Mode != "0755" {
		t.Fatalf("mkdir %+v", e)
	}
	expectError(t, ts.json("POST", "/files/mkdir", map[string]any{"path": dir + "/x/y"}), 404, "not_found")
	expectError(t, ts.json("POST", "/files/mkdir", map[string]any{"path": dir + "/a"}), 409, "already_exists")

	expect(t, ts.do("PUT", "/files?path="+q(dir+"/a/f.txt"), bytes.NewBufferString("hello")), 200, nil)
	os.Symlink("f.txt", dir+"/a/link")

	var list struct{ Entries []entry }
	expect(t, ts.json("GET", "/files/list?path="+q(dir+"/a"), nil), 200, &list)
	if len(list.Entries) != 3 {
		t.Fatalf("list %+v", list)
	}
	types := map[string]string{}
	for i, en := range list.Entries {
		types[en.Name] = en.Type
		if i > 0 && list.Entries[i-1].Name >= en.Name {
			t.Fatal("not sorted")
		}
	}
	if types["b"] != "dir" || types["f.txt"] != "file" || types["link"] != "symlink" {
		t.Fatalf("types %v", types)
	}
	expectError(t, ts.json("GET", "/files/list?path="+q(dir+"/a/f.txt"), nil), 400, "not_directory")

	expect(t, ts.json("GET", "/files/stat?path="+q(dir+"/a/f.txt"), nil), 200, &e)
	if e.Type != "file" || e.Size != 5 || e.Mode != "0644" || e.Mtime == "" {
		t.Fatalf("stat %+v", e)
	}
	expectError(t, ts.json("GET", "/files/stat?path="+q(dir+"/nope"), nil), 404, "not_found")

	expect(t, ts.json("POST", "/files/rename", map[string]any{"from": dir + "/a/f.txt", "to": dir + "/a/b/g.txt"}), 200, &e)
	if e.Path != dir+"/a/b/g.txt" || e.Size != 5 {
		t.Fatalf("rename %+v", e)
	}
	if _, err := os.Stat(dir + "/a/f.txt"); !os.IsNotExist(err) {
		t.Fatal("old name still there")
	}
	expectError(t, ts.json("POST", "/files/rename", map[string]any{"from": dir + "/nope", "to": dir + "/x"}), 404, "not_found")

	expectError(t, ts.do("DELETE", "/files?path="+q(dir+"/a"), nil), 409, "not_empty")
	expect(t, ts.do("DELETE", "/files?path="+q(dir+"/a/link"), nil), 204, nil)
	expect(t, ts.do("DELETE", "/files?recursive=true&path="+q(dir+"/a"), nil), 204, nil)
	if _, err := os.Stat(dir + "/a"); !os.IsNotExist(err) {
		t.Fatal("not deleted")
	}
	expectError(t, ts.do("DELETE", "/files?path="+q(dir+"/a"), nil), 404, "not_found")
}

func TestRelativePathsUseHome(t *testing.T) {
	ts := startServer(t, "")
	u, err := lookupUser("")
	if err != nil {
		t.Fatal(err)
	}
	name := ".envd-test-" + strconv.Itoa(os.Getpid())
	defer os.Remove(filepath.Join(u.Home, name))
	expect(t, ts.do("PUT", "/files?path="+name, bytes.NewBufferString("x")), 200, nil)
	if b, err := os.ReadFile(filepath.Join(u.Home, name)); err != nil || string(b) != "x" {
		t.Fatalf("%q %v", b, err)
	}
}

func TestTarRoundTrip(t *testing.T) {
	ts := startServer(t, "")
	src := t.TempDir()
	os.MkdirAll(src+"/sub/deep", 0o750)
	os.WriteFile(src+"/top.txt", []byte("top"), 0o600)
	big := make([]byte, 1<<20)
	rand.Read(big)
	os.WriteFile(src+"/sub/deep/big.bin", big, 0o755)
	os.Symlink("../top.txt", src+"/sub/link")

	resp := ts.do("GET", "/files/tar?path="+q(src), nil)
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/x-tar" {
		t.Fatalf("status %d", resp.StatusCode)
	}
	archive, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	tr := tar.NewReader(bytes.NewReader(archive))
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if filepath.IsAbs(hdr.Name) {
			t.Fatalf("absolute name %q", hdr.Name)
		}
	}

	dst := filepath.Join(t.TempDir(), "created")
	var out struct{ Files, Bytes int64 }
	expect(t, ts.do("PUT", "/files/tar?path="+q(dst), bytes.NewReader(archive)), 200, &out)
	if out.Files != 5 || out.Bytes != int64(len(big))+3 {
		t.Fatalf("extract %+v", out)
	}
	if b, _ := os.ReadFile(dst + "/sub/deep/big.bin"); !bytes.Equal(b, big) {
		t.Fatal("big file differs")
	}
	if target, _ := os.Readlink(dst + "/sub/link"); target != "../top.txt" {
		t.Fatalf("link -> %q", target)
	}
	for p, mode := range map[string]os.FileMode{"/top.txt": 0o600, "/sub": 0o750, "/sub/deep/big.bin": 0o755} {
		if fi, err := os.Stat(dst + p); err != nil || fi.Mode().Perm() != mode {
			t.Fatalf("%s: %v %v", p, fi.Mode(), err)
		}
	}
	expectError(t, ts.do("GET", "/files/tar?path="+q(dst+"/top.txt"), nil), 400, "not_directory")
}

func makeTar(t *testing.T, hdrs ...*tar.Header) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, h := range hdrs {
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len("payload"))
		}
		if h.Mode == 0 {
			h.Mode = 0o644
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			tw.Write([]byte("payload"))
		}
	}
	tw.Close()
	return buf.Bytes()
}

func TestTarRejectsUnsafeEntries(t *testing.T) {
	ts := startServer(t, "")
	outside := t.TempDir()
	cases := map[string][]*tar.Header{
		"absolute": {{Name: outside + "/abs.txt", Typeflag: tar.TypeReg}},
		"dotdot":   {{Name: "a/../../escape.txt", Typeflag: tar.TypeReg}},
		"through symlinked dir": {
			{Name: "ln", Typeflag: tar.TypeSymlink, Linkname: outside},
			{Name: "ln/evil.txt", Typeflag: tar.TypeReg},
		},
		"through symlinked file": {
			{Name: "f", Typeflag: tar.TypeSymlink, Linkname: outside + "/target.txt"},
			{Name: "f", Typeflag: tar.TypeReg},
		},
	}
	for name, hdrs := range cases {
		t.Run(name, func(t *testing.T) {
			dst := t.TempDir()
			expectError(t, ts.do("PUT", "/files/tar?path="+q(dst), bytes.NewReader(makeTar(t, hdrs...))), 400, "unsafe_path")
		})
	}
	if ents, _ := os.ReadDir(outside); len(ents) != 0 || fileExists(filepath.Dir(outside)+"/escape.txt") {
		t.Fatalf("something was written outside: %v", ents)
	}
	// A harmless "a/../b" stays inside and is fine.
	dst := t.TempDir()
	expect(t, ts.do("PUT", "/files/tar?path="+q(dst), bytes.NewReader(makeTar(t, &tar.Header{Name: "a/../b.txt", Typeflag: tar.TypeReg}))), 200, nil)
	if !fileExists(dst + "/b.txt") {
		t.Fatal("b.txt missing")
	}
	expectError(t, ts.do("PUT", "/files/tar?path="+q(dst), bytes.NewBufferString("not a tar archive at all, just text that is long enough to need a header block...")), 400, "invalid_tar")
}

func fileExists(p string) bool {
	_, err := os.Lstat(p)
	return err == nil
}
