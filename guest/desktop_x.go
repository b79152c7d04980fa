package main

import (
	"errors"
	"fmt"
	"net"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/jezek/xgb"
	"github.com/jezek/xgb/xfixes"
	"github.com/jezek/xgb/xproto"
	"github.com/jezek/xgb/xtest"
)

// xconn is one open connection to the X server, with what envd learned about it.
type xconn struct {
	c    *xgb.Conn
	nc   net.Conn
	root xproto.Window

	width, height int // the root's size, refreshed at the start of every request

	pixelFormat // the root's

	xtestErr error // non-nil: no XTEST, no input
	xfixes   bool  // the pointer can be drawn into screenshots
	minKC    xproto.Keycode
	maxKC    xproto.Keycode
	atoms    map[string]xproto.Atom

	deadMu sync.Mutex
	dead   bool
	why    error

	mapDirty  atomic.Bool // a MappingNotify came: reload the keyboard map before the next key action
	kb        *keyboard
	inherited *keyboard // the keyboard of the connection this one replaced
}

// dialX opens a connection to display (":0", ":0.0", "unix:0", "host:0"): a Unix socket
// /tmp/.X11-unix/X<n>, or TCP port 6000+n on host. No Xauthority: the desktop's Xvfb takes local
// connections without one.
func dialX(display string) (*xconn, error) {
	colon := strings.LastIndex(display, ":")
	if colon < 0 {
		return nil, fmt.Errorf("bad display %q", display)
	}
	host, rest := display[:colon], display[colon+1:]
	num, scr, _ := strings.Cut(rest, ".")
	n, err := strconv.Atoi(num)
	if err != nil || n < 0 {
		return nil, fmt.Errorf("bad display %q", display)
	}
	screen := 0
	if scr != "" {
		if screen, err = strconv.Atoi(scr); err != nil || screen < 0 {
			return nil, fmt.Errorf("bad display %q", display)
		}
	}
	var nc net.Conn
	if host == "" || host == "unix" {
		nc, err = net.DialTimeout("unix", "/tmp/.X11-unix/X"+strconv.Itoa(n), 3*time.Second)
	} else {
		nc, err = net.DialTimeout("tcp", net.JoinHostPort(host, strconv.Itoa(6000+n)), 3*time.Second)
	}
	if err != nil {
		if isNotListening(err) {
			return nil, &xError{starting: true, err: err}
		}
		return nil, err
	}
	// The handshake reads without a timeout of its own.
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	c, err := xgb.NewConnNet(nc)
	if err != nil {
		nc.Close()
		if isNotListening(err) || errors.Is(err, net.ErrClosed) || strings.Contains(err.Error(), "EOF") {
			return nil, &xError{starting: true, err: fmt.Errorf("X handshake: %w", err)}
		}
		return nil, fmt.Errorf("X handshake: %w", err)
	}
	nc.SetDeadline(time.Time{})

	x := &xconn{c: c, nc: nc, atoms: map[string]xproto.Atom{}}
	go x.drain()
	setup := xproto.Setup(c)
	if screen >= len(setup.Roots) {
		x.close()
		return nil, fmt.Errorf("display %q: no screen %d", display, screen)
	}
	si := setup.Roots[screen]
	x.root = si.Root
	x.width, x.height = int(si.WidthInPixels), int(si.HeightInPixels)
	x.msbFirst = setup.ImageByteOrder == xproto.ImageOrderMSBFirst
	for _, f := range setup.PixmapFormats {
		if f.Depth == si.RootDepth {
			x.bpp = int(f.BitsPerPixel)
		}
	}
	for _, dp := range si.AllowedDepths {
		for _, v := range dp.Visuals {
			if v.VisualId == si.RootVisual {
				x.rmask, x.gmask, x.bmask = v.RedMask, v.GreenMask, v.BlueMask
			}
		}
	}
	x.minKC, x.maxKC = setup.MinKeycode, setup.MaxKeycode
	if err := xtest.Init(c); err != nil {
		x.xtestErr = fmt.Errorf("the X server has no XTEST extension: %v", err)
	}
	// Not xfixes.Init: it writes XFIXES's event and error constructors into xgb's global tables,
	// unguarded, while the reader goroutine of any other connection (the previous one, still
	// closing) may be reading them. XTEST has none, so xtest.Init writes nothing.
	if r, err := xproto.QueryExtension(c, 6, "XFIXES").Reply(); err == nil && r.Present {
		c.ExtLock.Lock()
		c.Extensions["XFIXES"] = r.MajorOpcode
		c.ExtLock.Unlock()
		if _, err := xfixes.QueryVersion(c, 4, 0).Reply(); err == nil {
			x.xfixes = true
		}
	}
	if err := x.refreshScreen(); err != nil {
		x.close()
		return nil, err
	}
	return x, nil
}

