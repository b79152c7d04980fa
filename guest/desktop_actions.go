package main

// POST /desktop/actions: Anthropic's computer-use tool actions, same names and fields. The whole
// list is validated before the first action runs; then the actions run in order, each returning
// once the X server has processed its input (a round trip after the XTEST events).

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"sort"
	"strings"
	"time"

	"github.com/jezek/xgb/xproto"
)

const (
	typeDelay   = 3 * time.Millisecond // between typed characters (xdotool: 12 ms)
	clickGap    = 8 * time.Millisecond // between the clicks of a double or triple click
	dragSteps   = 8                    // pointer motions between a drag's press and release
	dragStepGap = 4 * time.Millisecond // between them
	keyGap      = 4 * time.Millisecond // between the combos of one key action
	maxDuration = 100 * time.Second    // of wait and hold_key
)

type rawAction = json.RawMessage

type point struct{ x, y int }

type action struct {
	i      int
	kind   string
	coord  *point // coordinate
	start  *point // start_coordinate
	text   string
	combos [][]xproto.Keysym // key, hold_key; modifiers of clicks and scroll (one flattened combo)
	dir    string
	amount int
	dur    time.Duration
	width  int
}

// actionFields: the fields each action takes, required ones marked with '!'.
var actionFields = map[string][]string{
	"screenshot":      {"width"},
	"mouse_move":      {"coordinate!"},
	"left_click":      {"coordinate", "text"},
	"right_click":     {"coordinate", "text"},
	"middle_click":    {"coordinate", "text"},
	"double_click":    {"coordinate", "text"},
	"triple_click":    {"coordinate", "text"},
	"left_click_drag": {"start_coordinate!", "coordinate!"},
	"left_mouse_down": {"coordinate"},
	"left_mouse_up":   {"coordinate"},
	"scroll":          {"coordinate", "scroll_direction!", "scroll_amount!", "text"},
	"type":            {"text!"},
	"key":             {"text!"},
	"hold_key":        {"text!", "duration!"},
	"cursor_position": {},
	"wait":            {"duration!"},
}

func actionNames() string {
	var n []string
	for k := range actionFields {
		n = append(n, k)
	}
	sort.Strings(n)
	return strings.Join(n, ", ")
}

func badAction(i int, field, format string, args ...any) *apiError {
	name := fmt.Sprintf("actions[%d]", i)
	if field != "" {
		name += "." + field
	}
	return errf(400, "invalid_action", name, "%s: %s", name, fmt.Sprintf(format, args...))
}

// parseActions checks everything that does not depend on the screen.
func parseActions(raw []rawAction) ([]*action, error) {
	if len(raw) == 0 {
		return nil, errf(400, "invalid_action", "actions", "actions: empty list")
	}
	if len(raw) > maxActions {
		return nil, errf(400, "invalid_action", "actions", "actions: %d actions, at most %d per request", len(raw), maxActions)
	}
	acts := make([]*action, len(raw))
	for i, r := range raw {
		a, err := parseAction(i, r)
		if err != nil {
			return nil, err
		}
		acts[i] = a
	}
	return acts, nil
}

