module e2a.dev/guest

go 1.26

require (
	github.com/coder/websocket v1.8.15
	github.com/creack/pty v1.1.24
	github.com/jezek/xgb v1.1.1
)
