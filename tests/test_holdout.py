"""The fixed holdout: built from the real data that ships here, in no version's training split, and the
publisher refuses a version that would train on it."""

import pytest

from ocm_ml import sources
from ocm_ml.contract import holdout_tag, row_keys
from ocm_ml.sources import VersionOptions, build_holdout, fashion_mnist_version, tweet_sentiment_version
from ocm_resources.registry import RegistryError
from tests.registry_helpers import image_version, new_registry


def test_real_fashion_mnist_holdout_is_in_no_training_split():
    holdout = build_holdout("fashion-mnist")
    assert holdout.num_rows == 10_000 - sources.FASHION_MNIST_HOLDOUT_START
    held = set(row_keys(holdout))
    for resplit in (None, 7):  # v1.0.0's official split, and the demo's pooled re-split
        tables, _ = fashion_mnist_version(VersionOptions(resplit_seed=resplit))
        assert not held & set(row_keys(tables["train"])), resplit
        assert not held & set(row_keys(tables["val"])), resplit
        assert (tables["train"].num_rows == 60_000
                and tables["val"].num_rows == sources.FASHION_MNIST_HOLDOUT_START)


def test_real_tweet_holdout_is_in_no_split():
    holdout = build_holdout("tweet-sentiment")
    assert holdout.num_rows == sources.TWEET_HOLDOUT_ROWS
    held = set(row_keys(holdout))
    tables, _ = tweet_sentiment_version(VersionOptions(seed=0, val_fraction=0.2))
    assert not held & set(row_keys(tables["train"]))
    assert not held & set(row_keys(tables["val"]))
    # every label occurs in the holdout, so per-class figures exist for each
    assert set(holdout.column("label").to_pylist()) == {0, 1, 2}


def test_publisher_refuses_a_version_that_trains_on_the_holdout(tmp_path):
    pub, reg = new_registry(tmp_path)
    tables, metadata = image_version(n_train=40, n_val=10, seed=0)
    pub.publish_holdout("fashion-mnist", tables["val"])
    assert reg.holdout("fashion-mnist").tag == holdout_tag("fashion-mnist")
    assert reg.holdout("tweet-sentiment") is None

    leaky = {"train": tables["val"].slice(3, 2), "val": tables["train"]}
    import pyarrow as pa

    leaky["train"] = pa.concat_tables([tables["train"], leaky["train"]])
    with pytest.raises(RegistryError,
                       match=r"2 row\(s\) of the train split are in the holdout holdout/fashion-mnist"):
        pub.publish("fashion-mnist", "1.0.0", leaky, metadata)
    assert not pub.has_tag("fashion-mnist-v1.0.0")  # nothing was published
    assert pub.publish("fashion-mnist", "1.0.0", tables, metadata).tag == "fashion-mnist-v1.0.0"
    # the holdout tag is not a version and is never taken for a malformed one
    assert reg.scan("fashion-mnist").malformed == ()


def test_a_holdout_is_fixed(tmp_path):
    pub, _ = new_registry(tmp_path)
    tables, _ = image_version(n_train=10, n_val=5, seed=0)
    pub.publish_holdout("fashion-mnist", tables["val"])
    with pytest.raises(RegistryError, match="a holdout is fixed"):
        pub.publish_holdout("fashion-mnist", tables["train"])
