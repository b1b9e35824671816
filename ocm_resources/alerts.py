"""Alert notifications through a webhook (Slack-compatible JSON); off unless a URL is configured.

A failed gate, a rollback and a failed drift check each send one message. Sending never raises: a
webhook that is down, slow or refuses the message is logged (and counted) and the run goes on.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr

logger = logging.getLogger("ocm.alerts")

#: Events ocm sends, and the emoji Slack shows before each.
EVENTS = {"gate_failed": ":no_entry:", "rollback": ":rewind:", "drift": ":chart_with_downwards_trend:"}


def slack_payload(event: str, title: str, text: str, fields: dict[str, Any] | None = None,
                  link: str | None = None, channel: str | None = None) -> dict[str, Any]:
    """A Slack incoming-webhook message (``text`` for plain clients, ``blocks`` for Slack), with ocm's own
    ``ocm`` section so that other receivers can read the event without parsing text."""
    fields = {k: v for k, v in (fields or {}).items() if v is not None}
    headline = f"{EVENTS.get(event, ':bell:')} *{title}*"
    blocks: list[dict[str, Any]] = [{"type": "section",
                                     "text": {"type": "mrkdwn", "text": f"{headline}\n{text}"}}]
    if fields:
        blocks.append({"type": "section", "fields": [
            {"type": "mrkdwn", "text": f"*{k}*\n{v}"} for k, v in list(fields.items())[:10]]})
    if link:
        blocks.append({"type": "context",
                       "elements": [{"type": "mrkdwn", "text": f"<{link}|open in Dagster>"}]})
    payload: dict[str, Any] = {"text": f"{title}: {text}", "blocks": blocks,
                               "ocm": {"event": event, "title": title, "text": text, "fields": fields,
                                       **({"link": link} if link else {})}}
    if channel:
        payload["channel"] = channel
    return payload


class WebhookAlerts(dg.ConfigurableResource):
    """Posts ocm's alerts to a Slack-compatible incoming webhook. Without ``webhook_url`` it does nothing.

    Example::

        WebhookAlerts(webhook_url=dg.EnvVar("OCM_ALERT_WEBHOOK_URL"))
        alerts.notify("drift", "fashion_mnist input drift", "pixel_mean PSI 1.8 > 0.25", {"hour": "13"})
    """

    webhook_url: str | None = Field(
        default=None,
        description="Incoming-webhook URL (secret: set it through dg.EnvVar); None turns alerts off."
    )
    channel: str | None = Field(
        default=None, description="Channel override sent in the payload (Slack legacy hooks).")
    timeout_s: float = Field(
        default=5.0, description="Seconds a webhook call may take before it is given up.")
    dagster_url: str | None = Field(
        default=None, description="Base URL of the Dagster UI, for links in messages.")

    _sent: int = PrivateAttr(default=0)
    _failed: int = PrivateAttr(default=0)

    @property
    def enabled(self) -> bool:
        return bool(self.webhook_url)

    def notify(self, event: str, title: str, text: str, fields: dict[str, Any] | None = None,
               link: str | None = None, log: Any = None) -> bool:
        """Send one alert; True when the webhook accepted it (2xx). Never raises."""
        if not self.webhook_url:
            return False
        if link is None and self.dagster_url:
            link = self.dagster_url
        body = json.dumps(slack_payload(event, title, text, fields, link, self.channel), default=str).encode()
        request = urllib.request.Request(self.webhook_url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        where = self.webhook_url.split("?")[0].rsplit("/", 1)[0]  # no secret path segment in the log
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                ok = 200 <= response.status < 300
                reason = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            ok, reason = False, f"HTTP {exc.code}"
        except Exception as exc:  # unreachable, timeout, TLS, anything: logged, never raised
            ok, reason = False, f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        if ok:
            self._sent += 1
        else:
            self._failed += 1
            message = f"alert {event!r} ({title}) not delivered to {where}/…: {reason}; the run goes on"
            (log.warning if log is not None else logger.warning)(message)
        return ok
