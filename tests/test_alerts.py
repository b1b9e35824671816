"""Webhook alerts against a real loopback HTTP server: Slack-compatible JSON for a failed gate, a rollback
and a drift failure; a failing webhook is logged and never raises; off by default."""

from __future__ import annotations

import http.server
import json
import logging
import socket
import threading

import dagster as dg
import pytest

from ocm_assets.families import Family
from ocm_resources.alerts import WebhookAlerts, slack_payload

FAM = Family("alerts_test", "fashion-mnist", "image", "alert tests")


class Webhook:
    """A loopback webhook answering ``status``; with ``hold``, each answer waits until the test calls
    ``release()`` (or 30 s pass), so a client that returns first must have given up by its own timeout."""

    def __init__(self, status: int = 200, hold: bool = False):
        received = self.received = []
        released = self.released = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append({"path": self.path, "type": self.headers["Content-Type"],
                                 "json": json.loads(body)})
                if hold:
                    released.wait(30)
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/T1/B2/very-secret-token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def release(self):
        self.released.set()

    def __exit__(self, *exc):
        self.release()
        self.server.shutdown()
        self.server.server_close()


def test_notify_posts_slack_compatible_json():
    with Webhook() as hook:
        alerts = WebhookAlerts(webhook_url=hook.url, channel="#ml-alerts")
        assert alerts.notify("drift", "fashion_mnist: input_drift failed", "pixel_mean PSI 3.1 > 0.25",
                             {"rows": 300, "ignored": None})
    (got,) = hook.received
    assert got["path"] == "/services/T1/B2/very-secret-token" and got["type"] == "application/json"
    body = got["json"]
    assert body["text"] == "fashion_mnist: input_drift failed: pixel_mean PSI 3.1 > 0.25"
    assert body["channel"] == "#ml-alerts"
    assert (body["blocks"][0]["type"] == "section"
            and "input_drift failed" in body["blocks"][0]["text"]["text"])
    assert body["blocks"][1]["fields"] == [{"type": "mrkdwn", "text": "*rows*\n300"}]
    assert body["ocm"]["event"] == "drift" and body["ocm"]["fields"] == {"rows": 300}


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/hooks/secret-part"


@pytest.mark.parametrize("case", ["http_500", "refused", "timeout"])
def test_a_failing_webhook_is_logged_and_never_raises(case, caplog):
    """Checks the failure is logged and returned, never raised; for "timeout", the webhook holds its answer
    until notify() has returned, so notify() can only come back by giving up at its own ``timeout_s``."""
    caplog.set_level(logging.WARNING, logger="ocm.alerts")
    if case == "refused":
        alerts = WebhookAlerts(webhook_url=_closed_port_url())
        assert alerts.notify("rollback", "t", "x") is False
    else:
        with Webhook(status=500 if case == "http_500" else 200, hold=case == "timeout") as hook:
            alerts = WebhookAlerts(webhook_url=hook.url, timeout_s=0.5)
            assert alerts.notify("rollback", "t", "x") is False
            hook.release()  # only now may the webhook answer: notify() had already given up
        assert len(hook.received) == 1  # one try, no retry
    (record,) = caplog.records
    assert "not delivered" in record.getMessage() and "the run goes on" in record.getMessage()
    assert "secret" not in record.getMessage()
    if case == "timeout":
        assert "timed out" in record.getMessage(), record.getMessage()


def test_alerts_are_off_by_default(monkeypatch):
    from ocm_resources import env

    monkeypatch.delenv("OCM_ALERT_WEBHOOK_URL", raising=False)
    off = env.alerts_resource()
    assert not off.enabled and off.notify("drift", "t", "x") is False
    monkeypatch.setenv("OCM_ALERT_WEBHOOK_URL", "http://127.0.0.1:9/hook")
    on = env.alerts_resource()
    assert isinstance(on.webhook_url, dg.EnvVar) or on.webhook_url == "http://127.0.0.1:9/hook"


def test_payload_without_fields_or_link():
    body = slack_payload("gate_failed", "kept", "challenger below floor")
    assert len(body["blocks"]) == 1 and "channel" not in body


def _gate_and_rollback_assets():
    """Assets with the champion's and endpoint's keys that emit what the real ones emit when the gate keeps
    the champion (check `promoted` failed, WARN) and when a rollout fails and restores the champion
    (dg.Failure)."""
    from ocm_assets.serving import champion_key, endpoint_key

    @dg.asset(key=champion_key(FAM), check_specs=[dg.AssetCheckSpec("promoted", asset=champion_key(FAM))])
    def champion():
        yield dg.Output({"decision": "kept"})
        yield dg.AssetCheckResult(check_name="promoted", passed=False, severity=dg.AssetCheckSeverity.WARN,
                                  description="holdout accuracy 0.61 < floor 0.85")

    @dg.asset(key=endpoint_key(FAM), deps=[champion_key(FAM)])
    def endpoint():
        raise dg.Failure("rollout of models:/m/3 failed: canary p99 300 ms > 250 ms. alerts_test serves the "
                         "champion models:/m/2 again; alias champion unchanged")

    return [champion, endpoint]


def test_alert_sensor_sends_gate_and_rollback_alerts_once(tmp_path):
    from ocm_assets.monitoring import build_alert_sensor

    sensor = build_alert_sensor(FAM)
    with Webhook() as hook, dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        resources = {"alerts": WebhookAlerts(webhook_url=hook.url)}
        first = dg.build_sensor_context(instance=instance, resources=resources)
        sensor(first)  # the first tick starts from now
        assert not hook.received
        result = dg.materialize(_gate_and_rollback_assets(), instance=instance, raise_on_error=False)
        assert not result.success
        tick = dg.build_sensor_context(instance=instance, cursor=first.cursor, resources=resources)
        skip = sensor(tick)
        assert "2 alert(s) sent" in skip.skip_message
        events = {b["json"]["ocm"]["event"]: b["json"] for b in hook.received}
        assert sorted(events) == ["gate_failed", "rollback"]
        assert "0.61 < floor 0.85" in events["gate_failed"]["text"]
        assert "serves the champion models:/m/2 again" in events["rollback"]["text"]
        sensor(dg.build_sensor_context(instance=instance, cursor=tick.cursor, resources=resources))
        assert len(hook.received) == 2  # nothing twice


def test_alert_sensor_with_a_dead_webhook_does_not_fail(tmp_path):
    from ocm_assets.monitoring import build_alert_sensor

    sensor = build_alert_sensor(FAM)
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        resources = {"alerts": WebhookAlerts(webhook_url=_closed_port_url(), timeout_s=0.5)}
        first = dg.build_sensor_context(instance=instance, resources=resources)
        sensor(first)
        dg.materialize(_gate_and_rollback_assets(), instance=instance, raise_on_error=False)
        skip = sensor(dg.build_sensor_context(instance=instance, cursor=first.cursor, resources=resources))
        assert "0 alert(s) sent" in skip.skip_message
