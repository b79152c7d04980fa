package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestEchoAndExitCode(t *testing.T) {
	ts := startServer(t, "")
	r := ts.run(map[string]any{"cmd": "echo hi; exit 3"})
	if r.stdout != "hi\n" || exitCode(t, r.exit) != 3 || r.exit.Signal != nil || r.exit.TimedOut {
		t.Fatalf("got %+v", r)
	}
	if r.events[0].Pid <= 0 {
		t.Fatalf("start without pid: %+v", r.events[0])
	}
}

func TestStdoutStderrSeparated(t *testing.T) {
	ts := startServer(t, "")
	r := ts.run(map[string]any{"cmd": "echo out; echo err >&2; echo out2"})
	if r.stdout != "out\nout2\n" || r.stderr != "err\n" || exitCode(t, r.exit) != 0 {
		t.Fatalf("stdout %q stderr %q", r.stdout, r.stderr)
	}
}

func TestArgvEnvCwdAndTokenHidden(t *testing.T) {
	ts := startServer(t, "")
	ts.srv.cfg.BaseEnv = append(ts.srv.cfg.BaseEnv, tokenEnv+"=secret")
	dir := t.TempDir()
	expect(t, ts.json("POST", "/init", map[string]any{"env": map[string]string{"FROM_INIT": "i", "B": "init"}}), 204, nil)
	r := ts.run(map[string]any{
		"argv": []string{"sh", "-c", `printf '%s|%s|%s|%s|%s|%s' "$PWD" "$FOO" "$FROM_INIT" "$B" "$LANG" "${E2A_ENVD_TOKEN-unset}"`},
		"env":  map[string]string{"FOO": "bar", "B": "request"},
		"cwd":  dir,
	})
	want := dir + "|bar|i|request|C.UTF-8|unset"
	if r.stdout != want {
		t.Fatalf("got %q want %q", r.stdout, want)
	}
}

func TestStartErrors(t *testing.T) {
	ts := startServer(t, "")
	expectError(t, ts.json("POST", "/commands", map[string]any{}), 400, "invalid_command")
	expectError(t, ts.json("POST", "/commands", map[string]any{"cmd": "x", "argv": []string{"x"}}), 400, "invalid_command")
	expectError(t, ts.json("POST", "/commands", map[string]any{"cmd": "true", "cwd": "/nonexistent-dir"}), 400, "invalid_cwd")
	expectError(t, ts.json("POST", "/commands", map[string]any{"cmd": "true", "user": "no-such-user-xyz"}), 400, "invalid_user")
	expectError(t, ts.json("POST", "/commands", map[string]any{"argv": []string{"no-such-binary-xyz"}}), 400, "executable_not_found")
	expectError(t, ts.do("POST", "/commands", strings.NewReader("{bad")), 400, "invalid_json")
	expectError(t, ts.json("GET", "/commands/999999999", nil), 404, "command_not_found")
	expectError(t, ts.json("GET", "/nope", nil), 404, "not_found")
}

func TestStdinField(t *testing.T) {
	ts := startServer(t, "")
	r := ts.run(map[string]any{"argv": []string{"cat"}, "stdin": "hello\nworld"})
	if r.stdout != "hello\nworld" || exitCode(t, r.exit) != 0 {
		t.Fatalf("got %+v", r)
	}
}

func TestTimeoutKillsProcessGroup(t *testing.T) {
	ts := startServer(t, "")
	start := time.Now()
	// The grandchild shares the process group, so it must die too (or the
	// stream would be held open by its stdout).
	r := ts.run(map[string]any{"cmd": "sleep 30 & sleep 30", "timeout": 0.5})
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("took %v", d)
	}
	if exitCode(t, r.exit) != 137 || r.exit.Signal == nil || *r.exit.Signal != "SIGKILL" || !r.exit.TimedOut {
		t.Fatalf("exit %+v", r.exit)
	}
}

