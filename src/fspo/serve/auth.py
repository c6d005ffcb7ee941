"""Who is calling: the API key is the identity.

A request's user is the user of its ``Authorization: Bearer <key>`` key, never a field of the body,
so no request can act for another user. Keys have a scope: admin keys reach only ``/v1/admin/*``,
study keys (a participant's) only ``/v1/study/*``, user keys the rest, so a leaked admin key cannot
read or write as a user and the reverse, and a participant cannot unblind the study.
"""

from __future__ import annotations

from fastapi import Depends, Request

from fspo.serve.errors import APIError
from fspo.serve.store import Principal

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def principal_of(request: Request) -> Principal:
    """The caller of `request`, from its bearer key; 401 when missing, malformed, unknown or revoked."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if not header:
        message, code = "missing API key (send 'Authorization: Bearer <key>')", "missing_api_key"
    elif scheme.lower() != "bearer" or not key.strip():
        message, code = "malformed Authorization header (expected 'Bearer <key>')", "invalid_api_key"
    else:
        principal = request.app.state.store.authenticate(key.strip())
        if principal is not None:
            return principal
        message, code = "invalid or revoked API key", "invalid_api_key"
    raise APIError(401, message, code=code, headers=_CHALLENGE)


def user_principal(principal: Principal = Depends(principal_of)) -> Principal:
    """The caller, who must hold a user-scope key: an admin key cannot act as a user, and a study
    participant's key reaches only the study (`fspo.serve.study`), so that a participant cannot list the
    compared systems or ask either of them by name and learn which answer was whose."""
    if principal.scope == "study":
        raise APIError(403, "a study participant's key takes only the study (/v1/study/*)", code="study_key")
    if principal.scope != "user":
        raise APIError(403, "an admin key cannot use user routes; use a user key", code="wrong_scope")
    return principal


def admin_principal(principal: Principal = Depends(principal_of)) -> Principal:
    """The caller, who must hold an admin-scope key."""
    if principal.scope != "admin":
        raise APIError(403, "this route needs an admin key", code="wrong_scope")
    return principal
