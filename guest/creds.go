package main

import (
	"fmt"
	"os"
	"runtime"
	"syscall"
	"unsafe"
)

// File operations run with the credentials of the user the request names, so that they can
// do exactly what that user can: a symlink planted by sandbox code leads nowhere its user
// could not go anyway, and the permission checks are the kernel's own (gVisor's), not ours.
//
// How: the request's goroutine locks itself to its OS thread, and that thread (only that one:
// these are raw syscalls, not Go's syscall.Setresuid, which changes every thread of the
// process) sets its supplementary groups, effective gid and effective uid to the user's. The
// real and saved uid stay 0, so the thread can switch back afterwards; it does, and is handed
// back to the Go scheduler only once it is root again (a thread that could not be restored
// ends with its goroutine). Go never clones a new thread from a locked one (runtime.newm
// hands that to its template thread, started by the first LockOSThread, while still root), so
// the changed credentials do not spread, and nothing but the request's goroutine runs on the
// thread meanwhile. gVisor keeps credentials per thread like Linux (tested: guest tests and
// tests/security/test_files_symlinks.py); it does not implement setfsuid, so the effective ids
// are what is switched. Measured in a sandbox: a switch and the switch back cost about
// 0.1-0.2 ms (six syscalls; gVisor's credential syscalls cost ~30 µs each), root pays nothing.

var (
	envdGroups = initialGroups()
	envdGid    = uintptr(os.Getegid())
)

func initialGroups() []uint32 {
	gs, err := syscall.Getgroups()
	if err != nil {
		return nil
	}
	out := make([]uint32, len(gs))
	for i, g := range gs {
		out[i] = uint32(g)
	}
	return out
}

// asUser runs fn with u's file system credentials, on the calling goroutine locked to its
// thread for the duration.
func asUser(u *User, fn func() error) error {
	if os.Getuid() != 0 {
		// An unprivileged envd (tests on a dev box) can only act as itself.
		if u.Uid != uint32(os.Getuid()) {
			return errf(400, "invalid_user", "user", "envd is not root and cannot act as %s", u.Name)
		}
		return fn()
	}
	if u.Uid == 0 {
		return fn() // root: envd's own credentials
	}
	runtime.LockOSThread()
	defer func() { // also when fn panics (http.ErrAbortHandler cuts a stream)
		if restoreRoot() != nil {
			// Never hand this thread back: end the goroutine while it is locked to it, and Go
			// ends the thread with it (the request's connection is dropped).
			runtime.Goexit()
		}
		runtime.UnlockOSThread()
	}()
	if err := becomeUser(u); err != nil {
		return errf(500, "internal", "", "cannot take the credentials of %s: %v", u.Name, err)
	}
	return fn()
}

const keep = ^uintptr(0) // -1: leave this id as it is

func setgroups(groups []uint32) error {
	var p uintptr
	if len(groups) > 0 {
		p = uintptr(unsafe.Pointer(&groups[0]))
	}
	_, _, e := syscall.RawSyscall(syscall.SYS_SETGROUPS, uintptr(len(groups)), p, 0)
	runtime.KeepAlive(groups)
	if e != 0 {
		return fmt.Errorf("setgroups: %w", e)
	}
	return nil
}

func setresgid(e uintptr) error {
	if _, _, errno := syscall.RawSyscall(syscall.SYS_SETRESGID, keep, e, keep); errno != 0 {
		return fmt.Errorf("setresgid: %w", errno)
	}
	return nil
}

func setresuid(e uintptr) error {
	if _, _, errno := syscall.RawSyscall(syscall.SYS_SETRESUID, keep, e, keep); errno != 0 {
		return fmt.Errorf("setresuid: %w", errno)
	}
	return nil
}

// becomeUser switches the calling thread; groups and gid first (that needs CAP_SETGID, which
// the thread loses with euid 0).
func becomeUser(u *User) error {
	groups := u.Groups
	if len(groups) == 0 {
		groups = []uint32{u.Gid}
	}
	if err := setgroups(groups); err != nil {
		return err
	}
	if err := setresgid(uintptr(u.Gid)); err != nil {
		return err
	}
	return setresuid(uintptr(u.Uid))
}

// restoreRoot switches the calling thread back: euid 0 first (which gives the thread back its
// capabilities), then gid and groups.
func restoreRoot() error {
	if err := setresuid(0); err != nil {
		return err
	}
	if err := setresgid(envdGid); err != nil {
		return err
	}
	return setgroups(envdGroups)
}
