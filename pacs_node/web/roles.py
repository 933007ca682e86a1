"""What a role may do, as route dependencies: checked before a request's body is read."""

from __future__ import annotations

from fastapi import HTTPException, Request

from pacs_node.web.auth import Principal


def admin(request: Request) -> Principal:
    """The caller (set by the application's middleware), who must hold the admin role: a read-only
    token gets 403."""
    who: Principal = request.state.principal
    if not who.is_admin:
        raise HTTPException(403, "this needs an admin token; yours is read-only")
    return who
