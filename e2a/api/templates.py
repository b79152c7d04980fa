"""`GET /v1/templates`: each template's size, what it holds, and whether its image is built."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from e2a.api.deps import current_user
from e2a.api.schemas import TemplateOut
from e2a.auth import Caller
from e2a.templates import builder, recipes

router = APIRouter(prefix="/v1/templates", tags=["templates"])


@router.get("", response_model=list[TemplateOut], responses={401: {}})
async def list_templates(request: Request,
                         user: Caller = Depends(current_user)) -> list[TemplateOut]:
    settings = request.app.state.settings
    out = []
    for name in recipes.available():
        recipe = recipes.load(name)
        out.append(TemplateOut(**recipe.summary(),
                               built=builder.is_built(settings.cache_dir, recipe),
                               warm_pool=settings.pool_size_of(name, recipe.pool_size)))
    return out
