"""The champion gate as a property: a worse or equal challenger never wins; a clearly better one does."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ocm_ml.promotion import decide_promotion

metric = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
margin = st.floats(min_value=0.0, max_value=0.2, allow_nan=False)


@given(challenger=metric, champion=metric, margin=margin)
def test_worse_or_equal_never_promoted(challenger, champion, margin):
    d = decide_promotion(challenger, champion, floor=0.0, margin=margin)
    if challenger <= champion:
        assert not d.promote
    if d.promote:
        assert challenger - champion >= margin and challenger > champion


@given(champion=st.floats(min_value=0.0, max_value=0.8), margin=st.floats(min_value=0.0, max_value=0.1),
       extra=st.floats(min_value=1e-6, max_value=0.1))
def test_better_by_margin_promoted(champion, margin, extra):
    challenger = champion + margin + extra
    assert decide_promotion(challenger, champion, floor=0.0, margin=margin).promote


@given(challenger=metric, champion=metric, margin=margin)
def test_min_mode_mirrors_max(challenger, champion, margin):
    as_max = decide_promotion(challenger, champion, floor=0.0, margin=margin)
    as_min = decide_promotion(-challenger, -champion, floor=0.0, margin=margin, mode="min")
    assert as_max.promote == as_min.promote


def test_first_model_needs_the_floor():
    assert decide_promotion(0.9, None, floor=0.8, margin=0.01).promote
    d = decide_promotion(0.7, None, floor=0.8, margin=0.01)
    assert not d.promote and "below the floor" in d.reasons[0]


@pytest.mark.parametrize("bad", [None, math.nan, math.inf])
def test_missing_metric_is_not_promoted(bad):
    assert not decide_promotion(bad, 0.5, floor=0.0, margin=0.0).promote


def test_same_version_and_bad_margin():
    assert not decide_promotion(0.99, 0.5, floor=0, margin=0, same_version=True).promote
    with pytest.raises(ValueError, match="margin"):
        decide_promotion(0.9, 0.5, floor=0, margin=-0.1)
