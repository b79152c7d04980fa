//go:build ignore

// Generates desktop_keysyms.go from X11's keysymdef.h and XF86keysym.h (Debian: x11proto-dev):
//
//	go run desktop_keysyms_gen.go > desktop_keysyms.go
package main

import (
	"bufio"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
)

func main() {
	re := regexp.MustCompile(`^#define (XK_|XF86XK_)(\w+)\s+(0x[0-9a-fA-F]+|_EVDEVK\(0x[0-9a-fA-F]+\))\s*(?:/\*\s*(\(?)U\+([0-9A-Fa-f]{4,6}))?`)
	seen := map[string]bool{}
	var b strings.Builder
	n := 0
	for _, f := range []string{"/usr/include/X11/keysymdef.h", "/usr/include/X11/XF86keysym.h"} {
		fh, err := os.Open(f)
		if err != nil {
			panic(err)
		}
		sc := bufio.NewScanner(fh)
		for sc.Scan() {
			m := re.FindStringSubmatch(sc.Text())
			if m == nil {
				continue
			}
			name := m[2]
			if m[1] == "XF86XK_" {
				name = "XF86" + name
			}
			if seen[name] {
				continue
			}
			seen[name] = true
			var ks uint64
			if strings.HasPrefix(m[3], "_EVDEVK") {
				v, _ := strconv.ParseUint(m[3][10:len(m[3])-1], 16, 32)
				ks = 0x10081000 + v
			} else {
				ks, _ = strconv.ParseUint(m[3][2:], 16, 32)
			}
			line := fmt.Sprintf("%s %x", name, ks)
			if m[5] != "" && m[4] == "" {
				u, _ := strconv.ParseUint(m[5], 16, 32)
				isLatin1 := (ks >= 0x20 && ks <= 0x7e) || (ks >= 0xa0 && ks <= 0xff)
				isUni := ks&0xff000000 == 0x01000000
				if !isLatin1 && !isUni {
					line += fmt.Sprintf(" %x", u)
				}
			}
			b.WriteString(line + "\n")
			n++
		}
		fh.Close()
	}
	fmt.Printf(`// Code generated from X11's keysymdef.h and XF86keysym.h (x11proto-dev 2022.1); DO NOT EDIT.

package main

// keysymData holds every keysym name XStringToKeysym knows: one "name hex" per line, then, for
// keysyms outside Latin-1 and the Unicode range (0x01000000 | code point) that stand for one
// Unicode character, that character's code point in hex. %d names.
const keysymData = %s
`, n, "`"+b.String()+"`")
}
