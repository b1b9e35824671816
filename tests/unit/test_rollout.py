"""The canary/shadow controller's decisions, on counters that move as a replica's would (no Serve needed: the
over-HTTP behaviour is tested in tests/serve/test_serving_assets.py)."""

import pytest

from ocm_ml.serve.rollout import RolloutPolicy, run_canary, run_shadow, sum_replica_stats


class FakeReplica:
    """Each read of the counters is 0.25 s of traffic at ``rps`` requests/s, split by the canary share."""

    def __init__(self, rps=100.0, error_rate=0.0, p99_ms=20.0, fail_from_share=None):
        self.share = 0.0
        self.rps, self.error_rate, self.p99_ms, self.fail_from_share = (rps, error_rate, p99_ms,
                                                                        fail_from_share)
        self.stats = {"canary_requests": 0, "canary_errors": 0, "shadow_items": 0, "shadow_errors": 0,
                      "shadow_agreements": 0}
        self.now = 0.0
        self.shares = []

    def set_share(self, share):
        self.shares.append(share)
        self.share = share

    def read(self):
        canary = int(self.rps * 0.25 * self.share)
        rate = self.error_rate
        if self.fail_from_share is not None and self.share >= self.fail_from_share:
            rate = 0.5
        self.stats["canary_requests"] += canary
        self.stats["canary_errors"] += int(round(canary * rate))
        mirrored = int(self.rps * 0.25)
        self.stats["shadow_items"] += mirrored
        self.stats["shadow_agreements"] += int(mirrored * 0.9)
        return {**self.stats, "canary_p99_ms": self.p99_ms, "champion_p99_ms": 10.0}

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def canary(policy, replica):
    return run_canary(policy, replica.set_share, replica.read, None, log=lambda _: None, clock=replica.clock,
                      sleep=replica.sleep)


POLICY = RolloutPolicy(strategy="canary", step_seconds=2.0, min_requests=10, max_error_rate=0.02,
                       max_p99_ms=100.0)


def test_healthy_challenger_steps_through_every_share():
    replica = FakeReplica()
    outcome = canary(POLICY, replica)
    assert outcome.passed and replica.shares == [0.05, 0.25, 0.5, 1.0]
    assert [s["share"] for s in outcome.steps] == [0.05, 0.25, 0.5, 1.0]
    assert all(s["canary_requests"] >= 10 for s in outcome.steps)


def test_errors_at_a_higher_share_stop_the_rollout_there():
    replica = FakeReplica(fail_from_share=0.5)
    outcome = canary(POLICY, replica)
    assert not outcome.passed and replica.shares == [0.05, 0.25, 0.5]
    assert "rolled back at 50%" in outcome.reasons[0] and "error rate" in outcome.reasons[0]


def test_slow_challenger_is_rolled_back_at_the_first_step():
    outcome = canary(POLICY, FakeReplica(p99_ms=400.0))
    assert not outcome.passed and "p99 latency 400.0 ms > 100 ms" in outcome.reasons[0]
    assert len(outcome.steps) == 1


def test_no_traffic_is_no_evidence():
    replica = FakeReplica(rps=0.0)
    outcome = canary(RolloutPolicy(strategy="canary", step_seconds=1.0, step_timeout_seconds=5.0), replica)
    assert not outcome.passed and "not enough traffic" in outcome.reasons[0]
    assert replica.now >= 5.0  # it waited for the timeout, then gave up


def test_shadow_judges_errors_and_agreement():
    replica = FakeReplica()
    ok = run_shadow(RolloutPolicy(strategy="shadow", shadow_seconds=1.0, min_shadow_agreement=0.8),
                    replica.read, None, log=lambda _: None, clock=replica.clock, sleep=replica.sleep)
    assert ok.passed and ok.steps[0]["shadow_agreement"] == pytest.approx(0.9, abs=0.05)
    replica = FakeReplica()
    low = run_shadow(RolloutPolicy(strategy="shadow", shadow_seconds=1.0, min_shadow_agreement=0.95),
                     replica.read, None, log=lambda _: None, clock=replica.clock, sleep=replica.sleep)
    assert not low.passed and "agreement" in low.reasons[0]


@pytest.mark.parametrize("kwargs, message", [
    ({"strategy": "blue-green"}, "rollout strategy must be one of"),
    ({"steps": (0.5, 0.25, 1.0)}, "must rise and end at 1.0"),
    ({"steps": (0.05, 0.5)}, "must rise and end at 1.0"),
    ({"steps": (0.0, 1.0)}, "shares in (0, 1]"),
    ({"max_error_rate": 1.5}, "max_error_rate"),
    ({"min_requests": 0}, "at least 1"),
])
def test_bad_policy_says_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        RolloutPolicy(**kwargs)


def test_replica_counters_are_summed_and_p99_is_the_worst():
    total = sum_replica_stats([
        {"canary_requests": 3, "canary_errors": 1, "canary_p99_ms": 12.0, "share": 0.5},
        {"canary_requests": 4, "canary_errors": 0, "canary_p99_ms": 30.0, "share": 0.5},
    ])
    assert total["canary_requests"] == 7 and total["canary_errors"] == 1 and total["canary_p99_ms"] == 30.0
