package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func TestParsePasswdAndGroups(t *testing.T) {
	dir := t.TempDir()
	oldP, oldG := passwdFile, groupFile
	passwdFile, groupFile = dir+"/passwd", dir+"/group"
	defer func() { passwdFile, groupFile = oldP, oldG }()
	os.WriteFile(passwdFile, []byte("root:x:0:0:root:/root:/bin/bash\n# comment\nuser:x:1000:1000::/home/user:/bin/bash\n"), 0o644)
	os.WriteFile(groupFile, []byte("user:x:1000:\ndocker:x:999:alice,user\nother:x:5:alice\n"), 0o644)

	u, err := lookupUser("") // default is `user` when it exists
	if err != nil || u.Name != "user" || u.Uid != 1000 || u.Home != "/home/user" {
		t.Fatalf("%+v %v", u, err)
	}
	if len(u.Groups) != 2 || u.Groups[0] != 1000 || u.Groups[1] != 999 {
		t.Fatalf("groups %v", u.Groups)
	}
	if _, err := lookupUser("nobody-here"); err == nil {
		t.Fatal("unknown user resolved")
	}
}

// Running as another user needs root (the tests normally run as root).
func TestRunsAndWritesAsRequestedUser(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root")
	}
	nobody, err := lookupUser("nobody")
	if err != nil {
		t.Skip("no nobody user")
	}
	ts := startServer(t, "")
	r := ts.run(map[string]any{"cmd": "id -u; echo $USER $HOME", "user": "nobody"})
	want := "65534\nnobody " + nobody.Home + "\n"
	if nobody.Uid != 65534 || r.stdout != want {
		t.Fatalf("got %q want %q", r.stdout, want)
	}

	dir, err := os.MkdirTemp("", "envd-user-test") // t.TempDir's parent is 0700
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	os.Chmod(dir, 0o777) // file operations run as the user: nobody must be able to create p1
	file := filepath.Join(dir, "p1/p2/f.txt")
	expect(t, ts.do("PUT", "/files?user=nobody&path="+q(file), bytes.NewBufferString("x")), 200, nil)
	for _, p := range []string{dir + "/p1", dir + "/p1/p2", file} {
		st, _ := os.Stat(p)
		if s := st.Sys().(*syscall.Stat_t); s.Uid != nobody.Uid || s.Gid != nobody.Gid {
			t.Fatalf("%s owned by %d:%d", p, s.Uid, s.Gid)
		}
	}
	r = ts.run(map[string]any{"cmd": "touch mine && stat -c %U mine", "user": "nobody", "cwd": dir + "/p1"})
	if strings.TrimSpace(r.stdout) != "nobody" {
		t.Fatalf("got %q %q", r.stdout, r.stderr)
	}
}