func TestBackgroundAndReconnect(t *testing.T) {
	ts := startServer(t, "")
	pid := ts.background(map[string]any{"cmd": "echo one; echo e1 >&2; sleep 0.4; echo two; exit 5"})

	var list struct {
		Commands []struct {
			Pid        int
			Cmd        string
			Background bool
			StartedAt  string `json:"started_at"`
		}
	}
	expect(t, ts.json("GET", "/commands", nil), 200, &list)
	found := false
	for _, c := range list.Commands {
		if c.Pid == pid && c.Background && strings.Contains(c.Cmd, "echo one") && c.StartedAt != "" {
			found = true
		}
	}
	if !found {
		t.Fatalf("pid %d not in %+v", pid, list)
	}

	// Attach while running, then again after it ended: both replay from the start.
	for i := 0; i < 2; i++ {
		r := readEvents(t, ts.json("GET", fmt.Sprintf("/commands/%d", pid), nil))
		if r.events[0].Pid != pid || r.stdout != "one\ntwo\n" || r.stderr != "e1\n" || exitCode(t, r.exit) != 5 {
			t.Fatalf("attach %d: %+v", i, r)
		}
	}
	expect(t, ts.json("GET", "/commands", nil), 200, &list)
	for _, c := range list.Commands {
		if c.Pid == pid {
			t.Fatalf("ended command still listed as running")
		}
	}
}

func TestReplayReportsDroppedOutput(t *testing.T) {
	ts := startServer(t, "")
	const total = 5_000_000
	pid := ts.background(map[string]any{"cmd": fmt.Sprintf("head -c %d /dev/zero | tr '\\0' a", total)})
	r := readEvents(t, ts.json("GET", fmt.Sprintf("/commands/%d", pid), nil))
	// Attaching raced with the output, so some may have been dropped first.
	var dropped int64
	for _, ev := range r.events {
		if ev.Type == "dropped" {
			dropped += ev.Bytes
		}
	}
	if int64(len(r.stdout))+dropped != total || strings.Trim(r.stdout, "a") != "" {
		t.Fatalf("got %d bytes + %d dropped", len(r.stdout), dropped)
	}
	// After the end, exactly the last 4 MiB are replayed, "dropped" first.
	r = readEvents(t, ts.json("GET", fmt.Sprintf("/commands/%d", pid), nil))
	if r.events[1].Type != "dropped" || r.events[1].Bytes != total-ringCap || len(r.stdout) != ringCap {
		t.Fatalf("replay: %+v, %d bytes", r.events[1], len(r.stdout))
	}
}

func TestSignal(t *testing.T) {
	ts := startServer(t, "")
	pid := ts.background(map[string]any{"argv": []string{"sleep", "30"}})
	expectError(t, ts.json("POST", fmt.Sprintf("/commands/%d/signal", pid), map[string]any{"signal": "SIGNOPE"}), 400, "invalid_signal")
	expect(t, ts.json("POST", fmt.Sprintf("/commands/%d/signal", pid), map[string]any{"signal": "TERM"}), 204, nil)
	r := readEvents(t, ts.json("GET", fmt.Sprintf("/commands/%d", pid), nil))
	if exitCode(t, r.exit) != 143 || r.exit.Signal == nil || *r.exit.Signal != "SIGTERM" || r.exit.TimedOut {
		t.Fatalf("exit %+v", r.exit)
	}
	expectError(t, ts.json("POST", fmt.Sprintf("/commands/%d/signal", pid), map[string]any{"signal": 9}), 409, "command_exited")
}

func TestStdinEndpoint(t *testing.T) {
	ts := startServer(t, "")
	pid := ts.background(map[string]any{"argv": []string{"cat"}, "stdin": "first ", "keep_stdin": true})
	path := fmt.Sprintf("/commands/%d/stdin", pid)
	expect(t, ts.json("POST", path, map[string]any{"data": "second"}), 204, nil)
	expect(t, ts.json("POST", path, map[string]any{"data": " third", "eof": true}), 204, nil)
	r := readEvents(t, ts.json("GET", fmt.Sprintf("/commands/%d", pid), nil))
	if r.stdout != "first second third" || exitCode(t, r.exit) != 0 {
		t.Fatalf("got %+v", r)
	}
	expectError(t, ts.json("POST", path, map[string]any{"data": "late"}), 409, "command_exited")

	// Without keep_stdin, stdin is closed once the initial data is written.
	pid = ts.background(map[string]any{"cmd": "sleep 1; cat", "stdin": "x"})
	expectError(t, ts.json("POST", fmt.Sprintf("/commands/%d/stdin", pid), map[string]any{"data": "y"}), 409, "stdin_closed")
}

func TestForegroundSurvivesClientDisconnect(t *testing.T) {
	ts := startServer(t, "")
	f := t.TempDir() + "/done"
	resp := ts.json("POST", "/commands", map[string]any{"cmd": "sleep 0.3; echo ok > " + f})
	resp.Body.Close() // hang up right away
	waitFor(t, "command to finish", func() bool {
		b, _ := os.ReadFile(f)
		return string(b) == "ok\n"
	})
}

