"""The webhook receiver: a Flask application factory with thin routes.

The request path does no Gitea API call and no git: it checks size and type,
verifies the signature, parses, writes rows in one transaction, wakes the
scheduler and answers. Gitea waits 5 s for an answer and never retries.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import RequestEntityTooLarge

from bot import dashboard, tasklog
from bot.config import Config
from bot.core import events, intake, render
from bot.core import metrics as counts
from bot.ingest import ingest
from bot.metrics import CONTENT_TYPE
from bot.store import DATABASE_ERRORS, Store

log = logging.getLogger(__name__)


def create_app(
    config: Config,
    store: Store,
    *,
    rules: Callable[[], intake.Rules],
    wake: Callable[[], None] = lambda: None,
    health: Callable[[], tuple[bool, dict[str, Any]]] = lambda: (True, {}),
    store_failed: Callable[[Exception], None] = lambda exc: None,
    refused: counts.Tally | None = None,
    scrape: Callable[[], bytes] | None = None,
    receive: bool = True,
) -> Flask:
    """The HTTP side of a node. `refused`: where deliveries answered without a write are
    counted (the rest are counted in their own transaction); `scrape`: the text of GET
    /metrics; `receive`: it takes Gitea's deliveries (False on a node that only runs a
    worker: `kugetsu serve --role worker`)."""
    app = Flask("kugetsu")
    refused = refused if refused is not None else counts.Tally()
    app.config["MAX_CONTENT_LENGTH"] = config.server.max_body_bytes
    secret = config.gitea.webhook_secret
    verify = bool(secret)

    def answer(
        status: int, state: str, reason: str, started: float | None = None, **extra: Any
    ) -> Response:
        response = Response(
            json.dumps({"status": state, "reason": reason, **extra}),
            status=status,
            mimetype="application/json",
        )
        if started is not None:
            # Shown with each delivery in Gitea's webhook history: the time kugetsu
            # itself spent on it, without the network and the server's queueing.
            response.headers["Server-Timing"] = (
                f"handler;dur={(time.perf_counter() - started) * 1000:.2f}"
            )
        return response

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_exc: Exception) -> Response:
        refused.add(_REJECTED)
        return answer(413, "rejected", f"body larger than {config.server.max_body_bytes} bytes")

    @app.post("/webhook")
    def webhook() -> Response:
        started = time.perf_counter()
        if not receive:
            return answer(
                404, "rejected", "this node runs a worker only; send deliveries to a receiver"
            )
        length = request.content_length
        if length is not None and length > config.server.max_body_bytes:
            return too_large(RequestEntityTooLarge())
        body = request.get_data(cache=False)  # raises 413 past MAX_CONTENT_LENGTH
        try:
            payload = events.signed_bytes(request.content_type or "", body, signed=verify)
            if verify:
                events.verify_signature(secret, payload, request.headers)
            delivery = events.delivery_of(request.headers, payload)
            data = events.load_json(payload)
            event = events.parse(delivery, data)
        except events.WebhookError as exc:
            log.warning(
                "webhook rejected",
                extra={
                    "status": exc.status,
                    "reason": exc.reason,
                    "delivery": request.headers.get("X-Gitea-Delivery"),
                },
            )
            refused.add(_REJECTED)
            return answer(exc.status, "rejected", exc.reason, started)

        try:
            result = ingest(store, delivery, event, rules(), repo=events.repo_of(data))
        except DATABASE_ERRORS as exc:
            # Nothing of the delivery was written (one transaction), and it is not
            # acknowledged: Gitea's webhook history shows the answer, and can redeliver it.
            store_failed(exc)
            refused.add(_ERROR)
            log.error("delivery not stored", extra={"delivery": delivery.id, "error": str(exc)})
            return answer(
                503,
                "error",
                f"could not store the delivery, so it was not accepted: {exc}",
                started,
            )
        # Deliveries that queue work are logged; the many that are not for kugetsu
        # (and repeats) only at debug level. Gitea's webhook history keeps every
        # delivery with kugetsu's answer and reason.
        level = logging.INFO if result.queued else logging.DEBUG
        if log.isEnabledFor(level):
            about = (
                {}
                if isinstance(event, events.Ignored)
                else {"repo": event.repo, "issue": event.number}
            )
            log.log(
                level,
                "webhook handled",
                extra={
                    **about,
                    "delivery": delivery.id,
                    "event": delivery.event_type,
                    "reason": result.reason,
                    "tasks": list(result.task_ids),
                    "duplicate": result.duplicate,
                    "ms": round((time.perf_counter() - started) * 1000, 2),
                },
            )
        if result.duplicate:
            return answer(200, "duplicate", result.reason, started)
        if result.queued:
            wake()
            return answer(202, "queued", result.reason, started, tasks=list(result.task_ids))
        return answer(200, "ignored", result.reason, started)

    @app.get("/healthz")
    def healthz() -> Response:
        # A liveness check: 200 while the process and its worker run, with each problem
        # named in one line (status "degraded"); 503 only when the worker is not running.
        ok, details = health()
        problems = list(details.get("problems", ()))
        status = "unhealthy" if not ok else ("degraded" if problems else "ok")
        body = {k: v for k, v in details.items() if k != "not_ready"}
        return Response(
            json.dumps({"status": status, **body, "problems": problems}),
            status=200 if ok else 503,
            mimetype="application/json",
        )

    @app.get("/readyz")
    def readyz() -> Response:
        # Ready: the worker runs, its checks at start have run, and nothing keeps kugetsu
        # from working (Gitea away, the token refused, the default agent missing, a disk
        # nearly full, ticks failing). 503 with each problem in one line otherwise.
        ok, details = health()
        waiting = list(details.get("not_ready", details.get("problems", ())))
        ready = ok and not waiting
        body = {k: v for k, v in details.items() if k not in ("problems", "not_ready")}
        return Response(
            json.dumps({"status": "ready" if ready else "not ready", **body, "problems": waiting}),
            status=200 if ready else 503,
            mimetype="application/json",
        )

    @app.get("/logs/<int:task_id>/<token>")
    def task_log(task_id: int, token: str) -> Response:
        # Linked from PRs and comments; the token is an HMAC of the task id, so
        # only people who can see those links can read the log.
        if not events.equal_secrets(token, render.log_token(config, task_id)):
            return answer(404, "not found", "no such log")
        # a log of any size costs the receiver neither its size in memory nor (for this
        # node's file) a thread while it is sent; a task that ran on another machine has
        # its log in the database (PostgreSQL), sent a part at a time
        response = tasklog.response(config, store, task_id)
        if response is None:
            return answer(404, "not found", "no such log")
        response.headers["Cache-Control"] = "no-store"
        return response

    if scrape is not None and config.metrics.enabled:
        _metrics_route(app, config, scrape)
    dashboard.register(app, config, store, wake=wake)
    return app


_REJECTED = counts.key(counts.Counter.DELIVERIES, result=str(counts.DeliveryResult.REJECTED))
_ERROR = counts.key(counts.Counter.DELIVERIES, result=str(counts.DeliveryResult.ERROR))


def _metrics_route(app: Flask, config: Config, scrape: Callable[[], bytes]) -> None:
    """GET /metrics (`[metrics] enabled`). With `[metrics] token`, only for a request that
    sends it as `Authorization: Bearer <token>`: 401 otherwise."""
    token = config.metrics.token

    @app.get("/metrics")
    def metrics() -> Response:
        if token:
            sent = request.headers.get("Authorization", "")
            scheme, _, value = sent.partition(" ")
            if scheme.lower() != "bearer" or not events.equal_secrets(value.strip(), token):
                response = Response(
                    json.dumps({"status": "rejected", "reason": "a bearer token is required"}),
                    status=401,
                    mimetype="application/json",
                )
                response.headers["WWW-Authenticate"] = 'Bearer realm="kugetsu metrics"'
                return response
        return Response(scrape(), content_type=CONTENT_TYPE, headers={"Cache-Control": "no-store"})