// drain reads the events and unchecked errors xgb queues (MappingNotify reaches every client;
// a full queue would stall the connection) and notices when the connection ends.
func (x *xconn) drain() {
	for {
		ev, xerr := x.c.WaitForEvent()
		if ev == nil && xerr == nil {
			x.markDead(errors.New("connection closed by the X server"))
			return
		}
		if m, ok := ev.(xproto.MappingNotifyEvent); ok && m.Request != xproto.MappingPointer {
			x.mapDirty.Store(true)
		}
	}
}

func (x *xconn) markDead(why error) {
	x.deadMu.Lock()
	defer x.deadMu.Unlock()
	if !x.dead {
		x.dead, x.why = true, why
	}
}

func (x *xconn) isDead() bool {
	x.deadMu.Lock()
	defer x.deadMu.Unlock()
	return x.dead
}

func (x *xconn) deathReason() error {
	x.deadMu.Lock()
	defer x.deadMu.Unlock()
	return x.why
}

// kill closes the socket: every pending and later request fails at once. (xgb's Close does a
// round trip first, which hangs with a hung server.)
func (x *xconn) kill(why error) {
	x.markDead(why)
	x.nc.Close()
}

func (x *xconn) close() { x.kill(errors.New("connection closed")) }

// refreshScreen is the round trip that proves the connection alive; it also notices a resized
// screen (RandR).
func (x *xconn) refreshScreen() error {
	g, err := xproto.GetGeometry(x.c, xproto.Drawable(x.root)).Reply()
	if err != nil {
		return asXError(x, err)
	}
	if g == nil {
		return asXError(x, errors.New("no reply"))
	}
	x.width, x.height = int(g.Width), int(g.Height)
	return nil
}

// sync waits until the server has processed every request sent so far (XSync).
func (x *xconn) sync() error {
	_, err := xproto.GetInputFocus(x.c).Reply()
	return asXError(x, err)
}

func (x *xconn) atom(name string) (xproto.Atom, error) {
	if a, ok := x.atoms[name]; ok {
		return a, nil
	}
	r, err := xproto.InternAtom(x.c, false, uint16(len(name)), name).Reply()
	if err != nil {
		return 0, asXError(x, err)
	}
	x.atoms[name] = r.Atom
	return r.Atom, nil
}

func (x *xconn) pointer() (int, int, error) {
	r, err := xproto.QueryPointer(x.c, x.root).Reply()
	if err != nil {
		return 0, 0, asXError(x, err)
	}
	return int(r.RootX), int(r.RootY), nil
}

// rawImage is the root window's pixels as the server sent them.
type rawImage struct {
	data          []byte
	width, height int
	depth         byte
	pixelFormat
	cursor *xfixes.GetCursorImageReply // the pointer, to draw on top; nil without XFIXES
}

// pixelFormat is how the server lays out the root window's pixels (from the connection setup).
type pixelFormat struct {
	bpp                 int
	msbFirst            bool
	rmask, gmask, bmask uint32
}

