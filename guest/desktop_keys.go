package main

// Key names in xdotool's syntax ("ctrl+shift+t", "Return", "KP_Enter", "a", "é"): X11's keysym
// names as XStringToKeysym knows them (desktop_keysyms.go, generated from keysymdef.h and
// XF86keysym.h), xdotool's aliases (ctrl, alt, shift, super, meta) and a few more that models
// write (cmd, win, enter, esc, pgdn, ...), names in any case when that is unambiguous, single
// characters, and the forms "U+20AC"/"U20AC" and "0xff0d".

//go:generate sh -c "go run desktop_keysyms_gen.go > desktop_keysyms.go"

import (
	"fmt"
	"strconv"
	"strings"
	"sync"
	"unicode/utf8"

	"github.com/jezek/xgb/xproto"
)

const (
	ksNoSymbol  xproto.Keysym = 0
	ksBackSpace xproto.Keysym = 0xff08
	ksTab       xproto.Keysym = 0xff09
	ksReturn    xproto.Keysym = 0xff0d
	ksShiftL    xproto.Keysym = 0xffe1
	ksCapsLock  xproto.Keysym = 0xffe5
)

var keysyms struct {
	once   sync.Once
	byName map[string]xproto.Keysym // exact names
	byLow  map[string]xproto.Keysym // lower-cased names that no other name shares
	toRune map[xproto.Keysym]rune   // keysyms outside Latin-1 and the Unicode range that stand for one character
}

// keyAliases are looked up lower-cased, after the exact names.
var keyAliases = map[string]string{
	"ctrl": "Control_L", "control": "Control_L", "ctrl_l": "Control_L", "ctrl_r": "Control_R",
	"lctrl": "Control_L", "rctrl": "Control_R",
	"alt": "Alt_L", "option": "Alt_L", "lalt": "Alt_L", "ralt": "Alt_R", "altgr": "ISO_Level3_Shift",
	"shift": "Shift_L", "lshift": "Shift_L", "rshift": "Shift_R",
	"super": "Super_L", "cmd": "Super_L", "command": "Super_L", "win": "Super_L", "windows": "Super_L",
	"meta":  "Meta_L",
	"enter": "Return", "return": "Return", "esc": "Escape", "del": "Delete", "ins": "Insert",
	"backspace": "BackSpace", "bksp": "BackSpace",
	"pageup": "Prior", "pgup": "Prior", "pagedown": "Next", "pgdn": "Next",
	"arrowup": "Up", "arrowdown": "Down", "arrowleft": "Left", "arrowright": "Right",
	"capslock": "Caps_Lock", "numlock": "Num_Lock", "scrolllock": "Scroll_Lock",
	"printscreen": "Print", "prtsc": "Print", "prtscr": "Print",
	"spacebar": "space", "break": "Break",
}

func loadKeysyms() {
	keysyms.once.Do(func() {
		byName := make(map[string]xproto.Keysym, 2600)
		byLow := make(map[string]xproto.Keysym, 2600)
		ambiguous := map[string]bool{}
		toRune := make(map[xproto.Keysym]rune, 1000)
		for line := range strings.SplitSeq(keysymData, "\n") {
			f := strings.Fields(line)
			if len(f) < 2 {
				continue
			}
			v, err := strconv.ParseUint(f[1], 16, 32)
			if err != nil {
				continue
			}
			ks := xproto.Keysym(v)
			byName[f[0]] = ks
			low := strings.ToLower(f[0])
			if old, ok := byLow[low]; ok && old != ks {
				ambiguous[low] = true
			} else {
				byLow[low] = ks
			}
			if len(f) == 3 {
				if u, err := strconv.ParseUint(f[2], 16, 32); err == nil {
					if _, dup := toRune[ks]; !dup {
						toRune[ks] = rune(u)
					}
				}
			}
		}
		for low := range ambiguous {
			delete(byLow, low)
		}
		keysyms.byName, keysyms.byLow, keysyms.toRune = byName, byLow, toRune
	})
}

