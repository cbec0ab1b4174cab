"""The gateway's HTTP API: two webhook endpoints, health, metrics and the OpenAPI document.

A notification is answered 202 only once its alerts are committed to the spool; what goes
wrong before that is a 4xx with a JSON body ``{"error": ..., "detail": ...}`` saying what.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field, SecretStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from alert_gateway import slack
from alert_gateway.auth import bearer_matches, resolve_token
from alert_gateway.events import EventTooLarge, build_event, encode_event
from alert_gateway.forwarder import Forwarder
from alert_gateway.metrics import GatewayMetrics
from alert_gateway.models import AlertmanagerWebhook, GrafanaWebhook, Source, normalise
from alert_gateway.settings import GatewaySettings, prefect_auth_headers
from alert_gateway.spool import Decision, NewEvent, Spool

logger = logging.getLogger("alert_gateway")


class AcceptedReply(BaseModel):
    """The notification's alerts are in the spool and will reach Prefect."""

    accepted: int = Field(description="Alerts stored as new events, to be forwarded to Prefect.")
    deduplicated: int = Field(
        description="Alerts not forwarded: re-sent (same event id: same alert in the same "
        "episode) or firing again within the cooldown."
    )
    event_ids: list[str] = Field(description="The Prefect event id of every alert, in order.")


class ErrorReply(BaseModel):
    """Why the request was refused."""

    error: str = Field(description="What is wrong, in one sentence.")
    detail: Any = Field(None, description="Specifics, e.g. the invalid fields.")


class Refused(Exception):
    """A request the gateway refuses: HTTP status, metric reason and message for the sender."""

    def __init__(self, status: int, reason: str, error: str, detail: Any = None):
        super().__init__(error)
        self.status, self.reason, self.error, self.detail = status, reason, error, detail


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorReply, "description": text}
    for code, text in {
        400: "The body is not valid JSON.",
        401: "Missing or wrong bearer token.",
        413: "The body (or one alert's event) is too large.",
        415: "The content type is not JSON.",
        422: "The JSON does not match the payload schema; `detail` lists the fields.",
        503: "The spool could not store the alerts; nothing was accepted, send again.",
    }.items()
}
_PAYLOAD_MODELS: dict[Source, type[AlertmanagerWebhook | GrafanaWebhook]] = {
    "alertmanager": AlertmanagerWebhook,
    "grafana": GrafanaWebhook,
}