// capture reads the whole root window (GetImage, ZPixmap) and the pointer's image (XFIXES; X
// leaves the pointer out of GetImage, but an agent wants to see it, as scrot -p shows it to
// Anthropic's reference implementation). The request is built by hand so that
// the reply's buffer is used as is (xgb's GetImage would copy its megabytes once more).
func (x *xconn) capture() (*rawImage, error) {
	w, h := x.width, x.height
	buf := make([]byte, 20)
	buf[0] = 73 // GetImage
	buf[1] = xproto.ImageFormatZPixmap
	xgb.Put16(buf[2:], 5)
	xgb.Put32(buf[4:], uint32(x.root))
	xgb.Put16(buf[8:], 0)
	xgb.Put16(buf[10:], 0)
	xgb.Put16(buf[12:], uint16(w))
	xgb.Put16(buf[14:], uint16(h))
	xgb.Put32(buf[16:], 0xffffffff)
	cookie := x.c.NewCookie(true, true)
	x.c.NewRequest(buf, cookie)
	var cursor *xfixes.GetCursorImageCookie
	if x.xfixes {
		c := xfixes.GetCursorImage(x.c)
		cursor = &c
	}
	reply, err := cookie.Reply()
	if err != nil {
		return nil, asXError(x, err)
	}
	var cur *xfixes.GetCursorImageReply
	if cursor != nil {
		if cur, err = cursor.Reply(); err != nil && x.isDead() {
			return nil, asXError(x, err)
		}
	}
	if len(reply) < 32 {
		return nil, asXError(x, errors.New("short GetImage reply"))
	}
	n := int(xgb.Get32(reply[4:])) * 4
	if 32+n > len(reply) {
		return nil, asXError(x, errors.New("short GetImage reply"))
	}
	return &rawImage{data: reply[32 : 32+n], width: w, height: h, depth: reply[1],
		pixelFormat: x.pixelFormat, cursor: cur}, nil
}

// ---- input (XTEST) ----

const (
	evKeyPress      = xproto.KeyPress
	evKeyRelease    = xproto.KeyRelease
	evButtonPress   = xproto.ButtonPress
	evButtonRelease = xproto.ButtonRelease
	evMotion        = xproto.MotionNotify
)

// fake sends one XTEST event. Unchecked: errors (there are none for sane input) surface as a
// failed sync.
func (x *xconn) fake(typ byte, detail byte, px, py int) error {
	if x.xtestErr != nil {
		return &xError{err: x.xtestErr}
	}
	xtest.FakeInput(x.c, typ, detail, 0, x.root, int16(px), int16(py), 0)
	if x.isDead() {
		return asXError(x, errors.New("connection closed"))
	}
	return nil
}

func (x *xconn) move(px, py int) error { return x.fake(evMotion, 0, px, py) }

func (x *xconn) button(b byte, down bool) error {
	if down {
		return x.fake(evButtonPress, b, 0, 0)
	}
	return x.fake(evButtonRelease, b, 0, 0)
}

func (x *xconn) key(kc xproto.Keycode, down bool) error {
	if down {
		return x.fake(evKeyPress, byte(kc), 0, 0)
	}
	return x.fake(evKeyRelease, byte(kc), 0, 0)
}

// ---- keyboard map ----

const (
	// bindSettle: after binding spare keycodes, envd waits this long before typing with them.
	// The server sends every client the MappingNotify before the key event, but a client may
	// read the new map later than it handles the key: Chromium, measured, types a wrong or no
	// character for some keys when they come at once, and gets every one right with 20 ms.
	bindSettle = 50 * time.Millisecond
	// rebindMinAge: a spare keycode is bound to another keysym only once it was last used this
	// long ago, so that a client still busy with the key events before reads the map they were
	// sent with.
	rebindMinAge = 250 * time.Millisecond
	// restoreAfter: spare keycodes go back to NoSymbol once unused this long (same reason).
	restoreAfter = time.Second
)