func parseAction(i int, r rawAction) (*action, error) {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(r, &fields); err != nil || fields == nil {
		return nil, badAction(i, "", "must be an object like {\"action\": \"left_click\", ...}")
	}
	for k, v := range fields { // null is absent
		if bytes.Equal(bytes.TrimSpace(v), []byte("null")) {
			delete(fields, k)
		}
	}
	var kind string
	if v, ok := fields["action"]; !ok {
		return nil, badAction(i, "action", "missing")
	} else if json.Unmarshal(v, &kind) != nil {
		return nil, badAction(i, "action", "must be a string")
	}
	spec, ok := actionFields[kind]
	if !ok {
		return nil, badAction(i, "action", "unknown action %q (known: %s)", kind, actionNames())
	}
	allowed := map[string]bool{"action": true}
	for _, f := range spec {
		name := strings.TrimSuffix(f, "!")
		allowed[name] = true
		if strings.HasSuffix(f, "!") {
			if _, ok := fields[name]; !ok {
				return nil, badAction(i, name, "missing (required by %s)", kind)
			}
		}
	}
	var extra []string
	for k := range fields {
		if !allowed[k] {
			extra = append(extra, k)
		}
	}
	if len(extra) > 0 {
		sort.Strings(extra)
		return nil, badAction(i, extra[0], "not a field of %s", kind)
	}

	a := &action{i: i, kind: kind}
	var err error
	if v, ok := fields["coordinate"]; ok {
		if a.coord, err = parsePoint(v); err != nil {
			return nil, badAction(i, "coordinate", "%v", err)
		}
	}
	if v, ok := fields["start_coordinate"]; ok {
		if a.start, err = parsePoint(v); err != nil {
			return nil, badAction(i, "start_coordinate", "%v", err)
		}
	}
	if v, ok := fields["text"]; ok {
		if json.Unmarshal(v, &a.text) != nil {
			return nil, badAction(i, "text", "must be a string")
		}
		switch kind {
		case "type":
			if a.text == "" {
				return nil, badAction(i, "text", "must not be empty")
			}
			for _, c := range a.text {
				if (c < 0x20 && c != '\n' && c != '\t' && c != '\r') || (c >= 0x7f && c < 0xa0) {
					return nil, badAction(i, "text", "cannot type the control character U+%04X", c)
				}
			}
		case "key", "hold_key":
			if a.combos, err = parseKeyCombos(a.text); err != nil {
				return nil, badAction(i, "text", "%v", err)
			}
		default: // modifiers held during a click or scroll: "shift", "ctrl+shift"
			if strings.TrimSpace(a.text) != "" {
				combos, err := parseKeyCombos(strings.ReplaceAll(a.text, " ", "+"))
				if err != nil {
					return nil, badAction(i, "text", "modifier keys: %v", err)
				}
				a.combos = combos
			}
		}
	}
	if v, ok := fields["scroll_direction"]; ok {
		if json.Unmarshal(v, &a.dir) != nil {
			return nil, badAction(i, "scroll_direction", "must be a string")
		}
		if _, ok := scrollButtons[a.dir]; !ok {
			return nil, badAction(i, "scroll_direction", "%q is not up, down, left or right", a.dir)
		}
	}
	if v, ok := fields["scroll_amount"]; ok {
		n, err := parseInt(v)
		if err != nil || n < 1 || n > 100 {
			return nil, badAction(i, "scroll_amount", "must be an integer from 1 to 100")
		}
		a.amount = n
	}
	if v, ok := fields["duration"]; ok {
		var f float64
		if json.Unmarshal(v, &f) != nil || math.IsNaN(f) || f <= 0 || f > maxDuration.Seconds() {
			return nil, badAction(i, "duration", "must be a number of seconds, more than 0 and at most %v", maxDuration.Seconds())
		}
		a.dur = time.Duration(f * float64(time.Second))
	}
	if v, ok := fields["width"]; ok {
		n, err := parseInt(v)
		if err != nil || n < 1 {
			return nil, badAction(i, "width", "must be a positive integer")
		}
		a.width = n
	}
	return a, nil
}

var scrollButtons = map[string]byte{"up": 4, "down": 5, "left": 6, "right": 7}

func parseInt(v json.RawMessage) (int, error) {
	var f float64
	if err := json.Unmarshal(v, &f); err != nil {
		return 0, err
	}
	if f != math.Trunc(f) || math.Abs(f) > 1<<31 {
		return 0, errors.New("not an integer")
	}
	return int(f), nil
}

func parsePoint(v json.RawMessage) (*point, error) {
	var xy []json.RawMessage
	if json.Unmarshal(v, &xy) != nil || len(xy) != 2 {
		return nil, errors.New("must be [x, y], two integers")
	}
	x, err1 := parseInt(xy[0])
	y, err2 := parseInt(xy[1])
	if err1 != nil || err2 != nil {
		return nil, errors.New("must be [x, y], two integers")
	}
	return &point{x, y}, nil
}

// checkScreen checks what depends on the screen's size.
func (a *action) checkScreen(w, h int) error {
	for _, c := range []struct {
		name string
		p    *point
	}{{"start_coordinate", a.start}, {"coordinate", a.coord}} {
		if c.p != nil && (c.p.x < 0 || c.p.y < 0 || c.p.x >= w || c.p.y >= h) {
			return badAction(a.i, c.name, "(%d, %d) is off the %d×%d screen", c.p.x, c.p.y, w, h)
		}
	}
	if a.width > w {
		return badAction(a.i, "width", "%d is wider than the %d×%d screen", a.width, w, h)
	}
	return nil
}