def create_app(settings: GatewaySettings) -> FastAPI:
    """The gateway application; the spool is opened and the forwarder started by its lifespan.

    Raises `alert_gateway.auth.GatewayConfigError` without a token unless ``settings.insecure``.
    """
    token = resolve_token(settings)
    metrics = GatewayMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        spool = Spool(settings.spool_path)
        forwarder = Forwarder(spool, settings, metrics)
        task = asyncio.create_task(forwarder.run(), name="alert-forwarder")
        app.state.spool, app.state.forwarder, app.state.forwarder_task = spool, forwarder, task
        if token is None:
            logger.warning("accepting alerts WITHOUT authentication (--insecure)")
        logger.info("spool %s; forwarding to %s", settings.spool_path, settings.prefect_api_url)
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            spool.close()

    app = FastAPI(
        title="Runbooks alert gateway",
        version="1",
        description="Receives Alertmanager and Grafana webhooks and forwards each alert to Prefect "
        "as an `alert.firing` / `alert.resolved` event.",
        lifespan=lifespan,
    )

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> JSONResponse:
        metrics.rejected.labels(exc.reason).inc()
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _error(exc.status, exc.error, exc.detail, headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), None, exc.headers)

    async def receive(request: Request, source: Source) -> AcceptedReply:
        _authorize(request, token)
        _require_json(request)
        body = await _read_body(request, settings.max_body_bytes)
        notification = _parse(body, source)
        alerts = normalise(notification)
        metrics.received.labels(source).inc(len(alerts))
        received = datetime.now(UTC)
        # one instant for the event ids' episodes and the spool's cooldown, so they agree
        now = received.timestamp()
        new_events = []
        for index, alert in enumerate(alerts):
            event = build_event(alert, occurred=received, cooldown_s=settings.cooldown_s)
            try:
                encoded = encode_event(event)
            except EventTooLarge as exc:
                raise Refused(413, "too_large", f"alerts[{index}]: {exc}") from None
            new_events.append(NewEvent(event["id"], alert.fingerprint, alert.status, encoded))
        spool: Spool = request.app.state.spool
        try:
            decisions = await spool.call(spool.accept, new_events, now, settings.cooldown_s)
        except sqlite3.Error as exc:
            logger.exception("spool write failed")
            raise Refused(
                503, "spool", "the alerts could not be stored; send them again", repr(exc)
            ) from exc
        accepted = decisions.count(Decision.FORWARD)
        if accepted:
            request.app.state.forwarder.wake()
        for decision in decisions:
            if decision is not Decision.FORWARD:
                metrics.deduplicated.labels(decision.value).inc()
        return AcceptedReply(
            accepted=accepted,
            deduplicated=len(decisions) - accepted,
            event_ids=[e.id for e in new_events],
        )

    @app.post(
        "/alerts/alertmanager",
        status_code=202,
        summary="Alertmanager webhook (version 4)",
        responses=_ERROR_RESPONSES,
        openapi_extra=_request_body("AlertmanagerWebhook"),
    )
    async def alertmanager_webhook(request: Request) -> AcceptedReply:
        return await receive(request, "alertmanager")

    @app.post(
        "/alerts/grafana",
        status_code=202,
        summary="Grafana unified alerting webhook",
        responses=_ERROR_RESPONSES,
        openapi_extra=_request_body("GrafanaWebhook"),
    )
    async def grafana_webhook(request: Request) -> AcceptedReply:
        return await receive(request, "grafana")

    replays = slack.ReplayGuard()
    background: set[asyncio.Task[None]] = set()

    @app.post(
        "/slack/interactions",
        summary="Slack interactivity: Approve / Reject buttons of approval requests",
        responses={
            401: {"model": ErrorReply, "description": "Not signed by Slack, stale, or replayed."},
            404: {"model": ErrorReply, "description": "No Slack signing secret configured."},
            400: {"model": ErrorReply, "description": "Not an approval button of ours."},
            503: {"model": ErrorReply, "description": "Prefect did not answer; click again."},
        },
    )
    async def slack_interactions(request: Request) -> JSONResponse:
        secret = settings.slack_signing_secret
        if secret is None:
            raise Refused(404, "slack_off", "Slack interactivity is not configured on this gateway")
        body = await _read_body(request, settings.max_body_bytes)
        signature = request.headers.get("x-slack-signature")
        now = slack.now()
        problem = slack.signature_problem(
            secret, request.headers.get("x-slack-request-timestamp"), signature, body, now
        )
        if problem:
            raise Refused(401, "slack_signature", f"not a signed Slack request: {problem}")
        if replays.seen_before(signature or "", now):
            raise Refused(401, "slack_replay", "this signed request was already received")
        try:
            click = slack.parse_click(body, settings.slack_response_url_prefixes)
        except (ValueError, UnicodeDecodeError) as exc:
            raise Refused(400, "slack_payload", f"not an approval button: {exc}") from None
        if click is None:
            return JSONResponse({"ok": True})
        try:
            answered = await slack.answer(
                click, settings.prefect_api_url, prefect_auth_headers(settings),
                settings.forward_timeout_s,
            )  # fmt: skip
        except httpx.HTTPError as exc:
            logger.warning("could not answer run %s: %s", click.run_id, type(exc).__name__)
            raise Refused(503, "prefect", "Prefect did not take the answer; click again") from None
        logger.info("slack %s: run %s: %s", click.user, click.run_id, answered.text)
        if click.response_url:
            task = asyncio.create_task(
                slack.update_message(click.response_url, answered.text, settings.forward_timeout_s)
            )
            background.add(task)
            task.add_done_callback(background.discard)
        return JSONResponse({"ok": answered.resumed, "text": answered.text})

    @app.get("/healthz", summary="Liveness: serving and delivering")
    async def healthz(request: Request) -> JSONResponse:
        if request.app.state.forwarder_task.done():
            return JSONResponse({"status": "forwarder stopped"}, status_code=503)
        spool: Spool = request.app.state.spool
        return JSONResponse({"status": "ok", "spool_depth": await spool.call(spool.depth)})

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus_metrics(request: Request) -> Response:
        spool: Spool = request.app.state.spool
        metrics.spool_depth.set(await spool.call(spool.depth))
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    _document_payload_schemas(app)
    return app


def _error(
    status: int, error: str, detail: Any, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def _authorize(request: Request, token: SecretStr | None) -> None:
    if token is not None and not bearer_matches(request.headers.get("authorization"), token):
        raise Refused(401, "unauthorized", "missing or wrong bearer token")


def _require_json(request: Request) -> None:
    content_type = request.headers.get("content-type", "")
    media_type, *params = (part.strip().lower() for part in content_type.split(";"))
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise Refused(
            415,
            "content_type",
            f"content type must be application/json, not {content_type[:100]!r}",
        )
    charset = next(
        (p.partition("=")[2].strip('"') for p in params if p.startswith("charset=")), "utf-8"
    )
    if charset not in ("utf-8", "utf8"):
        raise Refused(415, "content_type", f"JSON must be UTF-8, not {charset[:40]!r}")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it is known to exceed ``limit`` (declared or streamed)."""
    too_large = Refused(413, "too_large", f"the body is larger than {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _parse(body: bytes, source: Source) -> AlertmanagerWebhook | GrafanaWebhook:
    model = _PAYLOAD_MODELS[source]
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise Refused(
                400, "bad_json", f"the body is not valid JSON: {errors[0]['msg']}"
            ) from None
        fields = [{"field": _dotted(e["loc"]), "problem": e["msg"]} for e in errors[:50]]
        first = fields[0]
        raise Refused(
            422,
            "schema",
            f"not a valid {source} payload: {first['field'] or 'body'}: {first['problem']}",
            fields,
        ) from None


def _dotted(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)


def _request_body(schema_name: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}
            },
        }
    }


def _document_payload_schemas(app: FastAPI) -> None:
    """Put the payload models in the OpenAPI document: the endpoints parse the raw body themselves
    (to bound its size while reading), so FastAPI cannot see them."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in _PAYLOAD_MODELS.values():
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