// typedKey is one key to press: a keysym and, for typed text, its character (else -1).
type typedKey struct {
	ks xproto.Keysym
	r  rune
}

type keyPos struct {
	kc    xproto.Keycode
	shift bool // the keysym is on the shifted level: press Shift with it
}

type keyboard struct {
	min, max xproto.Keycode
	byKeysym map[xproto.Keysym]keyPos
	byRune   map[rune]keyPos
	shift    xproto.Keycode // a keycode of Shift_L/R, 0 if none

	free    []xproto.Keycode // spare keycodes (no keysyms) not bound now
	bound   map[xproto.Keycode]*binding
	boundBy map[xproto.Keysym]xproto.Keycode
}

type binding struct {
	sym  xproto.Keysym
	used time.Time
}

// keyboard returns the keyboard map, (re)loading it when it is new or a MappingNotify came since.
func (x *xconn) keyboard() (*keyboard, error) {
	if x.kb != nil && !x.mapDirty.Load() {
		return x.kb, nil
	}
	x.mapDirty.Store(false)
	minKC, maxKC := x.minKC, x.maxKC
	r, err := xproto.GetKeyboardMapping(x.c, minKC, byte(int(maxKC)-int(minKC)+1)).Reply()
	if err != nil {
		return nil, asXError(x, err)
	}
	per := int(r.KeysymsPerKeycode)
	kb := &keyboard{min: minKC, max: maxKC, byKeysym: map[xproto.Keysym]keyPos{}, byRune: map[rune]keyPos{},
		bound: map[xproto.Keycode]*binding{}, boundBy: map[xproto.Keysym]xproto.Keycode{}}
	old, first := x.kb, x.kb == nil
	var reclaimed int
	for i := 0; per > 0 && (i+1)*per <= len(r.Keysyms); i++ {
		kc := xproto.Keycode(int(minKC) + i)
		syms := r.Keysyms[i*per : (i+1)*per]
		empty := true
		for _, s := range syms {
			if s != ksNoSymbol {
				empty = false
			}
		}
		if first {
			// Spare keycodes bound for typing over a connection that is gone (this envd's last
			// one, or an envd that died) and not undone: undo them now.
			var prev *binding
			if x.inherited != nil {
				prev = x.inherited.bound[kc]
			}
			if (prev != nil && syms[0] == prev.sym) || leftoverBinding(syms) {
				xproto.ChangeKeyboardMapping(x.c, 1, kc, 2, []xproto.Keysym{ksNoSymbol, ksNoSymbol})
				reclaimed++
				empty = true
			}
		} else if b, ok := old.bound[kc]; ok && syms[0] == b.sym {
			// Keep our own bindings that the server still has.
			kb.bound[kc] = b
			kb.boundBy[b.sym] = kc
			continue
		}
		if empty {
			kb.free = append(kb.free, kc)
			continue
		}
		// Group 1 only: level 1 (unshifted) and level 2 (Shift).
		l1, l2 := syms[0], ksNoSymbol
		if per > 1 {
			l2 = syms[1]
		}
		if l2 == ksNoSymbol && l1 >= 'a' && l1 <= 'z' { // core protocol: [a] means [a, A]
			l2 = l1 - 'a' + 'A'
		}
		kb.add(l1, keyPos{kc: kc})
		if l2 != ksNoSymbol {
			kb.add(l2, keyPos{kc: kc, shift: true})
		}
	}
	x.inherited = nil
	if reclaimed > 0 {
		if err := x.sync(); err != nil {
			return nil, err
		}
	}
	for _, ks := range []xproto.Keysym{ksShiftL, ksShiftL + 1} {
		if p, ok := kb.byKeysym[ks]; ok {
			kb.shift = p.kc
			break
		}
	}
	x.kb = kb
	return kb, nil
}

