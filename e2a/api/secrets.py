"""Secret bundle routes (docs/secrets.md): a tenant's named sets of secrets (its own LLM key,
base URL, model, ...), stored encrypted and used when a session starts.

No answer holds a value: only the bundle's name, its key names, version and times. The request
models take `values` as any JSON object, so that pydantic's validation (whose errors name the
offending field) never sees a value's type; e2a/secrets/bundles.py checks each one and names its
key, never its value. A request validation error's body holds the field and pydantic's message,
never the input (e2a/api/errors.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from e2a.api.deps import current_user
from e2a.api.errors import ApiError
from e2a.auth import Caller
from e2a.secrets.bundles import (KEY_PATTERN, MAX_KEYS, MAX_VALUE_BYTES, NAME_PATTERN,
                                 BundleInfo, Bundles, SecretsError)

router = APIRouter(prefix="/v1/tenants/me/secrets", tags=["secrets"])

_VALUE = {"type": "string", "maxLength": MAX_VALUE_BYTES}
Values = Annotated[dict[str, Any], WithJsonSchema({
    "type": "object",
    "description": f"the secrets, by name (matching {KEY_PATTERN}); at most {MAX_KEYS} keys, "
                   f"each value at most {MAX_VALUE_BYTES} bytes of UTF-8. LLM_API_KEY is "
                   "required; LLM_BASE_URL, if given, is an http(s) URL",
    "required": ["LLM_API_KEY"],
    "properties": {"LLM_API_KEY": {"type": "string", "minLength": 1, "maxLength": MAX_VALUE_BYTES},
                   "LLM_BASE_URL": {"type": "string", "format": "uri"},
                   "LLM_MODEL": _VALUE, "LLM_VENDOR": _VALUE},
    "additionalProperties": _VALUE,
    "maxProperties": MAX_KEYS,
})]
Name = Annotated[str, WithJsonSchema({"type": "string", "pattern": NAME_PATTERN,
                                      "maxLength": 63})]


class SecretCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    values: Values


class SecretReplace(BaseModel):
    model_config = ConfigDict(extra="forbid")

    values: Values
    # May repeat the path's name (the same body as a create); a bundle is never renamed.
    name: Name | None = None


class SecretOut(BaseModel):
    name: str
    keys: list[str] = Field(description="the names of its values (never a value)")
    version: int = Field(description="1 when created, +1 per PUT")
    created_at: datetime
    updated_at: datetime


class SecretsOut(BaseModel):
    secrets: list[SecretOut]


def bundles(request: Request) -> Bundles:
    return request.app.state.secrets


def out(info: BundleInfo) -> SecretOut:
    return SecretOut(name=info.name, keys=info.keys, version=info.version,
                     created_at=info.created_at, updated_at=info.updated_at)


async def call(coro):
    try:
        return await coro
    except SecretsError as exc:
        raise ApiError(exc.status, exc.code, exc.message, exc.field) from None


@router.post("", status_code=201, response_model=SecretOut,
             responses={400: {}, 401: {}, 409: {}})
async def create_secret(req: SecretCreate, user: Caller = Depends(current_user),
                        store: Bundles = Depends(bundles)) -> SecretOut:
    """Store a bundle, encrypted. Answers its name and key names, never a value."""
    return out(await call(store.create(user.id, req.name, req.values)))


@router.get("", response_model=SecretsOut, responses={401: {}})
async def list_secrets(user: Caller = Depends(current_user),
                       store: Bundles = Depends(bundles)) -> SecretsOut:
    return SecretsOut(secrets=[out(i) for i in await store.list(user.id)])


@router.get("/{name}", response_model=SecretOut, responses={401: {}, 404: {}})
async def get_secret(name: str, user: Caller = Depends(current_user),
                     store: Bundles = Depends(bundles)) -> SecretOut:
    return out(await call(store.get(user.id, name)))


@router.put("/{name}", response_model=SecretOut, responses={400: {}, 401: {}, 404: {}})
async def replace_secret(name: str, req: SecretReplace, user: Caller = Depends(current_user),
                         store: Bundles = Depends(bundles)) -> SecretOut:
    """Rotate: the whole set of values replaced (keys left out are removed), version + 1.
    Running sessions that name the bundle get the new values without a restart."""
    if req.name is not None and req.name != name:
        raise ApiError(400, "invalid_field", "name differs from the bundle in the path: a "
                       "bundle cannot be renamed (create the new one, delete the old)", "name")
    return out(await call(store.replace(user.id, name, req.values)))


@router.delete("/{name}", status_code=204, response_class=Response,
               responses={401: {}, 404: {}})
async def delete_secret(name: str, user: Caller = Depends(current_user),
                        store: Bundles = Depends(bundles)) -> Response:
    await call(store.delete(user.id, name))
    return Response(status_code=204)
