"""Agent sessions: a conversation with an agent in one sandbox, over a WebSocket (docs/sessions.md)."""