// leftoverBinding recognizes how the server shows a spare keycode bound to a character for
// typing ([k, k] becomes [k, k, k, k, NoSymbol...]) when k is a character no keyboard layout puts
// on all four levels of a key: one from Latin-1's upper half or a Unicode keysym.
func leftoverBinding(syms []xproto.Keysym) bool {
	if len(syms) < 4 {
		return false
	}
	k := syms[0]
	if !(k >= 0xa0 && k <= 0xff) && !(k >= 0x01000100 && k <= 0x0110ffff) {
		return false
	}
	for i, s := range syms {
		if (i < 4 && s != k) || (i >= 4 && s != ksNoSymbol) {
			return false
		}
	}
	return true
}

// add records where a keysym is, the unshifted level winning over the shifted one and the lower
// keycode over the higher.
func (kb *keyboard) add(ks xproto.Keysym, p keyPos) {
	if isModifierKeysym(ks) {
		p.shift = false
	}
	if cur, ok := kb.byKeysym[ks]; !ok || (cur.shift && !p.shift) {
		kb.byKeysym[ks] = p
	}
	if r := keysymToRune(ks); r >= 0 {
		if cur, ok := kb.byRune[r]; !ok || (cur.shift && !p.shift) {
			kb.byRune[r] = p
		}
	}
}

// find looks a key up on the map, then among the spare keycodes bound by envd (r >= 0: the
// character being typed, found by character too, since a layout may have it under a legacy
// keysym).
func (kb *keyboard) find(k typedKey) (keyPos, bool) {
	if p, ok := kb.byKeysym[k.ks]; ok && (!p.shift || kb.shift != 0) {
		return p, true
	}
	if k.r >= 0 {
		if p, ok := kb.byRune[k.r]; ok && (!p.shift || kb.shift != 0) {
			return p, true
		}
	}
	if kc, ok := kb.boundBy[k.ks]; ok {
		return keyPos{kc: kc}, true
	}
	return keyPos{}, false
}

// lookup is find for a key about to be pressed: a binding counts as used now.
func (kb *keyboard) lookup(k typedKey) (keyPos, bool) {
	p, ok := kb.find(k)
	if b := kb.bound[p.kc]; ok && b != nil && b.sym == k.ks {
		b.used = time.Now()
	}
	return p, ok
}

var errNoSpare = &xError{err: errors.New("the keyboard map has no spare keycode to type a key that is not on it")}