// run validates the list against the screen, then runs it (the caller holds actMu).
func (d *desktop) run(ctx context.Context, acts []*action) ([]any, error) {
	var x *xconn
	var w, h int
	if err := d.withX(nil, func(c *xconn) error {
		x, w, h = c, c.width, c.height
		if c.xtestErr != nil {
			for _, a := range acts {
				if a.kind != "screenshot" && a.kind != "cursor_position" && a.kind != "wait" {
					return errf(502, "desktop_error", "", "actions[%d] (%s): %v", a.i, a.kind, c.xtestErr)
				}
			}
		}
		return nil
	}); err != nil {
		return nil, err
	}
	for _, a := range acts {
		if err := a.checkScreen(w, h); err != nil {
			return nil, err
		}
	}
	results := make([]any, len(acts))
	for _, a := range acts {
		res, err := d.runAction(ctx, x, a)
		if err != nil {
			var ae *apiError
			switch {
			case errors.As(err, &ae):
				return nil, err
			case ctx.Err() != nil:
				return nil, errf(499, "canceled", "", "actions[%d] (%s): request canceled", a.i, a.kind)
			}
			var xe *xError
			if errors.As(err, &xe) {
				return nil, errf(502, "desktop_error", "", "actions[%d] (%s): %v", a.i, a.kind, err)
			}
			return nil, errf(500, "internal", "", "actions[%d] (%s): %v", a.i, a.kind, err)
		}
		results[a.i] = res
	}
	return results, nil
}

type empty struct{}

func (d *desktop) runAction(ctx context.Context, x *xconn, a *action) (any, error) {
	if a.kind == "type" || len(a.combos) > 0 {
		d.setTyping(true)
		defer d.setTyping(false)
	}
	switch a.kind {
	case "screenshot":
		png, err := d.screenshotPNG(x, a.width)
		if err != nil {
			return nil, err
		}
		return map[string]string{"type": "image", "media_type": "image/png", "data": base64.StdEncoding.EncodeToString(png)}, nil

	case "cursor_position":
		var px, py int
		err := d.withX(x, func(x *xconn) error {
			var err error
			px, py, err = x.pointer()
			return err
		})
		return map[string]int{"x": px, "y": py}, err

	case "wait":
		return empty{}, sleepCtx(ctx, a.dur)

	case "mouse_move":
		return empty{}, d.withX(x, func(x *xconn) error {
			if err := x.move(a.coord.x, a.coord.y); err != nil {
				return err
			}
			return x.sync()
		})

	case "left_click", "right_click", "middle_click", "double_click", "triple_click":
		b, n := byte(1), 1
		switch a.kind {
		case "right_click":
			b = 3
		case "middle_click":
			b = 2
		case "double_click":
			n = 2
		case "triple_click":
			n = 3
		}
		if err := d.prepareModifiers(ctx, x, a); err != nil {
			return nil, err
		}
		return empty{}, d.withX(x, func(x *xconn) error {
			return d.withModifiers(x, a, func() error {
				for k := 0; k < n; k++ {
					if k > 0 {
						time.Sleep(clickGap)
					}
					if err := x.button(b, true); err != nil {
						return err
					}
					if err := x.button(b, false); err != nil {
						return err
					}
					if err := x.sync(); err != nil {
						return err
					}
				}
				return nil
			})
		})

	case "left_mouse_down", "left_mouse_up":
		return empty{}, d.withX(x, func(x *xconn) error {
			if a.coord != nil {
				if err := x.move(a.coord.x, a.coord.y); err != nil {
					return err
				}
			}
			if err := x.button(1, a.kind == "left_mouse_down"); err != nil {
				return err
			}
			return x.sync()
		})

	case "left_click_drag":
		return empty{}, d.withX(x, func(x *xconn) error {
			if err := x.move(a.start.x, a.start.y); err != nil {
				return err
			}
			if err := x.button(1, true); err != nil {
				return err
			}
			if err := x.sync(); err != nil {
				return err
			}
			for k := 1; k <= dragSteps; k++ {
				time.Sleep(dragStepGap)
				px := a.start.x + (a.coord.x-a.start.x)*k/dragSteps
				py := a.start.y + (a.coord.y-a.start.y)*k/dragSteps
				if err := x.move(px, py); err != nil {
					return err
				}
				if err := x.sync(); err != nil {
					return err
				}
			}
			if err := x.button(1, false); err != nil {
				return err
			}
			return x.sync()
		})

	case "scroll":
		b := scrollButtons[a.dir]
		if err := d.prepareModifiers(ctx, x, a); err != nil {
			return nil, err
		}
		return empty{}, d.withX(x, func(x *xconn) error {
			return d.withModifiers(x, a, func() error {
				for k := 0; k < a.amount; k++ {
					if err := x.button(b, true); err != nil {
						return err
					}
					if err := x.button(b, false); err != nil {
						return err
					}
				}
				return x.sync()
			})
		})

	case "key":
		for k, combo := range a.combos {
			if k > 0 {
				if err := sleepCtx(ctx, keyGap); err != nil {
					return nil, err
				}
			}
			if err := d.prepareKeys(ctx, x, combo); err != nil {
				return nil, err
			}
			err := d.withX(x, func(x *xconn) error {
				codes, err := d.pressKeys(x, combo)
				if err != nil {
					return err
				}
				return x.releaseKeys(codes)
			})
			if err != nil {
				return nil, err
			}
		}
		return empty{}, nil

	case "hold_key":
		var all []xproto.Keysym
		for _, c := range a.combos {
			all = append(all, c...)
		}
		if err := d.prepareKeys(ctx, x, all); err != nil {
			return nil, err
		}
		var codes []xproto.Keycode
		if err := d.withX(x, func(x *xconn) error {
			var err error
			codes, err = d.pressKeys(x, all)
			return err
		}); err != nil {
			return nil, err
		}
		slept := sleepCtx(ctx, a.dur)
		// Release even if the request was canceled.
		err := d.withX(x, func(x *xconn) error { return x.releaseKeys(codes) })
		return empty{}, errors.Join(slept, err)

	case "type":
		return empty{}, d.typeText(ctx, x, a.text)
	}
	return nil, fmt.Errorf("unknown action %q", a.kind)
}

