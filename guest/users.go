package main

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// User is an account from the sandbox image. Parsed from /etc/passwd and
// /etc/group directly: the binary is static (no cgo/NSS) and the image may
// change its users at runtime, so nothing is cached.
type User struct {
	Name   string
	Uid    uint32
	Gid    uint32
	Groups []uint32
	Home   string
	Shell  string
}

const defaultUserName = "user"

var (
	passwdFile = "/etc/passwd"
	groupFile  = "/etc/group"
)

// lookupUser resolves name; "" means the default user `user`, falling back to
// the user envd runs as when the image has no `user` (e.g. tests on a dev box).
func lookupUser(name string) (*User, error) {
	if name == "" {
		if u, err := findUser(func(n string, _ uint32) bool { return n == defaultUserName }); err == nil {
			return u, nil
		}
		uid := uint32(os.Getuid())
		if u, err := findUser(func(_ string, id uint32) bool { return id == uid }); err == nil {
			return u, nil
		}
		if uid == 0 {
			return &User{Name: "root", Home: "/root", Shell: "/bin/sh"}, nil
		}
		return nil, fmt.Errorf("no default user")
	}
	u, err := findUser(func(n string, _ uint32) bool { return n == name })
	if err != nil && name == "root" {
		return &User{Name: "root", Home: "/root", Shell: "/bin/sh"}, nil
	}
	return u, err
}

func findUser(match func(name string, uid uint32) bool) (*User, error) {
	f, err := os.Open(passwdFile)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// name:passwd:uid:gid:gecos:home:shell
		fields := strings.Split(sc.Text(), ":")
		if len(fields) < 7 || strings.HasPrefix(fields[0], "#") {
			continue
		}
		uid, err1 := strconv.ParseUint(fields[2], 10, 32)
		gid, err2 := strconv.ParseUint(fields[3], 10, 32)
		if err1 != nil || err2 != nil || !match(fields[0], uint32(uid)) {
			continue
		}
		u := &User{Name: fields[0], Uid: uint32(uid), Gid: uint32(gid), Home: fields[5], Shell: fields[6]}
		if u.Home == "" {
			u.Home = "/"
		}
		u.Groups = supplementaryGroups(u.Name, u.Gid)
		return u, nil
	}
	return nil, fmt.Errorf("user not found")
}

func supplementaryGroups(name string, primary uint32) []uint32 {
	groups := []uint32{primary}
	f, err := os.Open(groupFile)
	if err != nil {
		return groups
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// name:passwd:gid:member,member
		fields := strings.Split(sc.Text(), ":")
		if len(fields) < 4 {
			continue
		}
		gid, err := strconv.ParseUint(fields[2], 10, 32)
		if err != nil || uint32(gid) == primary {
			continue
		}
		for _, m := range strings.Split(fields[3], ",") {
			if m == name {
				groups = append(groups, uint32(gid))
				break
			}
		}
	}
	return groups
}

// credential is what the child runs as. Only root can switch users; an
// unprivileged envd (tests) can only run commands as itself.
func (u *User) credential() (*syscall.Credential, error) {
	if os.Getuid() != 0 {
		if u.Uid != uint32(os.Getuid()) {
			return nil, fmt.Errorf("envd is not root and cannot run as %s", u.Name)
		}
		return nil, nil
	}
	return &syscall.Credential{Uid: u.Uid, Gid: u.Gid, Groups: u.Groups}, nil
}