// prepare makes the longest prefix of keys typeable that the spare keycodes allow: every key not
// on the map gets a spare keycode bound to its keysym (xdotool's scratch keycode; Latin-1 as is,
// other characters as 0x01000000 | code point), keys already bound keep theirs, and no keycode
// that the prefix needs is rebound (the caller holds d.mu). It returns the prefix's length and
// whether it bound anything (then the caller waits bindSettle before typing). If a keycode
// must be rebound sooner than rebindMinAge after its last use, it does nothing and says how long
// to wait before asking again.
func (d *desktop) prepare(x *xconn, kb *keyboard, keys []typedKey) (n int, bound bool, wait time.Duration, err error) {
	slots := len(kb.free) + len(kb.bound)
	keep := map[xproto.Keycode]bool{}
	var need []xproto.Keysym
	needSet := map[xproto.Keysym]bool{}
	for ; n < len(keys); n++ {
		k := keys[n]
		p, ok := kb.find(k)
		if ok && kb.bound[p.kc] == nil {
			continue // on the map
		}
		if ok {
			if !keep[p.kc] {
				if len(keep)+len(need) == slots {
					break
				}
				keep[p.kc] = true
			}
			continue
		}
		if !needSet[k.ks] {
			if len(keep)+len(need) == slots {
				break
			}
			needSet[k.ks] = true
			need = append(need, k.ks)
		}
	}
	if n == 0 && len(keys) > 0 {
		return 0, false, 0, errNoSpare
	}
	// Keycodes for the new bindings: free ones, then the least recently used bindings that the
	// prefix does not need.
	codes := append([]xproto.Keycode(nil), kb.free...)
	if len(need) > len(codes) {
		var evict []xproto.Keycode
		for kc := range kb.bound {
			if !keep[kc] {
				evict = append(evict, kc)
			}
		}
		sort.Slice(evict, func(i, j int) bool { return kb.bound[evict[i]].used.Before(kb.bound[evict[j]].used) })
		evict = evict[:len(need)-len(codes)]
		if w := rebindMinAge - time.Since(kb.bound[evict[len(evict)-1]].used); w > 0 {
			return 0, false, w, nil
		}
		codes = append(codes, evict...)
	}
	now := time.Now()
	var cookies []xproto.ChangeKeyboardMappingCookie
	for i, ks := range need {
		kc := codes[i]
		if old := kb.bound[kc]; old != nil {
			delete(kb.boundBy, old.sym)
		}
		cookies = append(cookies, xproto.ChangeKeyboardMappingChecked(x.c, 1, kc, 2, []xproto.Keysym{ks, ks}))
		kb.bound[kc] = &binding{sym: ks, used: now}
		kb.boundBy[ks] = kc
	}
	kb.free = kb.free[min(len(kb.free), len(need)):]
	for kc := range keep {
		kb.bound[kc].used = now
	}
	// Wait until the server has the new map (Check makes a round trip, like xdotool's XSync):
	// every key event sent from now on reaches the clients after the MappingNotify.
	for _, c := range cookies {
		if err := c.Check(); err != nil {
			return 0, false, 0, asXError(x, err)
		}
	}
	if len(need) > 0 {
		d.scheduleRestore()
	}
	return n, len(need) > 0, 0, nil
}

// scheduleRestore arranges for the spare keycodes bound for typing to be unbound once unused for
// restoreAfter (the caller holds d.mu).
func (d *desktop) scheduleRestore() {
	if d.restoreTimer == nil {
		d.restoreTimer = time.AfterFunc(restoreAfter, d.restoreSpares)
	} else {
		d.restoreTimer.Reset(restoreAfter)
	}
}

func (d *desktop) restoreSpares() {
	d.mu.Lock()
	defer d.mu.Unlock()
	x := d.x
	if x == nil || x.kb == nil || x.isDead() {
		return
	}
	kb := x.kb
	if d.typing {
		d.restoreTimer.Reset(restoreAfter)
		return
	}
	var next time.Duration
	var done []xproto.Keycode
	for kc, b := range kb.bound {
		if age := time.Since(b.used); age < restoreAfter {
			if left := restoreAfter - age; next == 0 || left < next {
				next = left
			}
			continue
		}
		xproto.ChangeKeyboardMapping(x.c, 1, kc, 2, []xproto.Keysym{ksNoSymbol, ksNoSymbol})
		done = append(done, kc)
	}
	for _, kc := range done {
		delete(kb.boundBy, kb.bound[kc].sym)
		delete(kb.bound, kc)
		kb.free = append(kb.free, kc)
	}
	if len(done) > 0 {
		t := time.AfterFunc(xTimeout, func() { x.kill(errors.New("the X server did not answer")) })
		x.sync()
		t.Stop()
	}
	if next > 0 {
		d.restoreTimer.Reset(next + time.Millisecond)
	}
}

// ---- windows ----

type windowInfo struct {
	ID      uint32 `json:"id"`
	Title   string `json:"title"`
	Class   string `json:"class"`
	X       int    `json:"x"`
	Y       int    `json:"y"`
	Width   int    `json:"width"`
	Height  int    `json:"height"`
	Focused bool   `json:"focused"`
}

type windowList struct {
	Screen struct {
		Width  int `json:"width"`
		Height int `json:"height"`
	} `json:"screen"`
	Focused *uint32      `json:"focused"`
	Windows []windowInfo `json:"windows"`
}

