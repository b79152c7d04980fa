"""Prints the OpenAPI document (committed as docs/openapi.json; a test keeps the two equal)."""

import json

from e2a.api.app import create_app


def document() -> dict:
    return create_app(with_runtime=False).openapi()


if __name__ == "__main__":
    print(json.dumps(document(), indent=2, sort_keys=True))
