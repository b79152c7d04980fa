"""Mock of the anthropic API (see server.py)."""

from starlette.routing import Route


def routes(mock) -> list[Route]:
    return []
