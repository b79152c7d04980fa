"""e2a: disposable, gVisor-isolated Linux sandboxes for AI agents."""

__version__ = "0.1.0"