// keysymToRune is the character a keysym types, or -1.
func keysymToRune(ks xproto.Keysym) rune {
	switch {
	case ks >= 0x20 && ks <= 0x7e, ks >= 0xa0 && ks <= 0xff:
		return rune(ks)
	case ks >= 0x01000100 && ks <= 0x0110ffff:
		return rune(ks & 0xffffff)
	}
	loadKeysyms()
	if r, ok := keysyms.toRune[ks]; ok {
		return r
	}
	return -1
}

// runeKeysym is the keysym a spare keycode is bound to for typing r: Latin-1 as is, anything else
// as 0x01000000 | code point (what xdotool and XStringToKeysym("U....") do).
func runeKeysym(r rune) xproto.Keysym {
	if (r >= 0x20 && r <= 0x7e) || (r >= 0xa0 && r <= 0xff) {
		return xproto.Keysym(r)
	}
	return xproto.Keysym(0x01000000 | r)
}

// lookupKeysym resolves one key name.
func lookupKeysym(name string) (xproto.Keysym, bool) {
	loadKeysyms()
	if ks, ok := keysyms.byName[name]; ok {
		return ks, true
	}
	low := strings.ToLower(name)
	if a, ok := keyAliases[low]; ok {
		return keysyms.byName[a], true
	}
	if ks, ok := keysyms.byLow[low]; ok {
		return ks, true
	}
	if utf8.RuneCountInString(name) == 1 {
		r, _ := utf8.DecodeRuneInString(name)
		if r >= 0x20 && r != 0x7f && !(r >= 0x80 && r < 0xa0) && r != utf8.RuneError {
			return runeKeysym(r), true
		}
		return 0, false
	}
	// U+20AC, U20AC: a character; 0xff0d: a keysym value.
	if len(name) > 1 && (name[0] == 'U' || name[0] == 'u') {
		hex := strings.TrimPrefix(name[1:], "+")
		if v, err := strconv.ParseUint(hex, 16, 32); err == nil && v >= 0x20 && v <= 0x10ffff && !(v >= 0x7f && v < 0xa0) {
			return runeKeysym(rune(v)), true
		}
	}
	if strings.HasPrefix(low, "0x") {
		if v, err := strconv.ParseUint(low[2:], 16, 32); err == nil && v > 0 && v <= 0x1fffffff {
			return xproto.Keysym(v), true
		}
	}
	return 0, false
}

// parseKeyCombos parses xdotool key syntax: combos separated by spaces, keys in a combo joined by
// '+' ("ctrl+a BackSpace"); "+" alone, or at the end as in "ctrl++", is the plus key.
func parseKeyCombos(text string) ([][]xproto.Keysym, error) {
	var combos [][]xproto.Keysym
	for combo := range strings.FieldsSeq(text) {
		var names []string
		switch {
		case combo == "+":
			names = []string{"+"}
		case strings.HasSuffix(combo, "++"):
			names = append(strings.Split(combo[:len(combo)-2], "+"), "+")
		default:
			names = strings.Split(combo, "+")
		}
		var keys []xproto.Keysym
		for _, n := range names {
			if n == "" {
				return nil, fmt.Errorf("%q: empty key name in combination", combo)
			}
			ks, ok := lookupKeysym(n)
			if !ok {
				return nil, fmt.Errorf("unknown key name %q", n)
			}
			keys = append(keys, ks)
		}
		combos = append(combos, keys)
	}
	if len(combos) == 0 {
		return nil, fmt.Errorf("no key given")
	}
	return combos, nil
}

// isModifierKeysym: keys that are pressed by keycode only, never with an added Shift.
func isModifierKeysym(ks xproto.Keysym) bool {
	switch {
	case ks >= 0xffe1 && ks <= 0xffee: // Shift_L .. Hyper_R
		return true
	case ks == 0xfe03 || ks == 0xfe11 || ks == 0xff7e || ks == 0xff7f: // ISO_Level3_Shift, ISO_Level5_Shift, Mode_switch, Num_Lock
		return true
	}
	return false
}