func (d *desktop) setTyping(on bool) {
	d.mu.Lock()
	d.typing = on
	d.mu.Unlock()
}

// withModifiers moves the pointer to the action's coordinate if it has one, and runs f with the
// action's modifier keys held.
func (d *desktop) withModifiers(x *xconn, a *action, f func() error) error {
	if a.coord != nil {
		if err := x.move(a.coord.x, a.coord.y); err != nil {
			return err
		}
	}
	var codes []xproto.Keycode
	if len(a.combos) > 0 {
		var err error
		if codes, err = d.pressKeys(x, a.combos[0]); err != nil {
			return err
		}
	}
	err := f()
	if rerr := x.releaseKeys(codes); err == nil {
		err = rerr
	}
	return err
}

// prepareModifiers makes the action's modifier keys typeable (see prepareKeys).
func (d *desktop) prepareModifiers(ctx context.Context, x *xconn, a *action) error {
	if len(a.combos) == 0 {
		return nil
	}
	return d.prepareKeys(ctx, x, a.combos[0])
}

// prepareKeys makes keys that are pressed together typeable: keys not on the keyboard map get
// spare keycodes, then the clients get bindSettle to read the new map.
func (d *desktop) prepareKeys(ctx context.Context, x *xconn, keys []xproto.Keysym) error {
	tk := make([]typedKey, len(keys))
	for i, ks := range keys {
		tk[i] = typedKey{ks: ks, r: -1}
	}
	for {
		var n int
		var bound bool
		var wait time.Duration
		err := d.withX(x, func(x *xconn) error {
			kb, err := x.keyboard()
			if err != nil {
				return err
			}
			n, bound, wait, err = d.prepare(x, kb, tk)
			return err
		})
		switch {
		case err != nil:
			return err
		case wait > 0:
			if err := sleepCtx(ctx, wait); err != nil {
				return err
			}
		case n < len(tk):
			return errNoSpare
		case bound:
			return sleepCtx(ctx, bindSettle)
		default:
			return nil
		}
	}
}

// pressKeys presses the keys in order (with Shift before a key on the shifted level, unless
// already down) and waits until the server has them; it returns the keycodes to release. The
// keys must have been prepared. On failure the keys pressed so far are released.
func (d *desktop) pressKeys(x *xconn, keys []xproto.Keysym) ([]xproto.Keycode, error) {
	kb, err := x.keyboard()
	if err != nil {
		return nil, err
	}
	var codes []xproto.Keycode
	down := map[xproto.Keycode]bool{}
	push := func(kc xproto.Keycode) error {
		if down[kc] {
			return nil
		}
		if err := x.key(kc, true); err != nil {
			return err
		}
		down[kc] = true
		codes = append(codes, kc)
		return nil
	}
	for _, ks := range keys {
		p, ok := kb.lookup(typedKey{ks: ks, r: -1})
		var err error
		if !ok {
			err = fmt.Errorf("keysym %#x lost its spare keycode", ks)
		}
		if err == nil && p.shift {
			err = push(kb.shift)
		}
		if err == nil {
			err = push(p.kc)
		}
		if err != nil {
			x.releaseKeys(codes)
			return nil, err
		}
	}
	if err := x.sync(); err != nil {
		return nil, err
	}
	return codes, nil
}

