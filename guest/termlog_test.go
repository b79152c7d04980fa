package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestTermLogIsKeptSmall(t *testing.T) {
	path := filepath.Join(t.TempDir(), "termination-log")
	if err := os.WriteFile(path, []byte("a short message"), 0o666); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var logged []string
	logf := func(f string, a ...any) { mu.Lock(); logged = append(logged, fmt.Sprintf(f, a...)); mu.Unlock() }
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { watchTermLog(path, 16<<10, 10*time.Millisecond, logf, stop); close(done) }()
	defer func() { close(stop); <-done }()

	time.Sleep(50 * time.Millisecond)
	if b, _ := os.ReadFile(path); string(b) != "a short message" {
		t.Fatalf("a message within the limit was touched: %q", b)
	}
	// a writer that keeps its descriptor: what it writes past the limit is cut each time
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for i := 0; i < 3; i++ {
		if _, err := f.Write(make([]byte, 64<<10)); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(2 * time.Second)
		for {
			st, _ := os.Stat(path)
			if st.Size() == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("not truncated: %d bytes", st.Size())
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(logged) < 3 || !strings.Contains(logged[0], "truncated") {
		t.Fatalf("logged: %q", logged)
	}
}

func TestTermLogWatchIsNothingWithoutTheFile(t *testing.T) {
	done := make(chan struct{})
	go func() {
		watchTermLog(filepath.Join(t.TempDir(), "none"), 1, time.Millisecond, t.Logf, nil)
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(time.Second):
		t.Fatal("watched a file that is not there")
	}
}
