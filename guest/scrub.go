package main

import (
	"bytes"
	"fmt"
	"os"
	"strings"
	"unsafe"
)

// scrubInitialEnv overwrites the variable name (name=value) with NUL bytes in the process's
// initial environment block, the memory /proc/<pid>/environ shows. os.Unsetenv only drops
// Go's copy; without this the token would stay readable in /proc/1/environ for as long as
// envd runs.
//
// The kernel (Linux and gVisor alike) lays out argv's strings and then envp's strings back to
// back on the initial stack, and Go's os.Args strings point into that memory (the runtime does
// not copy them), so the block starts one byte after the last argument's terminating NUL. The
// block is read and written through /proc/self/mem, which fails cleanly (EIO) instead of
// faulting if that assumption does not hold, and only after its contents matched the
// environment exactly.
func scrubInitialEnv(name string) error {
	env := os.Environ() // the initial environment, in its initial order (nothing set yet)
	if len(os.Args) == 0 || os.Args[len(os.Args)-1] == "" {
		return fmt.Errorf("cannot locate the environment block")
	}
	var want bytes.Buffer
	found := -1
	for _, kv := range env {
		if strings.HasPrefix(kv, name+"=") && found < 0 {
			found = want.Len()
		}
		want.WriteString(kv)
		want.WriteByte(0)
	}
	if found < 0 {
		return nil
	}
	last := os.Args[len(os.Args)-1]
	start := int64(uintptr(unsafe.Pointer(unsafe.StringData(last)))) + int64(len(last)) + 1
	mem, err := os.OpenFile("/proc/self/mem", os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer mem.Close()
	got := make([]byte, want.Len())
	if _, err := mem.ReadAt(got, start); err != nil {
		return fmt.Errorf("reading the environment block: %w", err)
	}
	if !bytes.Equal(got, want.Bytes()) {
		return fmt.Errorf("the environment block is not where expected")
	}
	entry := bytes.IndexByte(got[found:], 0)
	if _, err := mem.WriteAt(make([]byte, entry), start+int64(found)); err != nil {
		return fmt.Errorf("overwriting %s: %w", name, err)
	}
	return nil
}
