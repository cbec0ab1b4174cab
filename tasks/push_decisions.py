"""push-delivery-degraded's decisions (pure): what each send result means, delivery per provider,
what a provider's status page says, and what the runbook does about it.

Results are the dispatcher's counter label (FCM v1 error codes, APNs reasons, or HTTP statuses).
Stale tokens are the only cause the runbook fixes (by pruning them); a provider outage (5xx,
status page) or its quota (429) is for a person, and so is anything it does not know.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field


class ResultClass(StrEnum):
    SUCCESS = "success"
    STALE_TOKEN = "stale token"
    QUOTA = "quota (429)"
    PROVIDER = "provider error (5xx)"
    OTHER = "other error"


# results as FCM (v1 codes and legacy), APNs (reasons) and plain HTTP statuses name them,
# compared without case, "_", "-" or spaces
_RESULTS = {
    ResultClass.SUCCESS: {"success", "ok", "sent", "delivered", "200"},
    ResultClass.STALE_TOKEN: {
        "unregistered",  # FCM v1 UNREGISTERED (404), APNs Unregistered (410)
        "notregistered",  # FCM legacy
        "invalidregistration",
        "registrationtokennotregistered",  # Firebase Admin SDK
        "baddevicetoken",  # APNs 400
        "expiredtoken",  # APNs 410
        "404",
        "410",
    },
    ResultClass.QUOTA: {
        "quotaexceeded",  # FCM v1 QUOTA_EXCEEDED
        "messageratexceeded",
        "messagerateexceeded",
        "devicemessagerateexceeded",
        "toomanyrequests",  # APNs 429
        "429",
    },
    ResultClass.PROVIDER: {
        "unavailable",  # FCM v1 UNAVAILABLE (503)
        "internal",  # FCM v1 INTERNAL (500)
        "internalservererror",  # APNs 500
        "serviceunavailable",  # APNs 503
        "shutdown",  # APNs 503
    },
}
_BY_NAME = {name: cls for cls, names in _RESULTS.items() for name in names}


def classify_result(result: str) -> ResultClass:
    """What one send result means; any other 5xx is the provider's, unknown names are OTHER."""
    name = re.sub(r"[\s_-]+", "", result.strip().lower())
    if name in _BY_NAME:
        return _BY_NAME[name]
    if re.fullmatch(r"5[0-9][0-9]", name):
        return ResultClass.PROVIDER
    return ResultClass.OTHER


class ProviderDelivery(BaseModel):
    """One provider's sends over the window."""

    provider: str
    sent: float
    succeeded: float
    by_class: dict[ResultClass, float] = Field(default_factory=dict)
    by_result: dict[str, float] = Field(default_factory=dict)

    @property
    def failed(self) -> float:
        return self.sent - self.succeeded

    @property
    def success_rate(self) -> float | None:
        return self.succeeded / self.sent if self.sent > 0 else None

    def share(self, cls: ResultClass) -> float:
        """The share of this provider's failures in ``cls``."""
        return self.by_class.get(cls, 0.0) / self.failed if self.failed > 0 else 0.0

    def describe(self) -> str:
        rate = self.success_rate
        if rate is None:
            return f"{self.provider}: nothing sent in the window"
        errors = ", ".join(
            f"{cls.value} {n:.0f}" for cls, n in sorted(self.by_class.items(), key=lambda i: -i[1])
        )
        return (
            f"{self.provider}: {rate:.2%} delivered ({self.succeeded:.0f} of {self.sent:.0f})"
            + (f"; failures: {errors}" if errors else "")
        )


def summarize_delivery(counts: list[tuple[str, str, float]]) -> list[ProviderDelivery]:
    """(provider, result, sends) rows of the counter's increase -> one summary per provider."""
    providers: dict[str, ProviderDelivery] = {}
    for provider, result, n in counts:
        if n is None or n <= 0:
            continue
        d = providers.setdefault(provider, ProviderDelivery(provider=provider, sent=0, succeeded=0))
        cls = classify_result(result)
        d.sent += n
        d.by_result[result] = d.by_result.get(result, 0.0) + n
        if cls is ResultClass.SUCCESS:
            d.succeeded += n
        else:
            d.by_class[cls] = d.by_class.get(cls, 0.0) + n
    return [providers[p] for p in sorted(providers)]