func TestOrphansAreReaped(t *testing.T) {
	ts := startServer(t, "")
	r := ts.run(map[string]any{"cmd": "sleep 0.2 >/dev/null 2>&1 & echo $!"})
	orphan, err := strconv.Atoi(strings.TrimSpace(r.stdout))
	if err != nil {
		t.Fatal(r.stdout)
	}
	waitFor(t, "orphan to be reaped", func() bool {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", orphan))
		return err != nil || !strings.Contains(string(b), ") Z ") && !strings.Contains(string(b), "sleep")
	})
}

func TestLogs(t *testing.T) {
	ts := startServer(t, "")
	ts.run(map[string]any{"cmd": "exit 4"})
	var out struct {
		Lines []logLine
	}
	expect(t, ts.json("GET", "/logs", nil), 200, &out)
	var started, exited bool
	for _, l := range out.Lines {
		if _, err := time.Parse(time.RFC3339, l.TS); err != nil || l.Source != "envd" {
			t.Fatalf("bad line %+v", l)
		}
		started = started || strings.Contains(l.Message, "command started") && strings.Contains(l.Message, "exit 4")
		exited = exited || strings.Contains(l.Message, "exit_code=4")
	}
	if !started || !exited {
		t.Fatalf("lines %+v", out.Lines)
	}
}

func TestUTF8SplitAcrossReads(t *testing.T) {
	var cur cursor
	b := []byte("é€")
	got := cur.text(0, b[:1], false) + cur.text(0, b[1:3], false) + cur.text(0, b[3:], false)
	if got != "é€" {
		t.Fatalf("got %q", got)
	}
	if got := cur.text(0, []byte{0xff, 'a'}, true); got != "\xffa" { // json turns 0xff into U+FFFD
		t.Fatalf("got %q", got)
	}
}

func TestRingKeepsTail(t *testing.T) {
	var r ring
	chunk := make([]byte, 1<<20)
	for i := 0; i < 6; i++ {
		for j := range chunk {
			chunk[j] = byte(i)
		}
		r.write(chunk)
	}
	if r.start != 2<<20 || r.end != 6<<20 {
		t.Fatalf("start %d end %d", r.start, r.end)
	}
	got := r.read(r.start, r.end)
	for i, b := range got {
		if int(b) != 2+i/(1<<20) {
			t.Fatalf("byte %d = %d", i, b)
		}
	}
}

// Output still in a pipe when the command exits is waited for (readers starved by
// a busy sandbox dropped it after a fixed 200 ms); empty pipes held open by a
// grandchild end the wait after drainQuiet; nothing waits past drainCap.
func TestWaitDrainedWaitsForPendingOutputOnly(t *testing.T) {
	start := time.Now()
	waitDrained(make(chan struct{}), func() bool { return time.Since(start) < 600*time.Millisecond })
	if d := time.Since(start); d < 600*time.Millisecond+drainQuiet-50*time.Millisecond || d > 2*time.Second {
		t.Fatalf("pending output for 600 ms: waited %v", d)
	}
	start = time.Now()
	waitDrained(make(chan struct{}), func() bool { return false })
	if d := time.Since(start); d < drainQuiet-50*time.Millisecond || d > drainQuiet+300*time.Millisecond {
		t.Fatalf("empty pipes: waited %v, want about %v", d, drainQuiet)
	}
	start = time.Now()
	waitDrained(make(chan struct{}), func() bool { return true })
	if d := time.Since(start); d < drainCap-100*time.Millisecond || d > drainCap+time.Second {
		t.Fatalf("output that never ends: waited %v, want %v", d, drainCap)
	}
	done := make(chan struct{})
	close(done)
	start = time.Now()
	waitDrained(done, func() bool { return true })
	if d := time.Since(start); d > 100*time.Millisecond {
		t.Fatalf("drained: waited %v", d)
	}
}

// unread sees bytes in a pipe that nobody has read yet.
func TestUnreadSeesBytesLeftInAPipe(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	if unread([]*os.File{r}) {
		t.Fatal("an empty pipe has unread bytes")
	}
	w.Write([]byte("alive\n"))
	if !unread([]*os.File{r}) {
		t.Fatal("a pipe holding 6 bytes has none unread")
	}
}
