package main

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
)

// symlinkTrap is a home owned by nobody with symlinks, planted by "sandbox code", into a
// root-owned directory that nobody may not write, and onto a file nobody may not read.
type symlinkTrap struct {
	home, etc string
}

// sharedTempDir is a 0755 temporary directory (t.TempDir's parent is 0700, closed to other
// users), removed after the test, and the user nobody; tests that need root skip without it.
func sharedTempDir(t *testing.T, prefix string) (string, *User) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("needs root")
	}
	nobody, err := lookupUser("nobody")
	if err != nil {
		t.Skip("no nobody user")
	}
	base, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	os.Chmod(base, 0o755)
	return base, nobody
}

func newSymlinkTrap(t *testing.T) (symlinkTrap, *User) {
	t.Helper()
	base, nobody := sharedTempDir(t, "envd-symlinks")
	tr := symlinkTrap{home: base + "/home", etc: base + "/etc"}
	os.Mkdir(tr.etc, 0o755)
	os.WriteFile(tr.etc+"/shadow", []byte("root-only secret"), 0o600)
	os.WriteFile(tr.etc+"/passwd", []byte("world readable"), 0o644)
	os.Mkdir(tr.home, 0o755)
	os.Chown(tr.home, int(nobody.Uid), int(nobody.Gid))
	os.Symlink(tr.etc, tr.home+"/cfg")
	os.Symlink(tr.etc+"/shadow", tr.home+"/report.txt")
	return tr, nobody
}

func TestFileAPIFollowsNoSymlinkBeyondTheUsersRights(t *testing.T) {
	tr, nobody := newSymlinkTrap(t)
	ts := startServer(t, "")
	as := func(user, p string) string { return "user=" + user + "&path=" + q(p) }

	expectError(t, ts.do("PUT", "/files?"+as("nobody", tr.home+"/cfg/x"), strings.NewReader("owned")), 403, "permission_denied")
	expectError(t, ts.do("GET", "/files?"+as("nobody", tr.home+"/report.txt"), nil), 403, "permission_denied")
	tarball := makeTar(t, &tar.Header{Name: "x", Typeflag: tar.TypeReg}, &tar.Header{Name: "sub/", Typeflag: tar.TypeDir})
	expectError(t, ts.do("PUT", "/files/tar?"+as("nobody", tr.home+"/cfg"), bytes.NewReader(tarball)), 403, "permission_denied")
	expectError(t, ts.json("POST", "/files/mkdir", map[string]any{"path": tr.home + "/cfg/d", "user": "nobody"}), 403, "permission_denied")
	expectError(t, ts.json("POST", "/files/rename", map[string]any{"from": tr.home + "/cfg/passwd", "to": tr.home + "/stolen", "user": "nobody"}), 403, "permission_denied")
	expectError(t, ts.do("DELETE", "/files?"+as("nobody", tr.home+"/cfg/passwd"), nil), 403, "permission_denied")
	for _, p := range []string{"x", "d", "sub"} {
		if fileExists(tr.etc + "/" + p) {
			t.Fatalf("%s was created through a symlink", p)
		}
	}
	if !fileExists(tr.etc + "/passwd") {
		t.Fatal("passwd was removed or renamed through a symlink")
	}
	// What nobody may do still works: list and read the world-readable, and a tar of the
	// directory has exactly what nobody can read.
	var list struct{ Entries []entry }
	expect(t, ts.do("GET", "/files/list?"+as("nobody", tr.home+"/cfg"), nil), 200, &list)
	if len(list.Entries) != 2 {
		t.Fatalf("list %+v", list)
	}
	resp := ts.do("GET", "/files/tar?"+as("nobody", tr.home+"/cfg"), nil)
	names := tarNames(t, resp)
	if !names["passwd"] || names["shadow"] {
		t.Fatalf("tar as nobody holds %v", names)
	}
	expect(t, ts.do("PUT", "/files?"+as("nobody", tr.home+"/mine/f.txt"), strings.NewReader("x")), 200, nil)
	for _, p := range []string{tr.home + "/mine", tr.home + "/mine/f.txt"} {
		st, _ := os.Stat(p)
		if s := st.Sys().(*syscall.Stat_t); s.Uid != nobody.Uid || s.Gid != nobody.Gid {
			t.Fatalf("%s owned by %d:%d", p, s.Uid, s.Gid)
		}
	}

	// root may, so user=root still does.
	expect(t, ts.do("PUT", "/files?"+as("root", tr.home+"/cfg/x"), strings.NewReader("by root")), 200, nil)
	if b, _ := os.ReadFile(tr.etc + "/x"); string(b) != "by root" {
		t.Fatalf("root write: %q", b)
	}
	resp = ts.do("GET", "/files?"+as("root", tr.home+"/report.txt"), nil)
	if b, _ := io.ReadAll(resp.Body); resp.StatusCode != 200 || string(b) != "root-only secret" {
		t.Fatalf("root read: %d %q", resp.StatusCode, b)
	}
	resp.Body.Close()
	names = tarNames(t, ts.do("GET", "/files/tar?"+as("root", tr.home+"/cfg"), nil))
	if !names["shadow"] {
		t.Fatalf("tar as root holds %v", names)
	}
	assertAllThreadsRoot(t)
}

