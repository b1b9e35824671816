"""The champion gate as a property: a worse or equal challenger never wins; a clearly better one does; a
missing figure, a floor or a baseline not cleared never promotes."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ocm_ml.promotion import Gate, decide

metric = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
margin = st.floats(min_value=0.0, max_value=0.2, allow_nan=False)


@given(challenger=metric, champion=metric, margin=margin)
def test_worse_or_equal_never_promoted(challenger, champion, margin):
    d = decide({"accuracy": challenger}, {"accuracy": champion}, Gate(win_margin=margin))
    if challenger <= champion:
        assert not d.promote
    if d.promote:
        assert challenger - champion >= margin and challenger > champion


@given(champion=st.floats(min_value=0.0, max_value=0.8), margin=st.floats(min_value=0.0, max_value=0.1),
       extra=st.floats(min_value=1e-6, max_value=0.1))
def test_better_by_margin_promoted(champion, margin, extra):
    challenger = champion + margin + extra
    assert decide({"accuracy": challenger}, {"accuracy": champion}, Gate(win_margin=margin)).promote


def test_every_floor_is_checked_and_reported():
    gate = Gate(floors={"accuracy": 0.85, "macro_f1": 0.80})
    assert decide({"accuracy": 0.9, "macro_f1": 0.85}, None, gate).promote
    d = decide({"accuracy": 0.84, "macro_f1": 0.79}, None, gate)
    assert not d.promote and len(d.reasons) == 2
    assert "accuracy 0.8400 is below the floor 0.8500" in d.reasons[0] and "macro_f1" in d.reasons[1]


def test_baseline_margin():
    gate = Gate(baseline_margins={"accuracy": 0.05}, win_metric="macro_f1")
    majority = {"majority": {"accuracy": 0.42}}
    assert decide({"accuracy": 0.48, "macro_f1": 0.4}, None, gate, baselines=majority).promote
    d = decide({"accuracy": 0.46, "macro_f1": 0.4}, None, gate, baselines=majority)
    assert not d.promote and "does not beat the majority baseline" in d.reasons[0]
    assert not decide({"accuracy": 0.9, "macro_f1": 0.9}, None, gate).promote  # baselines missing


@pytest.mark.parametrize("bad", [None, math.nan, math.inf])
def test_missing_metric_is_not_promoted(bad):
    assert not decide({"accuracy": bad}, {"accuracy": 0.5}, Gate(win_margin=0.0)).promote
    assert not decide({"accuracy": 0.9}, {"accuracy": bad}, Gate(win_margin=0.0)).promote
    assert not decide({"accuracy": bad}, None, Gate(floors={"accuracy": 0.0})).promote
    assert not decide({}, {"accuracy": 0.5}, Gate()).promote


def test_tie_never_promotes_even_with_zero_margin():
    assert not decide({"accuracy": 0.9}, {"accuracy": 0.9}, Gate(win_margin=0.0)).promote


def test_same_version_and_bad_gates():
    assert not decide({"accuracy": 0.99}, {"accuracy": 0.5}, Gate(), same_version=True).promote
    with pytest.raises(ValueError, match="win_margin"):
        Gate(win_margin=-0.1)
    with pytest.raises(ValueError, match="unknown gate metric 'loss'"):
        Gate(floors={"loss": 0.1})
    with pytest.raises(ValueError, match="finite"):
        Gate(floors={"accuracy": math.nan})


def test_a_challenger_below_the_tfidf_baseline_is_not_promoted():
    from ocm_assets.families import TEXT_GATE

    baselines = {"majority": {"accuracy": 0.44, "macro_f1": 0.2},
                 "tfidf_lr": {"accuracy": 0.76, "macro_f1": 0.738}}
    below = decide({"accuracy": 0.74, "macro_f1": 0.712}, None, TEXT_GATE, baselines=baselines)
    assert not below.promote
    assert any("does not beat the tfidf_lr baseline's 0.7380" in r for r in below.reasons), below.reasons
    tie = decide({"accuracy": 0.77, "macro_f1": 0.738}, None, TEXT_GATE, baselines=baselines)
    assert not tie.promote
    above = decide({"accuracy": 0.78, "macro_f1": 0.75}, None, TEXT_GATE, baselines=baselines)
    assert above.promote and {c["check"] for c in above.checks} >= {"majority accuracy", "tfidf_lr macro_f1"}
    # without the reference figures the text gate refuses: a missing baseline never promotes
    assert not decide({"accuracy": 0.9, "macro_f1": 0.9}, None, TEXT_GATE,
                      baselines={"majority": baselines["majority"]}).promote
    with pytest.raises(ValueError, match="margins must be >= 0"):
        Gate(must_beat={"tfidf_lr": {"macro_f1": -0.1}})
    with pytest.raises(ValueError, match="unknown gate metric 'loss'"):
        Gate(must_beat={"tfidf_lr": {"loss": 0.0}})
