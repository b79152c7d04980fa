package main

import (
	"os"
	"syscall"
	"time"
)

// On Kubernetes the kubelet binds a file of the node's disk at /dev/termination-log in every
// container, writable, and no ephemeral-storage limit counts what is written there
// (kubernetes/kubernetes#122224): code in a sandbox could fill the node's disk through it.
// envd keeps it small: past termLogMax bytes (its length or the blocks it holds), it is
// truncated. The kubelet reads no more than its first 4 KiB anyway.
const (
	termLogPath  = "/dev/termination-log"
	termLogMax   = 64 << 10
	termLogEvery = 500 * time.Millisecond
)

// watchTermLog truncates path whenever it holds more than max bytes, looking every `every`,
// until stop is closed; it returns at once if there is no such file (not on Kubernetes).
func watchTermLog(path string, max int64, every time.Duration, logf func(string, ...any),
	stop <-chan struct{}) {
	if _, err := os.Stat(path); err != nil {
		return
	}
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		st, err := os.Stat(path)
		if err != nil {
			continue
		}
		held := st.Size()
		if sys, ok := st.Sys().(*syscall.Stat_t); ok && sys.Blocks*512 > held {
			held = sys.Blocks * 512 // a sparse file written at a far offset
		}
		if held > max {
			if err := os.Truncate(path, 0); err == nil {
				logf("%s held %d bytes: truncated (it is on the node's disk, outside every limit)",
					path, held)
			}
		}
	}
}
