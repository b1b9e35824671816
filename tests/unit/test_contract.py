"""The registry contract's rules, by hand: tag grammar, label map, normalization, metadata.json and the
dataset-version record that passes between assets."""

import math
import pickle

import pytest

from ocm_ml.contract import (
    ContractError,
    DatasetVersion,
    SplitFile,
    check_label_map,
    check_normalization,
    parse_metadata,
    parse_tag,
)

CLASSES = ["T-shirt/top", "Trouser"]


@pytest.mark.parametrize("tag, expected", [("fashion-mnist-v1.0.0", ("fashion-mnist", "1.0.0")),
                                           ("tweet-sentiment-v10.2.33", ("tweet-sentiment", "10.2.33"))])
def test_tags(tag, expected):
    assert parse_tag(tag) == expected


@pytest.mark.parametrize("tag", ["fashion-mnist-v1.0", "fashion-mnist", "v1.0.0", "holdout/fashion-mnist",
                                 ""])
def test_bad_tags(tag):
    with pytest.raises(ContractError, match="not a registry version tag"):
        parse_tag(tag)


def test_label_map_is_ordered_by_id():
    assert list(check_label_map({"2": "positive", "0": "negative", "1": "neutral"}).items()) == [
        ("0", "negative"), ("1", "neutral"), ("2", "positive")]
    assert check_label_map({0: "a", 1: "b"}) == {"0": "a", "1": "b"}  # ids given as ints, as in Python


@pytest.mark.parametrize("label_map, message", [
    ({"0": "negative", "2": "positive"}, "keys must be the ids 0..1"),  # the old checks disagreed here
    ({"1": "a", "2": "b"}, "keys must be the ids 0..1"),
    ({"0": "a", "01": "b"}, "keys must be the ids 0..1"),
    ({"0": "a", "1": "a"}, "duplicate names"),
    ({"0": "a", "1": " "}, "non-empty"),
    ({}, "non-empty 'label_map'"),
    (["negative"], "non-empty 'label_map'"),
])
def test_bad_label_maps(label_map, message):
    with pytest.raises(ContractError, match=message):
        check_label_map(label_map, where="m.json")


def test_normalization():
    assert check_normalization({"mean": 0.286, "std": "0.353"}).std == pytest.approx(0.353)


@pytest.mark.parametrize("norm, message", [
    ({"mean": 0.2, "std": 0}, "std must be positive"),
    ({"mean": 0.2, "std": -1}, "std must be positive"),
    ({"mean": math.nan, "std": 0.3}, "finite"),
    ({"mean": "x", "std": 0.3}, "numbers"),
    ({"mean": 0.2}, "needs 'normalization'"),
    (None, "needs 'normalization'"),
])
def test_bad_normalizations(norm, message):
    with pytest.raises(ContractError, match=message):
        check_normalization(norm)


def test_metadata_json_parsed_and_required_by_kind():
    image = parse_metadata('{"normalization": {"mean": 0.2, "std": 0.3}, "classes": ["a", "b"], "rows": 5}')
    assert image.require("image") is image
    assert (image.normalization.mean, image.class_names, image.raw["rows"]) == (0.2, ("a", "b"), 5)
    text = parse_metadata({"label_map": {"1": "b", "0": "a"}})
    assert text.require("text").class_names == ("a", "b") and text.label_map == {"0": "a", "1": "b"}
    with pytest.raises(ContractError, match="needs a non-empty 'label_map'"):
        image.require("text")
    with pytest.raises(ContractError, match="needs 'normalization'"):
        text.require("image")
    with pytest.raises(ContractError, match="needs a non-empty 'classes'"):
        parse_metadata({"normalization": {"mean": 0.2, "std": 0.3}}).require("image")


@pytest.mark.parametrize("text, message", [("{", "not valid JSON"), ("[1]", "must be a JSON object"),
                                           ('{"label_map": {"0": "a", "2": "b"}}', "ids 0..1"),
                                           ('{"classes": ["a", "a"]}', "distinct")])
def test_bad_metadata_json(text, message):
    with pytest.raises(ContractError, match=message):
        parse_metadata(text, where="x/metadata.json at x-v1.0.0")


def test_dataset_version_names_each_thing_once():
    files = {s: SplitFile(f"fashion-mnist/{s}.parquet", f"/remote/{s}", f"md5-{s}", 10)
             for s in ("val", "train")}
    version = DatasetVersion("fashion-mnist-v1.2.0", "abc123", files, parse_metadata({"classes": CLASSES}))
    assert (version.dataset, version.version) == ("fashion-mnist", "1.2.0")
    assert version.content_md5 == "md5-train+md5-val"  # split order, whatever the mapping's order
    assert version.url("val") == "/remote/val"
    assert pickle.loads(pickle.dumps(version)) == version  # what the IO managers store between steps
