"""Workspace routes (docs/workspaces.md): list, usage, files (paged), presigned URLs, deletes.

Only the owner sees a workspace: anyone else's answers 404, like one that does not exist."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from e2a.api.deps import current_user
from e2a.api.errors import ApiError
from e2a.auth import Caller
from e2a.sandboxes.records import aware, utcnow
from e2a.store import locks
from e2a.store.models import Workspace
from e2a.workspaces import s3, scope
from e2a.workspaces.service import QuotaExceeded, WorkspaceBusy, Workspaces

router = APIRouter(prefix="/v1/workspaces", tags=["workspaces"])

PAGE_MAX = 1000


class WorkspaceOut(BaseModel):
    workspace_id: str
    app_id: str
    capset_id: str
    end_user_id: str | None
    bytes_used: int       # as last counted (usage_at); GET .../usage counts again
    file_count: int
    usage_at: datetime | None
    created_at: datetime
    last_used_at: datetime
    mounted: bool         # a sandbox has it on /home/user now


class WorkspacesOut(BaseModel):
    workspaces: list[WorkspaceOut]


class FileOut(BaseModel):
    path: str
    size: int
    modified: datetime
    type: Literal["file", "symlink"]


class FilesOut(BaseModel):
    files: list[FileOut]
    next_cursor: str | None


class UsageOut(BaseModel):
    workspace_id: str
    bytes_used: int
    file_count: int
    user_bytes_used: int  # all the caller's workspaces
    quota_bytes: int      # the caller's storage quota, over all their workspaces


class PresignIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(max_length=s3.MAX_PATH_BYTES)
    method: Literal["GET", "PUT"]
    expires_in: int = Field(default=900, ge=1, le=s3.PRESIGN_MAX)
    # PUT only: the exact size of the upload, signed into the URL and checked against what
    # is left of the quota. Without it a PUT may be any size S3 takes (docs/workspaces.md).
    size: int | None = Field(default=None, ge=0, le=5 * 1024 ** 3)


class PresignOut(BaseModel):
    url: str
    method: str
    expires_at: datetime


def service(request: Request) -> Workspaces:
    return request.app.state.workspaces


async def owned(ws: Workspaces, user: Caller, workspace_id: str) -> Workspace:
    row = await ws.registry.get(user.id, workspace_id)
    if row is None:
        raise ApiError(404, "workspace_not_found", f"no workspace {workspace_id!r}",
                       "workspace_id")
    return row


def out(row: Workspace, in_use: set[str]) -> WorkspaceOut:
    return WorkspaceOut(
        workspace_id=row.id, app_id=row.app_id, capset_id=row.capset_id,
        end_user_id=row.end_user_id or None, bytes_used=row.bytes_used,
        file_count=row.file_count, usage_at=aware(row.usage_at) if row.usage_at else None,
        created_at=aware(row.created_at), last_used_at=aware(row.last_used_at),
        mounted=row.id in in_use)


def checked(value: str, field: str, check) -> str:
    try:
        return check(value)
    except ValueError as exc:
        raise ApiError(400, "invalid_field", f"{field} {exc}", field) from None


async def store_call(fn, *args):
    try:
        return await s3.run(fn, *args)
    except Exception as exc:
        raise ApiError(503, "storage_unavailable",
                       f"the workspace store did not answer: {exc.__class__.__name__}") from exc


@router.get("", response_model=WorkspacesOut, responses={400: {}, 401: {}})
async def list_workspaces(end_user_id: str | None = Query(default=None, max_length=64),
                          user: Caller = Depends(current_user),
                          ws: Workspaces = Depends(service)) -> WorkspacesOut:
    if end_user_id is not None:
        checked(end_user_id, "end_user_id", scope.check_name)
    rows = await ws.registry.of_user(user.id, end_user_id)
    in_use = await ws.in_use([r.id for r in rows])
    return WorkspacesOut(workspaces=[out(r, in_use) for r in rows])


@router.get("/{workspace_id}", response_model=WorkspaceOut, responses={401: {}, 404: {}})
async def get_workspace(workspace_id: str, user: Caller = Depends(current_user),
                        ws: Workspaces = Depends(service)) -> WorkspaceOut:
    row = await owned(ws, user, workspace_id)
    return out(row, await ws.in_use([row.id]))


@router.get("/{workspace_id}/usage", response_model=UsageOut, responses={401: {}, 404: {}})
async def usage(workspace_id: str, user: Caller = Depends(current_user),
                ws: Workspaces = Depends(service)) -> UsageOut:
    """Counted now, in S3 (what a mounted sandbox has not uploaded yet is not in it)."""
    row = await owned(ws, user, workspace_id)
    began = utcnow()
    counted = await store_call(ws.store.usage, row.id)
    await ws.registry.record_usage(row.id, counted, began)
    return UsageOut(workspace_id=row.id, bytes_used=counted.bytes, file_count=counted.files,
                    user_bytes_used=await ws.registry.stored_bytes(user.id),
                    quota_bytes=ws.quota)


@router.get("/{workspace_id}/files", response_model=FilesOut,
            responses={400: {}, 401: {}, 404: {}})
async def list_files(workspace_id: str, prefix: str = Query(default="", max_length=1024),
                     cursor: str | None = Query(default=None, max_length=1024),
                     limit: int = Query(default=100, ge=1, le=PAGE_MAX),
                     user: Caller = Depends(current_user),
                     ws: Workspaces = Depends(service)) -> FilesOut:
    """Files under `prefix`, in path order; pass `next_cursor` back as `cursor` for the next
    page. Symlinks are listed as such (rclone keeps each as a small object)."""
    row = await owned(ws, user, workspace_id)
    checked(prefix, "prefix", s3.check_prefix)
    if cursor is not None:
        checked(cursor, "cursor", s3.check_path)
    entries, nxt = await store_call(ws.store.list_page, row.id, prefix, cursor, limit)
    return FilesOut(files=[FileOut(path=e.path, size=e.size, modified=e.modified, type=e.kind)
                           for e in entries], next_cursor=nxt)


@router.post("/{workspace_id}/files/presign", response_model=PresignOut,
             responses={400: {}, 401: {}, 404: {}})
async def presign(workspace_id: str, req: PresignIn, user: Caller = Depends(current_user),
                  ws: Workspaces = Depends(service)) -> PresignOut:
    """A URL that reads (GET) or writes (PUT) one file of the workspace without the API key,
    until it expires. A PUT while a sandbox has the workspace mounted shows there within
    seconds (docs/workspaces.md, "Seen from elsewhere")."""
    row = await owned(ws, user, workspace_id)
    path = checked(req.path, "path", s3.check_path)
    if req.method == "GET" and await store_call(ws.store.exists, row.id, path) is None:
        raise ApiError(404, "file_not_found", f"no file {path!r} in workspace {row.id}", "path")
    if req.method == "PUT":
        try:  # with a size, that much of the quota is held until the file is in S3
            await ws.claim_upload(user.id, row.id, path, req.size, req.expires_in)
        except QuotaExceeded as exc:
            raise ApiError(507, "quota_exceeded", f"the upload does not fit the storage quota "
                           f"({exc.free} bytes left of {ws.quota})", "size") from None
        except locks.LockBusy:
            raise ApiError(503, "workspace_busy", "another call of this user is sharing its "
                           "quota; try again") from None
    elif req.size is not None:
        raise ApiError(400, "invalid_field", "size applies to PUT only", "size")
    url = await store_call(ws.store.presign, row.id, path, req.method, req.expires_in,
                           req.size)
    return PresignOut(url=url, method=req.method, expires_at=datetime.now(timezone.utc)
                      + timedelta(seconds=req.expires_in))


@router.delete("/{workspace_id}/files", status_code=204, responses={400: {}, 401: {}, 404: {}})
async def delete_file(workspace_id: str, path: str = Query(max_length=1024),
                      user: Caller = Depends(current_user),
                      ws: Workspaces = Depends(service)) -> Response:
    row = await owned(ws, user, workspace_id)
    path = checked(path, "path", s3.check_path)
    key = await store_call(ws.store.exists, row.id, path)
    if key is None:
        raise ApiError(404, "file_not_found", f"no file {path!r} in workspace {row.id}", "path")
    await store_call(ws.store.delete_key, key)
    return Response(status_code=204)


@router.delete("/{workspace_id}", status_code=204, responses={401: {}, 404: {}, 409: {}})
async def delete_workspace(workspace_id: str, user: Caller = Depends(current_user),
                           ws: Workspaces = Depends(service)) -> Response:
    """Every file of the workspace, and the workspace. Refused while a sandbox has it mounted."""
    row = await owned(ws, user, workspace_id)
    try:
        await ws.delete(row.id, user.id)
    except WorkspaceBusy as exc:
        raise ApiError(409, "workspace_in_use", str(exc), "workspace_id") from exc
    except locks.LockBusy:
        raise ApiError(503, "workspace_busy", "a create or delete of this user's workspaces "
                       "holds them; try again") from None
    except Exception as exc:
        raise ApiError(503, "storage_unavailable",
                       f"the workspace store did not answer: {exc.__class__.__name__}") from exc
    return Response(status_code=204)