// releaseKeys releases keycodes in reverse order and waits until the server has done it.
func (x *xconn) releaseKeys(codes []xproto.Keycode) error {
	var first error
	for k := len(codes) - 1; k >= 0; k-- {
		if err := x.key(codes[k], false); err != nil && first == nil {
			first = err
		}
	}
	if len(codes) == 0 {
		return first
	}
	if err := x.sync(); err != nil && first == nil {
		first = err
	}
	return first
}

// textKeys: the keys that type text; "\n" (and "\r\n", "\r") is Return, "\t" is Tab.
func textKeys(text string) []typedKey {
	rs := []rune(text)
	keys := make([]typedKey, 0, len(rs))
	for k := 0; k < len(rs); k++ {
		switch r := rs[k]; r {
		case '\r':
			if k+1 < len(rs) && rs[k+1] == '\n' {
				k++
			}
			keys = append(keys, typedKey{ksReturn, -1})
		case '\n':
			keys = append(keys, typedKey{ksReturn, -1})
		case '\t':
			keys = append(keys, typedKey{ksTab, -1})
		default:
			keys = append(keys, typedKey{runeKeysym(r), r})
		}
	}
	return keys
}

// typeText types text one character at a time: a character on the keyboard map by its keycode
// (with Shift for the shifted level), any other through a spare keycode bound to its keysym. It
// goes in stretches: as many characters as the spare keycodes can hold are bound at once, then
// typed after bindSettle. Caps Lock, if on, is off while typing (else "Hello" would arrive as
// "hELLO").
func (d *desktop) typeText(ctx context.Context, x *xconn, text string) (err error) {
	keys := textKeys(text)
	var kb *keyboard // loaded once: the MappingNotify events of our own bindings need no reload
	var capsKC xproto.Keycode
	defer func() {
		if capsKC != 0 { // Caps Lock back on
			rerr := d.withX(x, func(x *xconn) error { return x.tap(capsKC) })
			if err == nil {
				err = rerr
			}
		}
	}()
	for pos := 0; pos < len(keys); {
		var n int
		var bound bool
		var wait time.Duration
		err := d.withX(x, func(x *xconn) error {
			if kb == nil {
				var err error
				if kb, err = x.keyboard(); err != nil {
					return err
				}
				q, err := xproto.QueryPointer(x.c, x.root).Reply()
				if err != nil {
					return asXError(x, err)
				}
				if p, ok := kb.byKeysym[ksCapsLock]; ok && q.Mask&xproto.ModMaskLock != 0 {
					if err := x.tap(p.kc); err != nil {
						return err
					}
					capsKC = p.kc
				}
			}
			var err error
			n, bound, wait, err = d.prepare(x, kb, keys[pos:])
			return err
		})
		if err != nil {
			return err
		}
		if wait > 0 {
			if err := sleepCtx(ctx, wait); err != nil {
				return err
			}
			continue
		}
		if bound {
			if err := sleepCtx(ctx, bindSettle); err != nil {
				return err
			}
		}
		for _, k := range keys[pos : pos+n] {
			if pos > 0 {
				if err := sleepCtx(ctx, typeDelay); err != nil {
					return err
				}
			}
			pos++
			err := d.withX(x, func(x *xconn) error {
				p, ok := kb.lookup(k)
				if !ok {
					return fmt.Errorf("keysym %#x lost its spare keycode", k.ks)
				}
				if p.shift {
					if err := x.key(kb.shift, true); err != nil {
						return err
					}
				}
				x.key(p.kc, true)
				x.key(p.kc, false)
				if p.shift {
					x.key(kb.shift, false)
				}
				return x.sync()
			})
			if err != nil {
				return err
			}
		}
	}
	return nil
}

// tap presses and releases a key and waits until the server has done it.
func (x *xconn) tap(kc xproto.Keycode) error {
	if err := x.key(kc, true); err != nil {
		return err
	}
	if err := x.key(kc, false); err != nil {
		return err
	}
	return x.sync()
}