# --- provider status pages --------------------------------------------------------------------


class PageState(StrEnum):
    OPERATIONAL = "operational"
    DEGRADED = "degraded"
    UNKNOWN = "unknown"  # unreachable or unreadable: not a failure of the provider


class StatusReading(BaseModel):
    provider: str
    url: str
    state: PageState
    detail: str


_JSONP = re.compile(r"^\s*[A-Za-z_$][\w$]*\s*\((.*)\)\s*;?\s*$", re.DOTALL)


def parse_status_page(body: str, component: str = "") -> tuple[PageState, str]:
    """What a provider's status page says, for ``component`` (a product or service name; empty:
    the whole page). Reads the Atlassian Statuspage API (``/api/v2/status.json`` or
    ``summary.json``), Google's ``incidents.json`` (Firebase) and Apple's system status data
    (JSON or its JSONP callback); anything else is unknown."""
    jsonp = _JSONP.match(body)
    try:
        data: Any = json.loads(jsonp.group(1) if jsonp else body)
    except ValueError:
        return PageState.UNKNOWN, "not JSON"
    wanted = component.strip().lower()

    def matches(name: Any) -> bool:
        return not wanted or wanted in str(name or "").lower()

    if isinstance(data, list):  # Google Cloud / Firebase incidents.json
        ongoing = [
            i
            for i in data
            if isinstance(i, dict)
            and not i.get("end")
            and (
                not wanted or any(matches(p.get("title")) for p in i.get("affected_products") or [])
            )
        ]
        if ongoing:
            text = ongoing[0].get("external_desc") or ongoing[0].get("id") or "ongoing incident"
            return PageState.DEGRADED, f"{len(ongoing)} ongoing incident(s): {str(text)[:200]}"
        return PageState.OPERATIONAL, "no ongoing incident" + (
            f" for {component}" if wanted else ""
        )
    if not isinstance(data, dict):
        return PageState.UNKNOWN, "unrecognized status format"
    if isinstance(data.get("services"), list):  # Apple system status
        services = [
            s for s in data["services"] if isinstance(s, dict) and matches(s.get("serviceName"))
        ]
        if not services:
            return PageState.UNKNOWN, f"no service named like {component!r} on the page"
        events = [
            e
            for s in services
            for e in s.get("events") or []
            if isinstance(e, dict) and str(e.get("eventStatus", "")).lower() == "ongoing"
        ]
        if events:
            kind = events[0].get("statusType") or "issue"
            return PageState.DEGRADED, f"ongoing {kind}: {str(events[0].get('message', ''))[:200]}"
        return PageState.OPERATIONAL, f"no ongoing event for {services[0].get('serviceName')}"
    components = data.get("components")
    if wanted and isinstance(components, list):  # Statuspage summary.json
        found = [c for c in components if isinstance(c, dict) and matches(c.get("name"))]
        if found:
            status = str(found[0].get("status", ""))
            state = PageState.OPERATIONAL if status == "operational" else PageState.DEGRADED
            return state, f"{found[0].get('name')}: {status or 'no status'}"
    status = data.get("status")
    if isinstance(status, dict) and "indicator" in status:  # Statuspage status.json
        indicator = str(status.get("indicator"))
        state = PageState.OPERATIONAL if indicator == "none" else PageState.DEGRADED
        return state, f"{status.get('description') or indicator} (indicator {indicator})"
    return PageState.UNKNOWN, "unrecognized status format"


# --- the decision -------------------------------------------------------------------------------


