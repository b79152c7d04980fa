package main

import (
	"fmt"
	"sync"
	"time"
)

const maxLogLines = 1000

type logLine struct {
	TS      string `json:"ts"`
	Source  string `json:"source"`
	Message string `json:"message"`
}

// logRing keeps envd's last maxLogLines lines for GET /logs.
type logRing struct {
	mu    sync.Mutex
	lines []logLine // circular once full
	next  int
}

func (l *logRing) add(format string, args ...any) {
	line := logLine{
		TS:      time.Now().UTC().Format(time.RFC3339Nano),
		Source:  "envd",
		Message: fmt.Sprintf(format, args...),
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.lines) < maxLogLines {
		l.lines = append(l.lines, line)
		return
	}
	l.lines[l.next] = line
	l.next = (l.next + 1) % maxLogLines
}

// snapshot returns the lines oldest first.
func (l *logRing) snapshot() []logLine {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]logLine, 0, len(l.lines))
	out = append(out, l.lines[l.next:]...)
	return append(out, l.lines[:l.next]...)
}

// shortCmd trims a command line for log lines.
func shortCmd(s string) string {
	const max = 80
	r := []rune(s)
	if len(r) > max {
		return string(r[:max]) + "…"
	}
	return s
}
