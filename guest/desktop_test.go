package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jezek/xgb"
	"github.com/jezek/xgb/xproto"
)

// ---- a real X server ----

type xvfb struct {
	t       testing.TB
	num     int
	display string
	cmd     *exec.Cmd
}

// startXvfb runs `Xvfb :N -screen 0 1280x800x24 -nolisten tcp` on a free display N.
func startXvfb(t testing.TB) *xvfb {
	t.Helper()
	if _, err := exec.LookPath("Xvfb"); err != nil {
		t.Skip("Xvfb is not installed")
	}
	v := &xvfb{t: t}
	start := 40 + rand.IntN(400)
	for n := start; n < start+200; n++ {
		if _, err := os.Stat(fmt.Sprintf("/tmp/.X%d-lock", n)); err == nil {
			continue
		}
		if _, err := os.Stat(fmt.Sprintf("/tmp/.X11-unix/X%d", n)); err == nil {
			continue
		}
		v.num, v.display = n, fmt.Sprintf(":%d", n)
		break
	}
	if v.display == "" {
		t.Fatal("no free X display number")
	}
	v.start()
	t.Cleanup(v.stop)
	return v
}

func (v *xvfb) start() {
	v.t.Helper()
	cmd := exec.Command("Xvfb", v.display, "-screen", "0", "1280x800x24", "-nolisten", "tcp", "-noreset")
	cmd.Stdout, cmd.Stderr = io.Discard, io.Discard
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		v.t.Fatal(err)
	}
	v.cmd = cmd
	deadline := time.Now().Add(15 * time.Second)
	for {
		c, err := net.Dial("unix", fmt.Sprintf("/tmp/.X11-unix/X%d", v.num))
		if err == nil {
			c.Close()
			// The socket accepts before the server is ready; a full handshake proves it.
			if xc, err := xgb.NewConnDisplay(v.display); err == nil {
				xc.Close()
				return
			}
		}
		if time.Now().After(deadline) {
			v.t.Fatalf("Xvfb %s did not start", v.display)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (v *xvfb) stop() {
	if v.cmd == nil {
		return
	}
	v.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { v.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		v.cmd.Process.Kill()
		<-done
	}
	v.cmd = nil
	os.Remove(fmt.Sprintf("/tmp/.X%d-lock", v.num))
	os.Remove(fmt.Sprintf("/tmp/.X11-unix/X%d", v.num))
}

// ---- envd with a desktop ----

type deskServer struct {
	t    *testing.T
	base string
	srv  *Server
}

func startDesktopServer(t *testing.T, display string) *deskServer {
	t.Helper()
	srv := NewServer(Config{Insecure: true, Display: display})
	hs := httptest.NewServer(srv.Handler())
	t.Cleanup(hs.Close)
	t.Cleanup(func() {
		if srv.desk != nil {
			srv.desk.mu.Lock()
			if srv.desk.x != nil {
				srv.desk.x.close()
			}
			srv.desk.mu.Unlock()
		}
	})
	return &deskServer{t: t, base: hs.URL, srv: srv}
}

func (ds *deskServer) get(path string) (int, []byte) {
	ds.t.Helper()
	resp, err := http.Get(ds.base + path)
	if err != nil {
		ds.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

// actions posts {"actions": acts} and decodes the answer.
func (ds *deskServer) actions(acts ...map[string]any) (int, map[string]any) {
	ds.t.Helper()
	body, _ := json.Marshal(map[string]any{"actions": acts})
	return ds.postRaw(string(body))
}

func (ds *deskServer) postRaw(body string) (int, map[string]any) {
	ds.t.Helper()
	resp, err := http.Post(ds.base+"/desktop/actions", "application/json", strings.NewReader(body))
	if err != nil {
		ds.t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		ds.t.Fatalf("answer is not JSON: %v", err)
	}
	return resp.StatusCode, out
}

func (ds *deskServer) mustActions(acts ...map[string]any) []any {
	ds.t.Helper()
	st, out := ds.actions(acts...)
	if st != 200 {
		ds.t.Fatalf("actions %v: %d %v", acts, st, out)
	}
	return out["results"].([]any)
}

func act(kind string, kv ...any) map[string]any {
	m := map[string]any{"action": kind}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i].(string)] = kv[i+1]
	}
	return m
}

// ---- a test X client: one window that records the keys and buttons it gets ----

type keyEvent struct {
	sym   xproto.Keysym
	r     rune
	state uint16
}

type buttonEvent struct {
	button byte
	x, y   int
	state  uint16
}

type testWindow struct {
	t   *testing.T
	c   *xgb.Conn
	win xproto.Window

	mu      sync.Mutex
	keys    []keyEvent
	buttons []buttonEvent
	mapped  chan struct{}

	// The keyboard map as an Xlib client keeps it: fetched when needed after a MappingNotify.
	kmDirty bool
	km      *xproto.GetKeyboardMappingReply
}

const testBackground = 0x3366cc // window background (RGB)

func newTestWindow(t *testing.T, display, title string, x, y, w, h int, focus bool) *testWindow {
	t.Helper()
	c, err := xgb.NewConnDisplay(display)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	setup := xproto.Setup(c)
	scr := setup.Roots[0]
	win, err := xproto.NewWindowId(c)
	if err != nil {
		t.Fatal(err)
	}
	mask := uint32(xproto.EventMaskKeyPress | xproto.EventMaskButtonPress | xproto.EventMaskStructureNotify)
	err = xproto.CreateWindowChecked(c, scr.RootDepth, win, scr.Root, int16(x), int16(y), uint16(w), uint16(h), 0,
		xproto.WindowClassInputOutput, scr.RootVisual, xproto.CwBackPixel|xproto.CwEventMask,
		[]uint32{testBackground, mask}).Check()
	if err != nil {
		t.Fatal(err)
	}
	intern := func(name string) xproto.Atom {
		r, err := xproto.InternAtom(c, false, uint16(len(name)), name).Reply()
		if err != nil {
			t.Fatal(err)
		}
		return r.Atom
	}
	utf8Str := intern("UTF8_STRING")
	// WM_NAME as Latin-1 (ASCII here), _NET_WM_NAME as UTF-8 with a non-Latin-1 character.
	ascii := strings.Map(func(r rune) rune {
		if r < 0x80 {
			return r
		}
		return '?'
	}, title)
	xproto.ChangeProperty(c, xproto.PropModeReplace, win, xproto.AtomWmName, xproto.AtomString, 8, uint32(len(ascii)), []byte(ascii))
	xproto.ChangeProperty(c, xproto.PropModeReplace, win, intern("_NET_WM_NAME"), utf8Str, 8, uint32(len(title)), []byte(title))
	class := "e2atest\x00E2aTest\x00"
	xproto.ChangeProperty(c, xproto.PropModeReplace, win, xproto.AtomWmClass, xproto.AtomString, 8, uint32(len(class)), []byte(class))
	tw := &testWindow{t: t, c: c, win: win, mapped: make(chan struct{})}
	go tw.loop()
	xproto.MapWindow(c, win)
	select {
	case <-tw.mapped:
	case <-time.After(10 * time.Second):
		t.Fatal("test window was not mapped")
	}
	if focus {
		if err := xproto.SetInputFocusChecked(c, xproto.InputFocusPointerRoot, win, xproto.TimeCurrentTime).Check(); err != nil {
			t.Fatal(err)
		}
	}
	return tw
}

func (tw *testWindow) loop() {
	once := sync.Once{}
	for {
		ev, err := tw.c.WaitForEvent()
		if ev == nil && err == nil {
			return
		}
		switch e := ev.(type) {
		case xproto.MapNotifyEvent:
			once.Do(func() { close(tw.mapped) })
		case xproto.MappingNotifyEvent:
			tw.mu.Lock()
			tw.kmDirty = true
			tw.mu.Unlock()
		case xproto.KeyPressEvent:
			sym := tw.lookup(e.Detail, e.State)
			tw.mu.Lock()
			tw.keys = append(tw.keys, keyEvent{sym: sym, r: keysymToRune(sym), state: e.State})
			tw.mu.Unlock()
		case xproto.ButtonPressEvent:
			tw.mu.Lock()
			tw.buttons = append(tw.buttons, buttonEvent{button: byte(e.Detail), x: int(e.EventX), y: int(e.EventY), state: e.State})
			tw.mu.Unlock()
		}
	}
}

// lookup is XLookupKeysym: the keycode's keysym at the level Shift selects.
func (tw *testWindow) lookup(kc xproto.Keycode, state uint16) xproto.Keysym {
	tw.mu.Lock()
	dirty := tw.kmDirty || tw.km == nil
	tw.kmDirty = false
	tw.mu.Unlock()
	setup := xproto.Setup(tw.c)
	if dirty {
		km, err := xproto.GetKeyboardMapping(tw.c, setup.MinKeycode, byte(int(setup.MaxKeycode)-int(setup.MinKeycode)+1)).Reply()
		if err != nil {
			return 0
		}
		tw.km = km
	}
	per := int(tw.km.KeysymsPerKeycode)
	syms := tw.km.Keysyms[(int(kc)-int(setup.MinKeycode))*per:][:per]
	shift := state&xproto.KeyButMaskShift != 0
	if syms[0] >= 'a' && syms[0] <= 'z' && state&xproto.KeyButMaskLock != 0 {
		shift = !shift // Caps Lock (XKB's ALPHABETIC type)
	}
	if shift && per > 1 && syms[1] != 0 {
		return syms[1]
	}
	if shift && syms[0] >= 'a' && syms[0] <= 'z' {
		return syms[0] - 'a' + 'A'
	}
	return syms[0]
}

func (tw *testWindow) reset() {
	tw.mu.Lock()
	tw.keys, tw.buttons = nil, nil
	tw.mu.Unlock()
}

// waitKeys waits until n key presses of keys other than modifiers arrived (then a little
// longer, so that more than n would show).
func (tw *testWindow) waitKeys(n int) []keyEvent {
	tw.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		tw.mu.Lock()
		k := append([]keyEvent(nil), tw.keys...)
		tw.mu.Unlock()
		m := 0
		for _, e := range k {
			if !isModifierKeysym(e.sym) {
				m++
			}
		}
		if n == 0 && len(k) > 0 || n > 0 && m >= n {
			time.Sleep(20 * time.Millisecond)
			tw.mu.Lock()
			k = append([]keyEvent(nil), tw.keys...)
			tw.mu.Unlock()
			return k
		}
		if time.Now().After(deadline) {
			return k
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (tw *testWindow) waitButtons(n int) []buttonEvent {
	tw.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		tw.mu.Lock()
		b := append([]buttonEvent(nil), tw.buttons...)
		tw.mu.Unlock()
		if len(b) >= n || time.Now().After(deadline) {
			return b
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func typed(keys []keyEvent) string {
	var sb strings.Builder
	for _, k := range keys {
		switch {
		case isModifierKeysym(k.sym):
		case k.sym == ksReturn:
			sb.WriteRune('\n')
		case k.sym == ksTab:
			sb.WriteRune('\t')
		case k.r >= 0:
			sb.WriteRune(k.r)
		default:
			fmt.Fprintf(&sb, "<%#x>", k.sym)
		}
	}
	return sb.String()
}

// ---- tests ----

func TestDesktopNoDisplay(t *testing.T) {
	ds := startDesktopServer(t, "")
	for _, p := range []string{"/desktop/screenshot", "/desktop/windows", "/desktop/cursor", "/desktop/nope", "/desktop"} {
		st, b := ds.get(p)
		if st != 404 || !strings.Contains(string(b), `"no_desktop"`) {
			t.Errorf("GET %s: %d %s", p, st, b)
		}
	}
	st, out := ds.actions(act("cursor_position"))
	if st != 404 || out["error"].(map[string]any)["code"] != "no_desktop" {
		t.Errorf("POST actions: %d %v", st, out)
	}
}

func TestDesktopNotStarted(t *testing.T) {
	// A display nobody serves: the desktop is still starting.
	n := 900 + rand.IntN(90)
	ds := startDesktopServer(t, fmt.Sprintf(":%d", n))
	st, b := ds.get("/desktop/cursor")
	if st != 503 || !strings.Contains(string(b), `"desktop_starting"`) {
		t.Errorf("cursor: %d %s", st, b)
	}
	// Validation still comes first.
	st, out := ds.actions(act("fly"))
	if st != 400 {
		t.Errorf("bad action without X: %d %v", st, out)
	}
	st, out = ds.actions(act("mouse_move", "coordinate", []int{1, 1}))
	if st != 503 {
		t.Errorf("action without X: %d %v", st, out)
	}
}

func TestDesktopScreenshot(t *testing.T) {
	v := startXvfb(t)
	tw := newTestWindow(t, v.display, "shot", 100, 100, 400, 300, false)
	_ = tw
	ds := startDesktopServer(t, v.display)

	decode := func(b []byte) image.Image {
		t.Helper()
		img, err := png.Decode(bytes.NewReader(b))
		if err != nil {
			t.Fatalf("not a PNG: %v", err)
		}
		return img
	}
	wantRGB := func(img image.Image, x, y int) {
		t.Helper()
		r, g, b, a := img.At(x, y).RGBA()
		want := [3]uint32{testBackground >> 16 & 0xff, testBackground >> 8 & 0xff, testBackground & 0xff}
		got := [3]uint32{r >> 8, g >> 8, b >> 8}
		if got != want || a != 0xffff {
			t.Errorf("pixel (%d,%d) = %v alpha %d, want %v", x, y, got, a>>8, want)
		}
	}

	st, b := ds.get("/desktop/screenshot")
	if st != 200 {
		t.Fatalf("screenshot: %d %s", st, b)
	}
	img := decode(b)
	if img.Bounds().Dx() != 1280 || img.Bounds().Dy() != 800 {
		t.Fatalf("size %v", img.Bounds())
	}
	wantRGB(img, 300, 250)

	st, b = ds.get("/desktop/screenshot?width=640")
	if st != 200 {
		t.Fatalf("scaled: %d %s", st, b)
	}
	img = decode(b)
	if img.Bounds().Dx() != 640 || img.Bounds().Dy() != 400 {
		t.Fatalf("scaled size %v", img.Bounds())
	}
	wantRGB(img, 150, 125)

	st, b = ds.get("/desktop/screenshot?width=1000")
	if img = decode(b); st != 200 || img.Bounds().Dx() != 1000 || img.Bounds().Dy() != 625 {
		t.Fatalf("width=1000: %d %v", st, img.Bounds())
	}

	for _, q := range []string{"0", "-5", "abc", "1281"} {
		st, b := ds.get("/desktop/screenshot?width=" + q)
		if st != 400 || !strings.Contains(string(b), `"invalid_width"`) {
			t.Errorf("width=%s: %d %s", q, st, b)
		}
	}

	// The pointer is in the picture (X leaves it out of GetImage; XFIXES gives its image).
	ds.mustActions(act("mouse_move", "coordinate", []int{300, 250}))
	_, b = ds.get("/desktop/screenshot")
	img = decode(b)
	changed := 0
	for y := 250; y < 266; y++ {
		for x := 284; x < 316; x++ {
			r, g, bl, _ := img.At(x, y).RGBA()
			if [3]uint32{r >> 8, g >> 8, bl >> 8} != [3]uint32{testBackground >> 16 & 0xff, testBackground >> 8 & 0xff, testBackground & 0xff} {
				changed++
			}
		}
	}
	if changed < 10 {
		t.Errorf("no pointer drawn at (300, 250): %d pixels differ from the window", changed)
	}
	ds.mustActions(act("mouse_move", "coordinate", []int{1270, 790}))

	// As an action, base64 in the result.
	res := ds.mustActions(act("screenshot"), act("screenshot", "width", 320))
	for i, want := range []image.Point{{1280, 800}, {320, 200}} {
		r := res[i].(map[string]any)
		if r["type"] != "image" || r["media_type"] != "image/png" {
			t.Fatalf("result %v", r)
		}
		data, err := base64.StdEncoding.DecodeString(r["data"].(string))
		if err != nil {
			t.Fatal(err)
		}
		if got := decode(data).Bounds().Size(); got != want {
			t.Errorf("action screenshot %d: %v, want %v", i, got, want)
		}
	}

	// Timing (the budget is 50 ms for 1280×800 on the host).
	const n = 10
	start := time.Now()
	for i := 0; i < n; i++ {
		if st, _ := ds.get("/desktop/screenshot"); st != 200 {
			t.Fatal(st)
		}
	}
	t.Logf("GET /desktop/screenshot 1280×800: %.1f ms each (through HTTP)", float64(time.Since(start).Microseconds())/1000/n)
}

func TestDesktopInput(t *testing.T) {
	v := startXvfb(t)
	tw := newTestWindow(t, v.display, "input", 100, 100, 400, 300, true)
	ds := startDesktopServer(t, v.display)

	// mouse_move, then cursor_position, and GET /desktop/cursor.
	res := ds.mustActions(act("mouse_move", "coordinate", []int{640, 400}), act("cursor_position"))
	if c := res[1].(map[string]any); c["x"] != 640.0 || c["y"] != 400.0 {
		t.Errorf("cursor_position %v", c)
	}
	if len(res[0].(map[string]any)) != 0 {
		t.Errorf("mouse_move result %v, want {}", res[0])
	}
	if st, b := ds.get("/desktop/cursor"); st != 200 || string(bytes.TrimSpace(b)) != `{"x":640,"y":400}` {
		t.Errorf("GET cursor: %d %s", st, b)
	}

	// Clicks reach the window, at the right place, with modifiers.
	ds.mustActions(
		act("left_click", "coordinate", []int{200, 150}),
		act("right_click", "coordinate", []int{210, 160}),
		act("middle_click"),
		act("left_click", "coordinate", []int{150, 120}, "text", "ctrl+shift"),
		act("double_click", "coordinate", []int{300, 300}),
		act("scroll", "coordinate", []int{250, 250}, "scroll_direction", "down", "scroll_amount", 3),
		act("scroll", "scroll_direction", "left", "scroll_amount", 1, "text", "shift"),
	)
	bs := tw.waitButtons(10)
	want := []buttonEvent{
		{1, 100, 50, 0}, {3, 110, 60, 0}, {2, 110, 60, 0},
		{1, 50, 20, xproto.KeyButMaskShift | xproto.KeyButMaskControl},
		{1, 200, 200, 0}, {1, 200, 200, 0},
		{5, 150, 150, 0}, {5, 150, 150, 0}, {5, 150, 150, 0},
		{6, 150, 150, xproto.KeyButMaskShift},
	}
	if fmt.Sprint(bs) != fmt.Sprint(want) {
		t.Errorf("buttons:\n got %v\nwant %v", bs, want)
	}

	// Drag: press at the start, release at the end.
	tw.reset()
	ds.mustActions(act("left_click_drag", "start_coordinate", []int{120, 120}, "coordinate", []int{400, 350}),
		act("cursor_position"))
	if bs := tw.waitButtons(1); len(bs) != 1 || bs[0].x != 20 || bs[0].y != 20 {
		t.Errorf("drag press %v", bs)
	}
	res = ds.mustActions(act("left_mouse_down", "coordinate", []int{130, 130}), act("left_mouse_up", "coordinate", []int{140, 140}), act("cursor_position"))
	if c := res[2].(map[string]any); c["x"] != 140.0 || c["y"] != 140.0 {
		t.Errorf("after mouse up: %v", c)
	}

	// Typing: ASCII with Shift, Latin-1 and beyond through spare keycodes, Return and Tab.
	tw.reset()
	text := "Héllo wörld ✓ 日本"
	start := time.Now()
	ds.mustActions(act("type", "text", text))
	t.Logf("type %q (%d chars): %v", text, len([]rune(text)), time.Since(start))
	if got := typed(tw.waitKeys(len([]rune(text)))); got != text {
		t.Errorf("typed %q, want %q", got, text)
	}

	tw.reset()
	text = "A-Z a_z 0)9( ~`!@#$%^&*+={}[]|\\:;\"'<>,.?/\nTab\there €£¥ Ωλ ß ç\r\nend"
	ds.mustActions(act("type", "text", text))
	wantText := strings.ReplaceAll(text, "\r\n", "\n")
	if got := typed(tw.waitKeys(len([]rune(wantText)))); got != wantText {
		t.Errorf("typed %q, want %q", got, wantText)
	}

	// 20 ASCII characters: the product wants this well under 300 ms.
	tw.reset()
	text = "The quick brown fox."
	start = time.Now()
	ds.mustActions(act("type", "text", text))
	t.Logf("type 20 chars: %v", time.Since(start))
	if got := typed(tw.waitKeys(20)); got != text {
		t.Errorf("typed %q, want %q", got, text)
	}

	// Caps Lock on: typing still types what was asked, and Caps Lock stays on.
	ds.mustActions(act("key", "text", "Caps_Lock"))
	tw.reset()
	ds.mustActions(act("type", "text", "Hi there"))
	if got := typed(tw.waitKeys(8)); got != "Hi there" {
		t.Errorf("with Caps Lock on: typed %q", got)
	}
	if q, err := xproto.QueryPointer(tw.c, tw.win).Reply(); err != nil || q.Mask&xproto.ModMaskLock == 0 {
		t.Errorf("Caps Lock is no longer on: %v %v", q, err)
	}
	ds.mustActions(act("key", "text", "Caps_Lock"))

	// Key combinations.
	tw.reset()
	ds.mustActions(act("key", "text", "ctrl+s"), act("key", "text", "ctrl+a BackSpace"), act("key", "text", "Return"),
		act("key", "text", "ctrl+shift+t"), act("key", "text", "F5 KP_Enter Escape Page_Down ctrl++"))
	ks := tw.waitKeys(10)
	type kp struct {
		sym  xproto.Keysym
		mods uint16
	}
	var got []kp
	for _, k := range ks {
		if isModifierKeysym(k.sym) {
			continue
		}
		got = append(got, kp{k.sym, k.state & (xproto.KeyButMaskShift | xproto.KeyButMaskControl)})
	}
	ctrl, shift := uint16(xproto.KeyButMaskControl), uint16(xproto.KeyButMaskShift)
	wantK := []kp{{'s', ctrl}, {'a', ctrl}, {ksBackSpace, 0}, {ksReturn, 0}, {'T', ctrl | shift},
		{0xffc2, 0}, {0xff8d, 0}, {0xff1b, 0}, {0xff56, 0}, {'+', ctrl | shift}}
	if fmt.Sprint(got) != fmt.Sprint(wantK) {
		t.Errorf("keys:\n got %v\nwant %v", got, wantK)
	}

	// A key that is not on the keyboard map (F13 is XF86Tools on evdev): through a spare keycode.
	tw.reset()
	ds.mustActions(act("key", "text", "ctrl+F24"), act("key", "text", "XF86AudioMute"))
	if ks := tw.waitKeys(2); len(ks) != 3 || ks[1].sym != 0xffd5 || ks[1].state&ctrl == 0 || ks[2].sym != 0x1008ff12 {
		t.Errorf("F24 and XF86AudioMute: %v", ks)
	}

	// hold_key holds for the duration.
	tw.reset()
	start = time.Now()
	ds.mustActions(act("hold_key", "text", "shift", "duration", 0.2), act("wait", "duration", 0.05))
	if el := time.Since(start); el < 250*time.Millisecond || el > 2*time.Second {
		t.Errorf("hold_key 0.2 s + wait 0.05 s took %v", el)
	}
	if ks := tw.waitKeys(0); len(ks) != 1 || ks[0].sym != ksShiftL {
		t.Errorf("hold_key: %v", ks)
	}

	// The spare keycodes go back to NoSymbol afterwards.
	time.Sleep(restoreAfter + 300*time.Millisecond)
	d := ds.srv.desk
	d.mu.Lock()
	nBound := len(d.x.kb.bound)
	d.mu.Unlock()
	if nBound != 0 {
		t.Errorf("%d spare keycodes still bound", nBound)
	}
	setup := xproto.Setup(tw.c)
	km, err := xproto.GetKeyboardMapping(tw.c, setup.MinKeycode, byte(int(setup.MaxKeycode)-int(setup.MinKeycode)+1)).Reply()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range km.Keysyms {
		if s == 0x01002713 || s == 0x010065e5 || s == 0xe9 {
			t.Errorf("keysym %#x still on the keyboard map", s)
		}
	}
}

func TestDesktopManyUnicode(t *testing.T) {
	// More distinct unmapped characters than spare keycodes: bindings are recycled.
	v := startXvfb(t)
	tw := newTestWindow(t, v.display, "unicode", 0, 0, 300, 200, true)
	ds := startDesktopServer(t, v.display)
	var sb strings.Builder
	for r := rune(0x4e00); r < 0x4e00+40; r++ {
		sb.WriteRune(r)
	}
	text := sb.String() + "ÀÉÎÕÜ"
	start := time.Now()
	ds.mustActions(act("type", "text", text))
	t.Logf("type %d distinct unmapped chars: %v", len([]rune(text)), time.Since(start))
	if got := typed(tw.waitKeys(len([]rune(text)))); got != text {
		t.Errorf("typed %q, want %q", got, text)
	}
}

func TestDesktopWindowsFallback(t *testing.T) {
	v := startXvfb(t)
	tw := newTestWindow(t, v.display, "e2a tëst ✓", 100, 120, 400, 300, true)
	newTestWindow(t, v.display, "other", 600, 50, 200, 100, false)
	ds := startDesktopServer(t, v.display)
	st, b := ds.get("/desktop/windows")
	if st != 200 {
		t.Fatalf("%d %s", st, b)
	}
	var list windowList
	if err := json.Unmarshal(b, &list); err != nil {
		t.Fatal(err)
	}
	if list.Screen.Width != 1280 || list.Screen.Height != 800 {
		t.Errorf("screen %+v", list.Screen)
	}
	if len(list.Windows) != 2 {
		t.Fatalf("windows %s", b)
	}
	w := list.Windows[0]
	if w.ID != uint32(tw.win) || w.Title != "e2a tëst ✓" || w.Class != "E2aTest" || w.X != 100 || w.Y != 120 ||
		w.Width != 400 || w.Height != 300 || !w.Focused {
		t.Errorf("window %+v", w)
	}
	if list.Focused == nil || *list.Focused != uint32(tw.win) {
		t.Errorf("focused %v", list.Focused)
	}
	if list.Windows[1].Title != "other" || list.Windows[1].Focused {
		t.Errorf("second window %+v", list.Windows[1])
	}
}

func TestDesktopWindowsFluxbox(t *testing.T) {
	fb, err := exec.LookPath("fluxbox")
	if err != nil {
		t.Skip("fluxbox is not installed")
	}
	v := startXvfb(t)
	home := t.TempDir()
	cmd := exec.Command(fb)
	cmd.Env = append(os.Environ(), "DISPLAY="+v.display, "HOME="+home)
	// No pipes (nil: /dev/null), and a process group of its own that is killed whole:
	// fluxbox starts helpers (fbsetbg, and an xmessage window when that finds no wallpaper
	// setter) that would otherwise outlive it and hold cmd.Wait on their inherited output.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); cmd.Wait() })
	ds := startDesktopServer(t, v.display)

	// Wait for fluxbox to own the screen (_NET_SUPPORTING_WM_CHECK on the root).
	xc, err := xgb.NewConnDisplay(v.display)
	if err != nil {
		t.Fatal(err)
	}
	defer xc.Close()
	root := xproto.Setup(xc).DefaultScreen(xc).Root
	check, _ := xproto.InternAtom(xc, false, 24, "_NET_SUPPORTING_WM_CHECK").Reply()
	for deadline := time.Now().Add(15 * time.Second); ; {
		p, err := xproto.GetProperty(xc, false, root, check.Atom, xproto.AtomWindow, 0, 1).Reply()
		if err == nil && p.ValueLen == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("fluxbox did not start")
		}
		time.Sleep(50 * time.Millisecond)
	}

	tw := newTestWindow(t, v.display, "e2a tëst ✓ fluxbox", 100, 120, 400, 300, false)
	var list windowList
	var found *windowInfo
	for deadline := time.Now().Add(10 * time.Second); found == nil || !found.Focused; {
		st, b := ds.get("/desktop/windows")
		if st != 200 {
			t.Fatalf("%d %s", st, b)
		}
		list = windowList{}
		json.Unmarshal(b, &list)
		found = nil
		for i := range list.Windows {
			if list.Windows[i].ID == uint32(tw.win) {
				found = &list.Windows[i]
			}
		}
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if found == nil {
		t.Fatalf("test window not in %+v", list)
	}
	if found.Title != "e2a tëst ✓ fluxbox" || found.Class != "E2aTest" || found.Width != 400 || found.Height != 300 {
		t.Errorf("window %+v", *found)
	}
	if !found.Focused || list.Focused == nil || *list.Focused != uint32(tw.win) {
		t.Errorf("not focused: %+v, focused %v", *found, list.Focused)
	}
	// Reparented into a frame: its absolute position is still on screen, inside the frame.
	if found.X < 0 || found.Y < 0 || found.X+found.Width > 1280 || found.Y+found.Height > 800 {
		t.Errorf("geometry %+v", *found)
	}
	t.Logf("under fluxbox: %+v", *found)

	// A click at the window's reported position reaches it there.
	ds.mustActions(act("left_click", "coordinate", []int{found.X + 10, found.Y + 20}))
	if bs := tw.waitButtons(1); len(bs) != 1 || bs[0].x != 10 || bs[0].y != 20 {
		t.Errorf("click: %v", bs)
	}
	// Keys reach the focused window.
	ds.mustActions(act("type", "text", "ok ✓"), act("key", "text", "ctrl+s"))
	if got := typed(tw.waitKeys(5)); !strings.HasPrefix(got, "ok ✓") {
		t.Errorf("typed %q", got)
	}
}

func TestDesktopValidation(t *testing.T) {
	v := startXvfb(t)
	ds := startDesktopServer(t, v.display)
	ok := act("mouse_move", "coordinate", []int{10, 10})
	cases := []struct {
		body  string
		field string
		msg   string
	}{
		{`{"actions": []}`, "actions", "empty"},
		{`{}`, "actions", "missing"},
		{`{"actions": {"action":"wait"}}`, "actions", "must be a list"},
		{`{"actions": [` + strings.Repeat(`{"action":"cursor_position"},`, 100) + `{"action":"cursor_position"}]}`, "actions", "at most 100"},
		{`{"actions": [{"action":"cursor_position"}, 5]}`, "actions[1]", "object"},
		{`{"actions": [{"coordinate":[1,2]}]}`, "actions[0].action", "missing"},
		{`{"actions": [{"action":"fly"}]}`, "actions[0].action", `unknown action "fly"`},
		{`{"actions": [{"action":7}]}`, "actions[0].action", "string"},
		{`{"actions": [{"action":"cursor_position"},{"action":"cursor_position"},{"action":"left_click","coordinate":[1400,10]}]}`,
			"actions[2].coordinate", "actions[2].coordinate: (1400, 10) is off the 1280×800 screen"},
		{`{"actions": [{"action":"left_click","coordinate":[-1,10]}]}`, "actions[0].coordinate", "off the"},
		{`{"actions": [{"action":"left_click","coordinate":[1,800]}]}`, "actions[0].coordinate", "off the"},
		{`{"actions": [{"action":"left_click","coordinate":[1]}]}`, "actions[0].coordinate", "two integers"},
		{`{"actions": [{"action":"left_click","coordinate":"1,2"}]}`, "actions[0].coordinate", "two integers"},
		{`{"actions": [{"action":"left_click","coordinate":[1.5,2]}]}`, "actions[0].coordinate", "two integers"},
		{`{"actions": [{"action":"mouse_move"}]}`, "actions[0].coordinate", "missing"},
		{`{"actions": [{"action":"left_click_drag","coordinate":[1,2]}]}`, "actions[0].start_coordinate", "missing"},
		{`{"actions": [{"action":"left_click_drag","start_coordinate":[1,2000],"coordinate":[1,2]}]}`, "actions[0].start_coordinate", "off the"},
		{`{"actions": [{"action":"type"}]}`, "actions[0].text", "missing"},
		{`{"actions": [{"action":"type","text":5}]}`, "actions[0].text", "string"},
		{`{"actions": [{"action":"type","text":""}]}`, "actions[0].text", "empty"},
		{`{"actions": [{"action":"type","text":"a\u0007"}]}`, "actions[0].text", "control character"},
		{`{"actions": [{"action":"type","text":"hi","coordinate":[1,2]}]}`, "actions[0].coordinate", "not a field of type"},
		{`{"actions": [{"action":"key","text":"ctrl+Sift"}]}`, "actions[0].text", `unknown key name "Sift"`},
		{`{"actions": [{"action":"key","text":"  "}]}`, "actions[0].text", "no key"},
		{`{"actions": [{"action":"key","text":"ctrl++a"}]}`, "actions[0].text", "empty key name"},
		{`{"actions": [{"action":"left_click","text":"hyperdrive"}]}`, "actions[0].text", "modifier keys"},
		{`{"actions": [{"action":"scroll","scroll_direction":"sideways","scroll_amount":1}]}`, "actions[0].scroll_direction", "sideways"},
		{`{"actions": [{"action":"scroll","scroll_direction":"up","scroll_amount":0}]}`, "actions[0].scroll_amount", "1 to 100"},
		{`{"actions": [{"action":"scroll","scroll_direction":"up","scroll_amount":101}]}`, "actions[0].scroll_amount", "1 to 100"},
		{`{"actions": [{"action":"scroll","scroll_direction":"up"}]}`, "actions[0].scroll_amount", "missing"},
		{`{"actions": [{"action":"wait","duration":0}]}`, "actions[0].duration", "more than 0"},
		{`{"actions": [{"action":"wait","duration":101}]}`, "actions[0].duration", "at most 100"},
		{`{"actions": [{"action":"wait","duration":"1"}]}`, "actions[0].duration", "number"},
		{`{"actions": [{"action":"hold_key","text":"a"}]}`, "actions[0].duration", "missing"},
		{`{"actions": [{"action":"screenshot","width":2000}]}`, "actions[0].width", "wider"},
		{`{"actions": [{"action":"screenshot","width":0}]}`, "actions[0].width", "positive"},
	}
	for _, c := range cases {
		st, out := ds.postRaw(c.body)
		e, _ := out["error"].(map[string]any)
		if st != 400 || e == nil || e["code"] != "invalid_action" || e["field"] != c.field || !strings.Contains(e["message"].(string), c.msg) {
			t.Errorf("%s\n  → %d %v\n  want field %q, message containing %q", c.body, st, out, c.field, c.msg)
		}
	}
	if st, out := ds.postRaw(`{"actions": [`); st != 400 || out["error"].(map[string]any)["code"] != "invalid_json" {
		t.Errorf("bad JSON: %d %v", st, out)
	}

	// Nothing runs when a later action is invalid.
	ds.mustActions(ok)
	st, _ := ds.actions(act("mouse_move", "coordinate", []int{500, 500}), act("key", "text", "nope+x"))
	if st != 400 {
		t.Fatal(st)
	}
	res := ds.mustActions(act("cursor_position"))
	if c := res[0].(map[string]any); c["x"] != 10.0 || c["y"] != 10.0 {
		t.Errorf("an action ran before validation failed: cursor at %v", c)
	}

	// null fields are absent; every result of a non-reporting action is {}.
	st, out := ds.postRaw(`{"actions": [{"action":"left_click","coordinate":null,"text":null},{"action":"wait","duration":0.01}]}`)
	if st != 200 || fmt.Sprint(out["results"]) != "[map[] map[]]" {
		t.Errorf("nulls: %d %v", st, out)
	}
}

func TestDesktopXRestart(t *testing.T) {
	v := startXvfb(t)
	ds := startDesktopServer(t, v.display)
	if st, b := ds.get("/desktop/cursor"); st != 200 {
		t.Fatalf("%d %s", st, b)
	}
	v.stop()
	if st, b := ds.get("/desktop/cursor"); st != 503 || !strings.Contains(string(b), "desktop_starting") {
		t.Errorf("while X is down: %d %s", st, b)
	}
	v.start()
	if st, b := ds.get("/desktop/screenshot"); st != 200 {
		t.Errorf("after restart: %d %s", st, b)
	}
	// Restart between two requests of a client that keeps going: the connection is reopened once.
	v.stop()
	v.start()
	res := ds.mustActions(act("mouse_move", "coordinate", []int{7, 8}), act("cursor_position"))
	if c := res[1].(map[string]any); c["x"] != 7.0 || c["y"] != 8.0 {
		t.Errorf("cursor %v", c)
	}
}

// TestDesktopXev checks typing against Xlib itself (xev, with XKB and an input method, in a UTF-8
// locale): the characters typed through spare keycodes arrive as those characters.
func TestDesktopXev(t *testing.T) {
	xevPath, err := exec.LookPath("xev")
	if err != nil {
		t.Skip("xev is not installed")
	}
	v := startXvfb(t)
	ds := startDesktopServer(t, v.display)
	out := &lockedBuffer{}
	cmd := exec.Command(xevPath, "-geometry", "400x300+100+100", "-event", "keyboard")
	cmd.Env = append(os.Environ(), "DISPLAY="+v.display, "LANG=C.UTF-8", "LC_ALL=C.UTF-8")
	cmd.Stdout, cmd.Stderr = out, io.Discard
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	// Wait for its window; the focus follows the pointer (no window manager).
	for deadline := time.Now().Add(10 * time.Second); ; {
		_, b := ds.get("/desktop/windows")
		if strings.Contains(string(b), "Event Tester") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("xev's window did not appear")
		}
		time.Sleep(50 * time.Millisecond)
	}
	text := "Héllo wörld ✓ 日本 Ωmega 😀"
	ds.mustActions(act("mouse_move", "coordinate", []int{300, 250}), act("type", "text", text))
	var got string
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		got = xevTyped(out.String())
		if len([]rune(got)) >= len([]rune(text)) {
			break
		}
	}
	if got != text {
		t.Errorf("xev got %q, want %q", got, text)
	}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// xevTyped collects the text of xev's KeyPress events (XmbLookupString, else XLookupString).
func xevTyped(out string) string {
	var sb strings.Builder
	for _, block := range strings.Split(out, "\n\n") {
		if !strings.HasPrefix(strings.TrimSpace(block), "KeyPress") {
			continue
		}
		var s string
		for _, line := range strings.Split(block, "\n") {
			line = strings.TrimSpace(line)
			for _, pre := range []string{"XmbLookupString gives", "XLookupString gives"} {
				if strings.HasPrefix(line, pre) && s == "" {
					if q := strings.Index(line, `"`); q >= 0 && strings.HasSuffix(line, `"`) && len(line) > q+1 {
						s = line[q+1 : len(line)-1]
					}
				}
			}
		}
		sb.WriteString(s)
	}
	return sb.String()
}

func TestKeyNames(t *testing.T) {
	cases := map[string]xproto.Keysym{
		"Return": ksReturn, "return": ksReturn, "enter": ksReturn, "Enter": ksReturn, "KP_Enter": 0xff8d,
		"ctrl": 0xffe3, "Control_L": 0xffe3, "alt": 0xffe9, "super": 0xffeb, "cmd": 0xffeb, "win": 0xffeb,
		"meta": 0xffe7, "shift": ksShiftL, "a": 'a', "A": 'A', "1": '1', "/": '/', "slash": '/', "minus": '-',
		"F1": 0xffbe, "f5": 0xffc2, "F24": 0xffd5, "Page_Up": 0xff55, "Prior": 0xff55, "Page_Down": 0xff56,
		"Next": 0xff56, "pgdn": 0xff56, "Home": 0xff50, "End": 0xff57, "Insert": 0xff63, "Delete": 0xffff,
		"BackSpace": ksBackSpace, "backspace": ksBackSpace, "Tab": ksTab, "Escape": 0xff1b, "esc": 0xff1b,
		"Up": 0xff52, "Left": 0xff51, "space": ' ', "KP_5": 0xffb5, "KP_Add": 0xffab, "é": 0xe9, "eacute": 0xe9,
		"Eacute": 0xc9, "€": 0x10020ac, "EuroSign": 0x20ac, "✓": 0x1002713, "U+2713": 0x1002713,
		"0xff0d": ksReturn, "XF86AudioMute": 0x1008ff12, "Print": 0xff61, "Caps_Lock": 0xffe5, "plus": '+',
	}
	for name, want := range cases {
		if got, ok := lookupKeysym(name); !ok || got != want {
			t.Errorf("%q → %#x %v, want %#x", name, got, ok, want)
		}
	}
	for _, bad := range []string{"Ctrll", "F99", "", "\x01", "notakey"} {
		if ks, ok := lookupKeysym(bad); ok {
			t.Errorf("%q resolved to %#x", bad, ks)
		}
	}
	combos, err := parseKeyCombos("ctrl+shift+t  ctrl++ + alt+F4")
	if err != nil || fmt.Sprint(combos) != fmt.Sprint([][]xproto.Keysym{{0xffe3, ksShiftL, 't'}, {0xffe3, '+'}, {'+'}, {0xffe9, 0xffc1}}) {
		t.Errorf("combos %v %v", combos, err)
	}
	for ks, r := range map[xproto.Keysym]rune{'a': 'a', 0xe9: 'é', 0x20ac: '€', 0x1002713: '✓', 0xaf3: '✓', ksReturn: -1, 0x6c1: 'а'} {
		if got := keysymToRune(ks); got != r {
			t.Errorf("keysymToRune(%#x) = %q, want %q", ks, got, r)
		}
	}
}

// TestKeysymTable checks the generated table against the X headers when they are installed.
func TestKeysymTable(t *testing.T) {
	loadKeysyms()
	if len(keysyms.byName) < 2000 {
		t.Fatalf("only %d keysym names", len(keysyms.byName))
	}
	hdr := "/usr/include/X11/keysymdef.h"
	b, err := os.ReadFile(hdr)
	if err != nil {
		t.Skip("no " + hdr)
	}
	n := 0
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 3 || f[0] != "#define" || !strings.HasPrefix(f[1], "XK_") {
			continue
		}
		v, err := strconv.ParseUint(strings.TrimPrefix(f[2], "0x"), 16, 32)
		if err != nil {
			continue
		}
		if got, ok := keysyms.byName[f[1][3:]]; !ok || got != xproto.Keysym(v) {
			t.Errorf("%s: %#x %v, want %#x", f[1], got, ok, v)
		}
		n++
	}
	if n < 2000 {
		t.Errorf("read only %d names from %s", n, filepath.Base(hdr))
	}
}

func TestScaleDown(t *testing.T) {
	// A 4×2 checkerboard of black and white averages to mid-grey at half size; flat areas stay.
	src := image.NewRGBA(image.Rect(0, 0, 4, 2))
	for i := 0; i < 8; i++ {
		v := byte(0)
		if (i%4+i/4)%2 == 0 {
			v = 255
		}
		copy(src.Pix[4*i:], []byte{v, v, v, 255})
	}
	dst := scaleDown(src, 2)
	if dst.Rect.Dx() != 2 || dst.Rect.Dy() != 1 {
		t.Fatalf("size %v", dst.Rect)
	}
	for x := 0; x < 2; x++ {
		if c := dst.RGBAAt(x, 0); c.R < 126 || c.R > 129 || c.A != 255 {
			t.Errorf("pixel %d = %v", x, c)
		}
	}
	flat := image.NewRGBA(image.Rect(0, 0, 1280, 800))
	for i := 0; i < len(flat.Pix); i += 4 {
		copy(flat.Pix[i:], []byte{10, 200, 30, 255})
	}
	d2 := scaleDown(flat, 1000)
	if d2.Rect.Dx() != 1000 || d2.Rect.Dy() != 625 {
		t.Fatalf("size %v", d2.Rect)
	}
	for _, p := range []image.Point{{0, 0}, {999, 624}, {500, 300}} {
		if c := d2.RGBAAt(p.X, p.Y); c.R != 10 || c.G != 200 || c.B != 30 || c.A != 255 {
			t.Errorf("flat pixel %v = %v", p, c)
		}
	}
}

// BenchmarkDesktopScreenshot: the parts of a 1280×800 screenshot, on a fresh Xvfb, or on the
// display in E2A_BENCH_DISPLAY (to measure a screen with real content, e.g. a browser).
func BenchmarkDesktopScreenshot(b *testing.B) {
	display := os.Getenv("E2A_BENCH_DISPLAY")
	if display == "" {
		display = startXvfb(b).display
	}
	x, err := dialX(display)
	if err != nil {
		b.Fatal(err)
	}
	defer x.close()
	b.Run("capture", func(b *testing.B) {
		for b.Loop() {
			if _, err := x.capture(); err != nil {
				b.Fatal(err)
			}
		}
	})
	raw, _ := x.capture()
	keep := append([]byte(nil), raw.data...)
	b.Run("all", func(b *testing.B) {
		for b.Loop() {
			raw, err := x.capture()
			if err != nil {
				b.Fatal(err)
			}
			img, _ := toRGBA(raw)
			p, _ := encodePNG(img)
			b.ReportMetric(float64(len(p)), "png-bytes")
		}
	})
	b.Run("convert", func(b *testing.B) {
		for b.Loop() {
			copy(raw.data, keep)
			toRGBA(raw)
		}
	})
	copy(raw.data, keep)
	img, _ := toRGBA(raw)
	b.Run("png", func(b *testing.B) {
		for b.Loop() {
			encodePNG(img)
		}
	})
	b.Run("scale640", func(b *testing.B) {
		for b.Loop() {
			scaleDown(img, 640)
		}
	})
}

func TestEncodePNG(t *testing.T) {
	// Exact round trip of noisy content, also at odd sizes and past one IDAT chunk.
	for _, sz := range []image.Point{{1, 1}, {3, 7}, {640, 480}} {
		img := image.NewRGBA(image.Rect(0, 0, sz.X, sz.Y))
		rng := rand.New(rand.NewPCG(1, uint64(sz.X)))
		for i := range img.Pix {
			img.Pix[i] = byte(rng.IntN(256))
			if i%4 == 3 {
				img.Pix[i] = 255
			}
		}
		b, err := encodePNG(img)
		if err != nil {
			t.Fatal(err)
		}
		got, err := png.Decode(bytes.NewReader(b))
		if err != nil {
			t.Fatalf("%v: %v", sz, err)
		}
		for y := 0; y < sz.Y; y++ {
			for x := 0; x < sz.X; x++ {
				r, g, bl, a := got.At(x, y).RGBA()
				w := img.RGBAAt(x, y)
				if byte(r>>8) != w.R || byte(g>>8) != w.G || byte(bl>>8) != w.B || a != 0xffff {
					t.Fatalf("%v: pixel (%d,%d) = %d %d %d %d, want %v", sz, x, y, r>>8, g>>8, bl>>8, a>>8, w)
				}
			}
		}
	}
}

func TestToRGBA(t *testing.T) {
	// One pixel (R, G, B) = (0x12, 0x34, 0x56) in the formats an X server may send.
	cases := []struct {
		name string
		raw  rawImage
	}{
		{"xRGB little-endian", rawImage{data: []byte{0x56, 0x34, 0x12, 0x00}, pixelFormat: pixelFormat{bpp: 32, rmask: 0xff0000, gmask: 0xff00, bmask: 0xff}}},
		{"xRGB big-endian", rawImage{data: []byte{0x00, 0x12, 0x34, 0x56}, pixelFormat: pixelFormat{bpp: 32, msbFirst: true, rmask: 0xff0000, gmask: 0xff00, bmask: 0xff}}},
		{"xBGR", rawImage{data: []byte{0x12, 0x34, 0x56, 0x00}, pixelFormat: pixelFormat{bpp: 32, rmask: 0xff, gmask: 0xff00, bmask: 0xff0000}}},
		{"RGB 24 bpp", rawImage{data: []byte{0x56, 0x34, 0x12, 0x00}, pixelFormat: pixelFormat{bpp: 24, rmask: 0xff0000, gmask: 0xff00, bmask: 0xff}}},
	}
	for _, c := range cases {
		raw := c.raw
		raw.width, raw.height = 1, 1
		img, err := toRGBA(&raw)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if got := img.RGBAAt(0, 0); got.R != 0x12 || got.G != 0x34 || got.B != 0x56 || got.A != 0xff {
			t.Errorf("%s: %v", c.name, got)
		}
	}
	// 16 bpp 5-6-5: full-scale channels map to 255.
	raw := rawImage{data: []byte{0xff, 0xff, 0, 0}, width: 1, height: 1, pixelFormat: pixelFormat{bpp: 16, rmask: 0xf800, gmask: 0x07e0, bmask: 0x001f}}
	img, err := toRGBA(&raw)
	if err != nil || img.RGBAAt(0, 0) != (color.RGBA{255, 255, 255, 255}) {
		t.Errorf("565: %v %v", img, err)
	}
}

// TestDesktopLeftoverBindings: spare keycodes left bound by an envd that died, or by this envd's
// previous connection, are undone by the next connection.
func TestDesktopLeftoverBindings(t *testing.T) {
	v := startXvfb(t)
	tw := newTestWindow(t, v.display, "leftover", 0, 0, 300, 200, true)
	setup := xproto.Setup(tw.c)
	mapping := func() []xproto.Keysym {
		km, err := xproto.GetKeyboardMapping(tw.c, setup.MinKeycode, byte(int(setup.MaxKeycode)-int(setup.MinKeycode)+1)).Reply()
		if err != nil {
			t.Fatal(err)
		}
		return km.Keysyms
	}
	has := func(ks xproto.Keysym) bool {
		for _, s := range mapping() {
			if s == ks {
				return true
			}
		}
		return false
	}
	// A dead envd's binding: ☺ on an empty keycode.
	km, _ := xproto.GetKeyboardMapping(tw.c, setup.MinKeycode, byte(int(setup.MaxKeycode)-int(setup.MinKeycode)+1)).Reply()
	per := int(km.KeysymsPerKeycode)
	var spare xproto.Keycode
	for i := 0; (i+1)*per <= len(km.Keysyms); i++ {
		empty := true
		for _, s := range km.Keysyms[i*per : (i+1)*per] {
			empty = empty && s == 0
		}
		if empty {
			spare = xproto.Keycode(int(setup.MinKeycode) + i)
		}
	}
	if spare == 0 {
		t.Skip("no empty keycode")
	}
	const smiley = 0x0100263a
	if err := xproto.ChangeKeyboardMappingChecked(tw.c, 1, spare, 2, []xproto.Keysym{smiley, smiley}).Check(); err != nil {
		t.Fatal(err)
	}
	if !has(smiley) {
		t.Fatal("setup failed")
	}
	ds := startDesktopServer(t, v.display)
	ds.mustActions(act("type", "text", "a"))
	if has(smiley) {
		t.Error("a dead envd's binding is still there")
	}

	// This envd's binding of a key that is not a character, then the connection breaks.
	const f35 = 0xffe0
	if has(f35) {
		t.Skip("F35 is on the keyboard map")
	}
	ds.mustActions(act("key", "text", "F35"))
	if !has(f35) {
		t.Fatal("F35 not bound")
	}
	d := ds.srv.desk
	d.mu.Lock()
	d.drop()
	d.mu.Unlock()
	ds.mustActions(act("key", "text", "a"))
	if has(f35) {
		t.Error("the previous connection's binding is still there")
	}
	if ks := tw.waitKeys(3); len(ks) != 3 || ks[1].sym != f35 {
		t.Errorf("keys %v", ks)
	}
}
