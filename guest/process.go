package main

import (
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// Reaper is the only place that calls wait4. envd runs as PID 1, so it inherits
// every orphan in the sandbox; mixing exec.Cmd.Wait with a wait4(-1) loop would
// let one steal the other's exit status. Instead one goroutine reaps everything
// and hands statuses to the processes envd started itself.
type Reaper struct {
	mu      sync.Mutex
	waiters map[int]chan syscall.WaitStatus
}

var (
	reaperOnce sync.Once
	theReaper  *Reaper
)

// reaper returns the process-wide reaper, starting it on first use.
func reaper() *Reaper {
	reaperOnce.Do(func() {
		theReaper = &Reaper{waiters: map[int]chan syscall.WaitStatus{}}
		// When not PID 1 (tests, debugging), become a subreaper so orphans of our
		// commands are still re-parented to us and reaped here.
		if os.Getpid() != 1 {
			const prSetChildSubreaper = 36
			syscall.RawSyscall(syscall.SYS_PRCTL, prSetChildSubreaper, 1, 0)
		}
		sigs := make(chan os.Signal, 1)
		signal.Notify(sigs, syscall.SIGCHLD)
		go func() {
			for range sigs {
				theReaper.reap()
			}
		}()
	})
	return theReaper
}

func (r *Reaper) reap() {
	for {
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
		if err == syscall.EINTR {
			continue
		}
		if err != nil || pid <= 0 {
			return
		}
		// Taking the lock here waits out a concurrent Start that has forked this
		// pid but not registered it yet, so no exit can be lost.
		r.mu.Lock()
		if ch, ok := r.waiters[pid]; ok {
			ch <- ws // buffered, never blocks
			delete(r.waiters, pid)
		}
		r.mu.Unlock()
	}
}

// Start forks and execs a process and returns a channel that receives its
// exit status exactly once.
func (r *Reaper) Start(path string, argv []string, attr *syscall.ProcAttr) (int, <-chan syscall.WaitStatus, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	pid, err := syscall.ForkExec(path, argv, attr)
	if err != nil {
		return 0, nil, err
	}
	ch := make(chan syscall.WaitStatus, 1)
	r.waiters[pid] = ch
	return pid, ch, nil
}

// exitInfo is the protocol view of a wait status.
type exitInfo struct {
	Code     int
	Signal   string // "" when the process exited normally
	TimedOut bool
}

func exitFromStatus(ws syscall.WaitStatus) exitInfo {
	if ws.Signaled() {
		return exitInfo{Code: 128 + int(ws.Signal()), Signal: signalName(ws.Signal())}
	}
	return exitInfo{Code: ws.ExitStatus()}
}

var signalNames = map[syscall.Signal]string{
	syscall.SIGHUP: "SIGHUP", syscall.SIGINT: "SIGINT", syscall.SIGQUIT: "SIGQUIT",
	syscall.SIGILL: "SIGILL", syscall.SIGTRAP: "SIGTRAP", syscall.SIGABRT: "SIGABRT",
	syscall.SIGBUS: "SIGBUS", syscall.SIGFPE: "SIGFPE", syscall.SIGKILL: "SIGKILL",
	syscall.SIGUSR1: "SIGUSR1", syscall.SIGSEGV: "SIGSEGV", syscall.SIGUSR2: "SIGUSR2",
	syscall.SIGPIPE: "SIGPIPE", syscall.SIGALRM: "SIGALRM", syscall.SIGTERM: "SIGTERM",
	syscall.SIGSTKFLT: "SIGSTKFLT", syscall.SIGCHLD: "SIGCHLD", syscall.SIGCONT: "SIGCONT",
	syscall.SIGSTOP: "SIGSTOP", syscall.SIGTSTP: "SIGTSTP", syscall.SIGTTIN: "SIGTTIN",
	syscall.SIGTTOU: "SIGTTOU", syscall.SIGURG: "SIGURG", syscall.SIGXCPU: "SIGXCPU",
	syscall.SIGXFSZ: "SIGXFSZ", syscall.SIGVTALRM: "SIGVTALRM", syscall.SIGPROF: "SIGPROF",
	syscall.SIGWINCH: "SIGWINCH", syscall.SIGIO: "SIGIO", syscall.SIGPWR: "SIGPWR",
	syscall.SIGSYS: "SIGSYS",
}

func signalName(s syscall.Signal) string {
	if n, ok := signalNames[s]; ok {
		return n
	}
	return "SIG" + strconv.Itoa(int(s))
}

// parseSignal accepts "SIGTERM", "TERM", "term" or "15".
func parseSignal(s string) (syscall.Signal, error) {
	s = strings.TrimSpace(s)
	if n, err := strconv.Atoi(s); err == nil {
		if n > 0 && n < 65 {
			return syscall.Signal(n), nil
		}
		return 0, fmt.Errorf("signal number out of range: %d", n)
	}
	name := strings.ToUpper(s)
	if !strings.HasPrefix(name, "SIG") {
		name = "SIG" + name
	}
	for sig, n := range signalNames {
		if n == name {
			return sig, nil
		}
	}
	return 0, fmt.Errorf("unknown signal %q", s)
}
