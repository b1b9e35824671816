"""The text schema check flags mis-decoded text (mojibake) without failing on it, and counts it exactly."""

import pyarrow as pa

from ocm_ml.validation import MOJIBAKE_FLAG, has_mojibake, validate_text_batches


def test_mis_decoded_tweets_are_counted_and_flagged_but_do_not_fail_the_schema():
    texts = ["I love it", "GoogleÕ¢_\x8aÎ_\x86¢s driverless cars", "Õ¢_\x8aÎ\x81Ð@edasneak: hi",
             "Google’s cars"]
    report = validate_text_batches([pa.record_batch({"text": texts, "label": [0, 1, 2, 0]})], [0, 1, 2])
    assert report.passed and report.rows == 4
    assert report.flagged == {MOJIBAKE_FLAG: 2}


def test_clean_text_is_not_flagged_and_typographic_characters_are_fine():
    texts = ["naïve café – “quoted” ’apostrophe’ €5", "plain"]
    report = validate_text_batches([pa.record_batch({"text": texts, "label": [0, 1]})], [0, 1])
    assert report.passed and report.flagged == {}
    assert not any(has_mojibake(t) for t in texts) and has_mojibake("a\x9fb")