// windows lists the top-level windows: the window manager's _NET_CLIENT_LIST (EWMH) and
// _NET_ACTIVE_WINDOW, or without one the mapped children of the root that have a WM_NAME and
// the input focus.
func (x *xconn) windows() (windowList, error) {
	var out windowList
	out.Screen.Width, out.Screen.Height = x.width, x.height
	out.Windows = []windowInfo{}
	names := []string{"_NET_CLIENT_LIST", "_NET_ACTIVE_WINDOW", "_NET_WM_NAME", "UTF8_STRING"}
	atoms := map[string]xproto.Atom{}
	for _, n := range names {
		a, err := x.atom(n)
		if err != nil {
			return out, err
		}
		atoms[n] = a
	}
	clients, err := xproto.GetProperty(x.c, false, x.root, atoms["_NET_CLIENT_LIST"], xproto.AtomWindow, 0, 1<<16).Reply()
	if err != nil {
		return out, asXError(x, err)
	}
	var ids []xproto.Window
	var focused xproto.Window
	ewmh := clients.Type == xproto.AtomWindow && clients.Format == 32
	if ewmh {
		ids = windowIDs(clients)
		act, err := xproto.GetProperty(x.c, false, x.root, atoms["_NET_ACTIVE_WINDOW"], xproto.AtomWindow, 0, 1).Reply()
		if err != nil {
			return out, asXError(x, err)
		}
		if w := windowIDs(act); len(w) == 1 {
			focused = w[0]
		}
	} else {
		ids, focused, err = x.fallbackWindows()
		if err != nil {
			return out, err
		}
	}

	// Ask for everything about every window at once, then collect: one round trip's latency.
	type pending struct {
		netName, name, class xproto.GetPropertyCookie
		geom                 xproto.GetGeometryCookie
		pos                  xproto.TranslateCoordinatesCookie
	}
	ps := make([]pending, len(ids))
	for i, w := range ids {
		ps[i] = pending{
			netName: xproto.GetProperty(x.c, false, w, atoms["_NET_WM_NAME"], atoms["UTF8_STRING"], 0, 1024),
			name:    xproto.GetProperty(x.c, false, w, xproto.AtomWmName, xproto.GetPropertyTypeAny, 0, 1024),
			class:   xproto.GetProperty(x.c, false, w, xproto.AtomWmClass, xproto.GetPropertyTypeAny, 0, 256),
			geom:    xproto.GetGeometry(x.c, xproto.Drawable(w)),
			pos:     xproto.TranslateCoordinates(x.c, w, x.root, 0, 0),
		}
	}
	for i, w := range ids {
		p := ps[i]
		netName, err1 := p.netName.Reply()
		name, err2 := p.name.Reply()
		class, err3 := p.class.Reply()
		geom, err4 := p.geom.Reply()
		pos, err5 := p.pos.Reply()
		if err := errors.Join(err1, err2, err3, err4, err5); err != nil {
			if x.isDead() {
				return out, asXError(x, err)
			}
			continue // the window went away meanwhile (BadWindow)
		}
		if netName == nil || name == nil || class == nil || geom == nil || pos == nil {
			continue
		}
		title := ""
		if netName.Format == 8 && len(netName.Value) > 0 {
			title = strings.ToValidUTF8(string(netName.Value), "\uFFFD")
		} else {
			title = textProperty(name, atoms["UTF8_STRING"])
		}
		info := windowInfo{ID: uint32(w), Title: title, Class: wmClass(class),
			X: int(pos.DstX), Y: int(pos.DstY), Width: int(geom.Width), Height: int(geom.Height),
			Focused: w == focused && focused != 0}
		out.Windows = append(out.Windows, info)
	}
	if focused != 0 {
		for _, wi := range out.Windows {
			if wi.Focused {
				id := wi.ID
				out.Focused = &id
			}
		}
	}
	return out, nil
}

