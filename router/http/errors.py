"""The HTTP front's error answers: OpenAI error objects, and the one table from outcomes to statuses.

Every outcome is named with the gRPC status the gRPC front gives for it (the scheduler, the jobs and
validation speak that vocabulary), so both fronts count and log calls alike; this table is the HTTP
side of the mapping. The body is what OpenAI clients parse:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

A few answers exist only over HTTP (a body too large, too slow, an unknown path): they keep their
outcome for the metrics and give their own HTTP status.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import grpc
from aiohttp import web

from router.calls import REQUEST_ID_KEY


class HttpAnswer(NamedTuple):
    status: int
    type: str  # the OpenAI error object's `type`
    retry_after_s: int | None  # a Retry-After header, for answers worth retrying


# The HTTP side of each outcome. 401 is the API-key check's (common/security.py, issue 12), whose
# middleware raises ApiError(UNAUTHENTICATED, ...) through router/http/app.py's middlewares list.
ANSWERS: dict[grpc.StatusCode, HttpAnswer] = {
    grpc.StatusCode.INVALID_ARGUMENT: HttpAnswer(400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: HttpAnswer(401, "authentication_error", None),
    grpc.StatusCode.NOT_FOUND: HttpAnswer(404, "invalid_request_error", None),
    grpc.StatusCode.RESOURCE_EXHAUSTED: HttpAnswer(429, "rate_limit_error", 1),  # the queue is full
    grpc.StatusCode.CANCELLED: HttpAnswer(499, "cancelled", None),  # the client went away: nobody reads it
    grpc.StatusCode.INTERNAL: HttpAnswer(500, "server_error", None),  # the engine failed
    grpc.StatusCode.UNAVAILABLE: HttpAnswer(
        503, "service_unavailable", 1
    ),  # draining, no worker, worker lost
    grpc.StatusCode.DEADLINE_EXCEEDED: HttpAnswer(504, "timeout", None),  # no worker free in time
}
UNKNOWN_ANSWER = HttpAnswer(500, "server_error", None)


class ApiError(Exception):
    """A request refused or failed: its outcome, the message (what is wrong), and where."""

    def __init__(
        self,
        outcome: grpc.StatusCode,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,  # only for answers that exist over HTTP alone (413, 408, 405)
    ) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message
        self.param = param
        self.code = code
        self.answer = ANSWERS.get(outcome, UNKNOWN_ANSWER)
        if status is not None:
            self.answer = self.answer._replace(status=status)

    def body(self) -> dict[str, dict[str, str | None]]:
        """The OpenAI error object (also sent as an SSE event when a stream fails half-way)."""
        return {
            "error": {
                "message": self.message,
                "type": self.answer.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self, request_id: str | None) -> web.Response:
        headers = {}
        if request_id is not None:
            headers[REQUEST_ID_KEY] = request_id
        if self.answer.retry_after_s is not None:
            headers["Retry-After"] = str(self.answer.retry_after_s)
        return web.Response(
            status=self.answer.status,
            text=json.dumps(self.body(), ensure_ascii=False),
            content_type="application/json",
            headers=headers,
        )