func tarNames(t *testing.T, resp *http.Response) map[string]bool {
	t.Helper()
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("tar: %d %s", resp.StatusCode, b)
	}
	names := map[string]bool{}
	tr := tar.NewReader(resp.Body)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return names
		}
		if err != nil {
			t.Fatal(err)
		}
		names[hdr.Name] = true
	}
}

// assertAllThreadsRoot: no thread of this process kept a user's credentials.
func assertAllThreadsRoot(t *testing.T) {
	t.Helper()
	tasks, _ := filepath.Glob("/proc/self/task/*/status")
	for _, st := range tasks {
		b, err := os.ReadFile(st)
		if err != nil {
			continue // the thread ended
		}
		for _, line := range strings.Split(string(b), "\n") {
			if (strings.HasPrefix(line, "Uid:") || strings.HasPrefix(line, "Gid:")) &&
				strings.Join(strings.Fields(line)[1:], " ") != "0 0 0 0" {
				t.Fatalf("%s: %s", st, line)
			}
		}
	}
}

// Operations as nobody and as root at the same time: each gets exactly its own rights.
func TestConcurrentUsersKeepTheirOwnCredentials(t *testing.T) {
	tr, _ := newSymlinkTrap(t)
	ts := startServer(t, "")
	var wg sync.WaitGroup
	errs := make(chan string, 200)
	for i := 0; i < 100; i++ {
		user, want := "nobody", 403
		if i%2 == 1 {
			user, want = "root", 200
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp := ts.do("GET", "/files?user="+user+"&path="+q(tr.etc+"/shadow"), nil)
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != want {
				errs <- fmt.Sprintf("%s got %d, want %d", user, resp.StatusCode, want)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	assertAllThreadsRoot(t)
}

func TestProcFilesOfEnvdAreRefusedOthersAnswerCleanly(t *testing.T) {
	ts := startServer(t, "")
	dir := t.TempDir()
	os.Symlink("/proc/self", dir+"/me")
	pid := strconv.Itoa(os.Getpid())
	for _, p := range []string{"/proc/self/environ", "/proc/" + pid + "/environ", "/proc/thread-self/environ",
		"/proc/self/task/" + pid + "/environ", dir + "/me/environ", "/proc/self/mem", "/proc/self/cmdline"} {
		expectError(t, ts.do("GET", "/files?user=root&path="+q(p), nil), 403, "permission_denied")
	}
	// A tar of envd's /proc directory, or of /proc/self through a symlink, is refused too.
	expectError(t, ts.do("GET", "/files/tar?user=root&path="+q(dir+"/me"), nil), 403, "permission_denied")

	// Another process's memory cannot be read from offset 0: a 400 with the reason.
	child := exec.Command("sleep", "30")
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { child.Process.Kill(); child.Wait() }()
	expectError(t, ts.do("GET", "/files?user=root&path="+q("/proc/"+strconv.Itoa(child.Process.Pid)+"/mem"), nil), 400, "unreadable")

	// An ordinary /proc file (size 0 in stat) is served whole (it used to be announced with
	// Content-Length: 0, which broke the connection: a 502 through the host).
	resp := ts.do("GET", "/files?user=root&path=/proc/meminfo", nil)
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != 200 || !bytes.Contains(b, []byte("MemTotal")) ||
		(resp.ContentLength != -1 && resp.ContentLength != int64(len(b))) {
		t.Fatalf("meminfo: %d %v len %d %q", resp.StatusCode, err, resp.ContentLength, b[:min(len(b), 80)])
	}
}

func TestProcFilesAsAnotherUser(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root")
	}
	if _, err := lookupUser("nobody"); err != nil {
		t.Skip("no nobody user")
	}
	ts := startServer(t, "")
	child := exec.Command("sleep", "30")
	child.Env = []string{"SECRET=of-root"}
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { child.Process.Kill(); child.Wait() }()
	environ := "/proc/" + strconv.Itoa(child.Process.Pid) + "/environ"
	expectError(t, ts.do("GET", "/files?user=nobody&path="+q(environ), nil), 403, "permission_denied")
	expectError(t, ts.do("GET", "/files?user=nobody&path=/proc/self/environ", nil), 403, "permission_denied")
	resp := ts.do("GET", "/files?user=root&path="+q(environ), nil)
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !bytes.Contains(b, []byte("SECRET=of-root")) {
		t.Fatalf("root reading a root process's environ: %d %q", resp.StatusCode, b)
	}
}

// The token must not stay readable in /proc/<envd>/environ after envd removed it.
func TestScrubInitialEnv(t *testing.T) {
	if os.Getenv("ENVD_SCRUB_CHILD") == "1" {
		if err := scrubInitialEnv(tokenEnv); err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		b, _ := os.ReadFile("/proc/self/environ")
		os.Stdout.Write(b)
		os.Exit(0)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestScrubInitialEnv$")
	cmd.Env = []string{"A=1", tokenEnv + "=very-secret-token", "ENVD_SCRUB_CHILD=1", "Z=2"}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if bytes.Contains(out, []byte("very-secret-token")) || bytes.Contains(out, []byte(tokenEnv)) {
		t.Fatalf("token still in environ: %q", out)
	}
	if !bytes.Contains(out, []byte("A=1\x00")) || !bytes.Contains(out, []byte("Z=2\x00")) {
		t.Fatalf("other variables damaged: %q", out)
	}
}

// envd's listening socket must not have SO_REUSEADDR: in gVisor that flag on both sockets
// lets another process bind envd's address and port beside it.
func TestListenerHasNoReuseAddr(t *testing.T) {
	ln, err := listenExclusive("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	f, err := ln.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	v, err := syscall.GetsockoptInt(int(f.Fd()), syscall.SOL_SOCKET, syscall.SO_REUSEADDR)
	if err != nil || v != 0 {
		t.Fatalf("SO_REUSEADDR = %d (%v)", v, err)
	}
	// And a second bind of the same address, with SO_REUSEADDR, fails.
	port := ln.Addr().(*net.TCPAddr).Port
	fd, _ := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	defer syscall.Close(fd)
	syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1)
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Port: port, Addr: [4]byte{127, 0, 0, 1}}); err == nil {
		t.Fatal("a second socket bound envd's address")
	}
}

func TestTarOfAnUnreadableDirectoryIs403(t *testing.T) {
	tr, _ := newSymlinkTrap(t)
	ts := startServer(t, "")
	os.Chmod(tr.etc, 0o700)
	expectError(t, ts.do("GET", "/files/tar?user=nobody&path="+q(tr.home+"/cfg"), nil), 403, "permission_denied")
}