func windowIDs(p *xproto.GetPropertyReply) []xproto.Window {
	if p == nil || p.Format != 32 {
		return nil
	}
	n := len(p.Value) / 4
	if int(p.ValueLen) < n {
		n = int(p.ValueLen)
	}
	ids := make([]xproto.Window, 0, n)
	for i := 0; i < n; i++ {
		if w := xproto.Window(xgb.Get32(p.Value[4*i:])); w != 0 {
			ids = append(ids, w)
		}
	}
	return ids
}

// fallbackWindows: without a window manager, the viewable children of the root that have a
// WM_NAME (bottom to top), and the top-level window that holds the input focus.
func (x *xconn) fallbackWindows() ([]xproto.Window, xproto.Window, error) {
	tree, err := xproto.QueryTree(x.c, x.root).Reply()
	if err != nil {
		return nil, 0, asXError(x, err)
	}
	type pending struct {
		attr xproto.GetWindowAttributesCookie
		name xproto.GetPropertyCookie
	}
	ps := make([]pending, len(tree.Children))
	for i, w := range tree.Children {
		ps[i] = pending{
			attr: xproto.GetWindowAttributes(x.c, w),
			name: xproto.GetProperty(x.c, false, w, xproto.AtomWmName, xproto.GetPropertyTypeAny, 0, 0),
		}
	}
	var ids []xproto.Window
	for i, w := range tree.Children {
		attr, err1 := ps[i].attr.Reply()
		name, err2 := ps[i].name.Reply()
		if err := errors.Join(err1, err2); err != nil {
			if x.isDead() {
				return nil, 0, asXError(x, err)
			}
			continue
		}
		if attr == nil || name == nil || attr.MapState != xproto.MapStateViewable || name.Type == xproto.AtomNone {
			continue
		}
		ids = append(ids, w)
	}
	focus, err := xproto.GetInputFocus(x.c).Reply()
	if err != nil {
		return nil, 0, asXError(x, err)
	}
	f := focus.Focus
	// Walk up from the focus window to its top-level window.
	for i := 0; f != 0 && f != 1 /* PointerRoot */ && f != x.root && i < 64; i++ {
		t, err := xproto.QueryTree(x.c, f).Reply()
		if err != nil {
			if x.isDead() {
				return nil, 0, asXError(x, err)
			}
			f = 0
			break
		}
		if t.Parent == x.root {
			break
		}
		f = t.Parent
	}
	if f == 1 || f == x.root {
		f = 0
	}
	return ids, f, nil
}

// textProperty decodes WM_NAME-like properties: STRING is Latin-1, UTF8_STRING is UTF-8,
// anything else (COMPOUND_TEXT) is taken as UTF-8 as far as it is valid.
func textProperty(p *xproto.GetPropertyReply, utf8String xproto.Atom) string {
	if p == nil || p.Format != 8 || len(p.Value) == 0 {
		return ""
	}
	v := p.Value[:min(len(p.Value), int(p.ValueLen))]
	if p.Type == xproto.AtomString {
		return latin1(v)
	}
	return strings.ToValidUTF8(string(v), "\uFFFD")
}

func latin1(b []byte) string {
	var sb strings.Builder
	for _, c := range b {
		sb.WriteRune(rune(c))
	}
	return sb.String()
}

// wmClass is the class part of WM_CLASS ("instance\0class\0").
func wmClass(p *xproto.GetPropertyReply) string {
	if p == nil || p.Format != 8 {
		return ""
	}
	v := p.Value[:min(len(p.Value), int(p.ValueLen))]
	parts := strings.Split(strings.TrimRight(string(v), "\x00"), "\x00")
	c := parts[len(parts)-1]
	if !utf8.ValidString(c) {
		c = latin1([]byte(c))
	}
	return c
}