class PushThresholds(BaseModel):
    min_success_rate: float = Field(0.99, gt=0, le=1)
    min_sends: float = Field(100, ge=0, description="Judge a provider only over this many sends.")
    cause_share: float = Field(
        0.2, gt=0, le=1, description="An error class with this share of failures is a cause."
    )
    max_stale_share: float = Field(
        0.2, gt=0, le=1, description="Prune anyway when this share of the tokens is stale."
    )


class PushDecision(BaseModel):
    degraded: list[str] = Field(description="Providers delivering under the target.")
    causes: dict[str, list[ResultClass]] = Field(default_factory=dict)
    prune: bool = False
    escalate: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    reason: str


def decide_push(
    deliveries: list[ProviderDelivery],
    pages: list[StatusReading],
    stale: int | None,
    stale_share: float | None,
    t: PushThresholds,
) -> PushDecision:
    """Which providers deliver under the target and why; whether to prune stale tokens; what only
    a person can fix. ``stale`` None: the token table could not be read."""
    page_of = {p.provider.lower(): p for p in pages}
    degraded: list[str] = []
    causes: dict[str, list[ResultClass]] = {}
    escalate: list[str] = []
    notes: list[str] = []
    for d in deliveries:
        rate = d.success_rate
        page = page_of.get(d.provider.lower())
        page_down = page is not None and page.state is PageState.DEGRADED
        if rate is None or d.sent < t.min_sends or rate >= t.min_success_rate:
            if page_down:
                notes.append(f"{d.provider}'s status page reports a problem ({page.detail})")
            continue
        degraded.append(d.provider)
        found = [
            cls
            for cls in (
                ResultClass.PROVIDER,
                ResultClass.QUOTA,
                ResultClass.STALE_TOKEN,
                ResultClass.OTHER,
            )
            if d.share(cls) >= t.cause_share
        ]
        if not found and d.by_class:
            found = [max(d.by_class, key=lambda c: d.by_class[c])]
        causes[d.provider] = found
        what = d.describe()
        if ResultClass.PROVIDER in found or page_down:
            status = f"; its status page: {page.detail}" if page_down else ""
            escalate.append(
                f"provider {d.provider} is failing ({what}{status}): an outage at the provider, "
                "which the runbook cannot fix"
            )
        if ResultClass.QUOTA in found:
            escalate.append(
                f"{d.provider} rejects sends for quota (429: {d.by_class[ResultClass.QUOTA]:.0f} in "
                "the window): raise the quota or slow the dispatcher; the runbook cannot fix it"
            )
        if ResultClass.OTHER in found:
            others = sorted(
                (r for r in d.by_result if classify_result(r) is ResultClass.OTHER),
                key=lambda r: -d.by_result[r],
            )
            escalate.append(
                f"{d.provider} fails with errors the runbook does not fix ({', '.join(others[:5])}): "
                "check the dispatcher's logs (payload, credentials, configuration)"
            )
    stale_cause = any(ResultClass.STALE_TOKEN in c for c in causes.values())
    prune = bool(stale) and (
        stale_cause or (stale_share is not None and stale_share >= t.max_stale_share)
    )
    if stale_cause and stale is None:
        escalate.append("stale tokens cause failures, but the token table could not be read")
    elif stale_cause and not stale:
        notes.append(
            "providers answer 'unregistered', yet the token table holds no stale token: the "
            "dispatcher may not mark the tokens the providers reject"
        )
    if not deliveries:
        reason = "no push sends in the window: the delivery metrics are missing"
        escalate.append(reason)
    elif not degraded:
        reason = "every provider delivers at or above the target: " + "; ".join(
            d.describe() for d in deliveries
        )
    else:
        reason = "; ".join(
            f"{p} under target, caused by {', '.join(c.value for c in causes[p]) or 'unknown'}"
            for p in degraded
        )
    if prune:
        reason += f"; prune {stale} stale token(s)"
    return PushDecision(
        degraded=degraded, causes=causes, prune=prune, escalate=escalate, notes=notes, reason=reason
    )
