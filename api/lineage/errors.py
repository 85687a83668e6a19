"""Typed lineage errors. Permanent ones (bad input, unknown id) must not be retried; temporary ones
(server down, database busy) may be. The HTTP API maps each to a status code and problem+json."""
from __future__ import annotations


class LineageError(Exception):
    """Base class. `status` is the HTTP status the API answers with; `temporary` says whether a retry can help."""

    status = 400
    title = "Bad request"
    temporary = False
    from_database = False  # raised because the database failed or refused (counted in /metrics)


class InvalidInput(LineageError, ValueError):
    """A field has a value lineage cannot record; the message names the field, the value and the fix."""

    status = 422
    title = "Invalid input"


class NotFound(LineageError, LookupError):
    status = 404
    title = "Not found"


class Unauthorized(LineageError):
    status = 401
    title = "Unauthorized"


class Forbidden(LineageError):
    status = 403
    title = "Forbidden"


class Unavailable(LineageError):
    """The lineage server or database cannot be reached right now; retry later."""

    status = 503
    title = "Service unavailable"
    temporary = True


class Conflict(LineageError):
    """The event contradicts what is recorded (e.g. a checkpoint URI already produced by another run)."""

    status = 409
    title = "Conflict"


class DatabaseError(LineageError):
    """The database refused a statement for a reason neither the input nor a retry explains (a bug or a
    schema out of date): permanent, reported as 500 with the database's own message in the log."""

    status = 500
    title = "Internal error"
