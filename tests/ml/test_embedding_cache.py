"""The embedding cache: keyed by data version and backbone, invalidated when either changes. The embeddings
come from the real Ray Data actor pool on a tiny local BERT; the counts are the cache's own."""

from __future__ import annotations

import numpy as np
import pytest

from ocm_ml.text.backbone import make_tiny_backbone
from ocm_ml.text.embeddings import Embedder, EmbeddingCache, backbone_id, embed_texts

TEXTS = [f"the {w} was {v} today" for w in ("meeting", "train", "coffee", "film") for v in ("great", "late")]


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    return (make_tiny_backbone(root / "a", TEXTS, seed=0, hidden_size=32),
            make_tiny_backbone(root / "b", TEXTS, seed=1, hidden_size=32))


def test_ray_data_embeddings_keep_row_order_and_match_the_model(ray_local, backbones):
    vectors = embed_texts(TEXTS, backbones[0], 16, actors=2, batch_size=3)
    direct = Embedder(backbones[0], 16)({"row": np.arange(len(TEXTS)), "text": np.array(TEXTS)})["embedding"]
    assert vectors.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(vectors, direct, atol=1e-5)  # row i is text i, whatever the length sort did


def test_cache_is_keyed_by_data_version_and_backbone(ray_local, backbones, tmp_path):
    a, b = backbones
    cache = EmbeddingCache(tmp_path / "cache")
    first = cache.get(TEXTS, data_key="md5-v1", backbone_dir=a, max_length=16, actors=1)
    assert (cache.hits, cache.misses, cache.texts_embedded) == (0, 1, len(TEXTS))
    again = cache.get(TEXTS, data_key="md5-v1", backbone_dir=a, max_length=16, actors=1)
    assert (cache.hits, cache.misses) == (1, 1)
    np.testing.assert_array_equal(first, again)
    # a new process (a later run) reads the same files
    later = EmbeddingCache(tmp_path / "cache")
    later.get(TEXTS, data_key="md5-v1", backbone_dir=a, max_length=16)
    assert (later.hits, later.misses) == (1, 0)

    cache.get(TEXTS, data_key="md5-v2", backbone_dir=a, max_length=16, actors=1)  # new data version
    assert (cache.hits, cache.misses) == (1, 2)
    other = cache.get(TEXTS, data_key="md5-v1", backbone_dir=b, max_length=16, actors=1)  # another backbone
    assert (cache.hits, cache.misses) == (1, 3)
    assert not np.allclose(other, first)
    cache.get(TEXTS, data_key="md5-v1", backbone_dir=a, max_length=8, actors=1)  # other truncation
    assert cache.misses == 4
    # other layers
    two = cache.get(TEXTS, data_key="md5-v1", backbone_dir=a, max_length=16, layers=2, actors=1)
    assert cache.misses == 5 and two.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(two[:, 32:], first, atol=1e-5)  # the last layer's pooling comes last

    # the same folder with new weights is another backbone: the id follows the bytes, not the path
    before = backbone_id(a)
    make_tiny_backbone(a, TEXTS, seed=7, hidden_size=32)
    assert backbone_id(a) != before
    cache.get(TEXTS, data_key="md5-v1", backbone_dir=a, max_length=16, actors=1)
    assert (cache.hits, cache.misses, cache.texts_embedded) == (1, 6, 6 * len(TEXTS))


def test_cache_needs_a_data_key(tmp_path, backbones):
    with pytest.raises(ValueError, match="needs a data_key"):
        EmbeddingCache(tmp_path).get(TEXTS, data_key="", backbone_dir=backbones[0], max_length=16)
