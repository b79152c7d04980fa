package main

import (
	"sync"
	"unicode/utf8"
)

const (
	streamStdout = 0
	streamStderr = 1

	ringCap  = 4 << 20 // last 4 MiB per stream kept for reconnects
	maxMarks = 1 << 16 // bounds interleaving bookkeeping for chatty processes
	readMax  = 256 << 10
)

var streamNames = [2]string{"stdout", "stderr"}

// ring keeps the last ringCap bytes of a stream, addressed by absolute offset
// [start, end). It grows lazily so quiet commands cost little memory.
type ring struct {
	buf        []byte
	start, end int64
}

func (r *ring) write(p []byte) {
	if len(p) >= ringCap {
		r.end += int64(len(p) - ringCap)
		p = p[len(p)-ringCap:]
	}
	if r.end+int64(len(p)) <= ringCap { // still filling, no wrap yet
		r.buf = append(r.buf, p...)
		r.end += int64(len(p))
		return
	}
	if len(r.buf) < ringCap {
		r.buf = append(r.buf, make([]byte, ringCap-len(r.buf))...)
	}
	for len(p) > 0 {
		i := int(r.end % ringCap)
		n := copy(r.buf[i:], p)
		p = p[n:]
		r.end += int64(n)
	}
	if r.end-r.start > ringCap {
		r.start = r.end - ringCap
	}
}

// read copies [from, to) which must lie within [start, end].
func (r *ring) read(from, to int64) []byte {
	out := make([]byte, 0, to-from)
	for from < to {
		i := int(from % ringCap)
		n := min(int(to-from), len(r.buf)-i)
		out = append(out, r.buf[i:i+n]...)
		from += int64(n)
	}
	return out
}

// mark records where a run of output from one stream ended, so replays keep
// stdout/stderr interleaving.
type mark struct {
	stream int
	end    int64
}

// output is the buffered, fan-out-able output of one command. Followers never
// block the writer: they are woken via a 1-slot channel and pull from the ring
// at their own pace; a follower that falls more than 4 MiB behind sees a
// "dropped" event instead of stalling the process.
type output struct {
	mu        sync.Mutex
	rings     [2]ring
	marks     []mark
	markBase  int64 // absolute index of marks[0]
	closed    bool  // no more data will arrive
	followers map[chan struct{}]struct{}
}

func (o *output) append(stream int, p []byte) {
	o.mu.Lock()
	if o.closed {
		o.mu.Unlock()
		return
	}
	o.rings[stream].write(p)
	end := o.rings[stream].end
	if n := len(o.marks); n > 0 && o.marks[n-1].stream == stream {
		o.marks[n-1].end = end
	} else {
		o.marks = append(o.marks, mark{stream, end})
	}
	// Forget marks whose data has fallen out of the ring, or the oldest ones if
	// there are too many (only costs interleaving precision of old output).
	for len(o.marks) > 1 && (len(o.marks) > maxMarks || o.marks[0].end <= o.rings[o.marks[0].stream].start) {
		o.marks = o.marks[1:]
		o.markBase++
	}
	o.wakeLocked()
	o.mu.Unlock()
}

// close marks the output complete and wakes followers so they see the end.
func (o *output) close() {
	o.mu.Lock()
	o.closed = true
	o.wakeLocked()
	o.mu.Unlock()
}

func (o *output) wakeLocked() {
	for ch := range o.followers {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

func (o *output) follow() chan struct{} {
	ch := make(chan struct{}, 1)
	o.mu.Lock()
	if o.followers == nil {
		o.followers = map[chan struct{}]struct{}{}
	}
	o.followers[ch] = struct{}{}
	o.mu.Unlock()
	return ch
}

func (o *output) unfollow(ch chan struct{}) {
	o.mu.Lock()
	delete(o.followers, ch)
	o.mu.Unlock()
}

// cursor is one follower's read position.
type cursor struct {
	pos     [2]int64
	mark    int64
	pending [2][]byte // incomplete UTF-8 sequence held back until more bytes arrive
}

type chunk struct {
	stream int
	data   []byte
}

// readFrom returns output after cur (at most about readMax bytes), how many
// bytes were lost to the ring since cur, and whether cur has reached the end of
// a closed output.
func (o *output) readFrom(cur *cursor) (chunks []chunk, dropped int64, done bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if cur.mark < o.markBase {
		cur.mark = o.markBase
	}
	budget := int64(readMax)
	for budget > 0 && cur.mark < o.markBase+int64(len(o.marks)) {
		m := o.marks[cur.mark-o.markBase]
		r := &o.rings[m.stream]
		from := cur.pos[m.stream]
		if from < r.start {
			dropped += r.start - from
			from = r.start
		}
		to := min(m.end, from+budget)
		if to > from {
			chunks = append(chunks, chunk{m.stream, r.read(from, to)})
			budget -= to - from
		}
		cur.pos[m.stream] = max(from, to)
		if to < m.end {
			break // out of budget
		}
		// The last mark may still grow; stay on it.
		if cur.mark == o.markBase+int64(len(o.marks))-1 {
			break
		}
		cur.mark++
	}
	done = o.closed && cur.pos[0] >= o.rings[0].end && cur.pos[1] >= o.rings[1].end
	return chunks, dropped, done
}

// text turns a chunk into valid UTF-8 text, holding back a multi-byte
// character split across reads (flush=true emits whatever is left).
func (cur *cursor) text(stream int, data []byte, flush bool) string {
	b := append(cur.pending[stream], data...)
	cur.pending[stream] = nil
	if !flush {
		for i := len(b) - 1; i >= 0 && i >= len(b)-utf8.UTFMax; i-- {
			if utf8.RuneStart(b[i]) {
				if !utf8.FullRune(b[i:]) {
					cur.pending[stream] = append([]byte(nil), b[i:]...)
					b = b[:i]
				}
				break
			}
		}
	}
	return string(b) // encoding/json turns invalid bytes into U+FFFD
}
