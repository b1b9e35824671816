"""Lineage for clients: the Dagster webserver, started from ``workspace.yaml`` as a user would, serves the
whole chain over its GraphQL API — dataset → preprocessing → model (or → hpo → model) → evaluation →
champion → endpoint for every family — with the asset checks on the right assets.

One ``dagster-webserver`` for the module (fresh DAGSTER_HOME with telemetry off, fresh OCM_HOME, a free
loopback port), killed by process group at teardown. The helpers live in ``scripts/screenshot_lineage.py``,
which also takes the UI screenshots in ``docs/``.
"""

from __future__ import annotations

import pytest

from scripts.screenshot_lineage import graphql, start_webserver, stop_webserver

ASSET_NODES_QUERY = """
query LineageForClients {
  assetNodes {
    assetKey { path }
    dependencyKeys { path }
    groupName
    isPartitioned
    assetChecksOrError {
      __typename
      ... on AssetChecks { checks { name blocking } }
      ... on AssetCheckNeedsMigrationError { message }
      ... on AssetCheckNeedsUserCodeUpgrade { message }
      ... on AssetCheckNeedsAgentUpgradeError { message }
    }
  }
}
"""

# The chain per family, upstream first; each asset must depend on the one before it.
CHAINS = {
    "fashion_mnist": ["dataset", "preprocessing", "model", "evaluation", "champion", "endpoint"],
    "tweet_sentiment": ["dataset", "preprocessing", "hpo", "model", "evaluation", "champion", "endpoint"],
}

CHECKS = {
    "fashion_mnist": {
        "dataset": {"schema"},
        "preprocessing": {"normalization_matches_data"},
        "champion": {"promoted"},
        "endpoint": {"health", "known_answer"},
    },
    "tweet_sentiment": {
        "dataset": {"schema"},
        "preprocessing": {"label_map_matches_data"},
        "champion": {"promoted"},
        "endpoint": {"health", "known_answer"},
    },
}

PARTITIONED = {"dataset", "preprocessing", "hpo", "model", "evaluation"}


@pytest.fixture(scope="module")
def asset_nodes(tmp_path_factory):
    server = start_webserver(tmp_path_factory.mktemp("lineage-ui"), timeout=100)
    try:
        nodes = graphql(server.url, ASSET_NODES_QUERY)["assetNodes"]
        yield {"/".join(n["assetKey"]["path"]): n for n in nodes}
    finally:
        stop_webserver(server)
    assert server.proc.poll() is not None, "dagster-webserver still running after teardown"


def _deps(node) -> set[str]:
    return {"/".join(d["path"]) for d in node["dependencyKeys"]}


@pytest.mark.parametrize("family", sorted(CHAINS))
def test_chain_dataset_to_endpoint(asset_nodes, family):
    chain = [f"{family}/{name}" for name in CHAINS[family]]
    missing = [key for key in chain if key not in asset_nodes]
    assert not missing, f"assets missing from the webserver's graph: {missing}; has {sorted(asset_nodes)}"

    assert _deps(asset_nodes[chain[0]]) == set(), f"{chain[0]} should be a root"
    for upstream, downstream in zip(chain, chain[1:], strict=False):
        assert upstream in _deps(asset_nodes[downstream]), (
            f"{downstream} does not depend on {upstream}: deps {sorted(_deps(asset_nodes[downstream]))}"
        )

    # Every family's assets form one group, named after the family, and nothing leaks across families.
    for key in chain:
        assert asset_nodes[key]["groupName"] == family
        assert all(dep.startswith(f"{family}/") for dep in _deps(asset_nodes[key])), key
        assert asset_nodes[key]["isPartitioned"] == (key.split("/")[-1] in PARTITIONED), key


@pytest.mark.parametrize("family", sorted(CHECKS))
def test_asset_checks_exposed(asset_nodes, family):
    for name, expected in CHECKS[family].items():
        result = asset_nodes[f"{family}/{name}"]["assetChecksOrError"]
        assert result["__typename"] == "AssetChecks", result
        got = {c["name"] for c in result["checks"]}
        assert expected <= got, f"{family}/{name}: checks {sorted(got)}, expected {sorted(expected)}"
    for name in ("dataset", "preprocessing"):
        checks = asset_nodes[f"{family}/{name}"]["assetChecksOrError"]["checks"]
        assert all(c["blocking"] for c in checks), f"{family}/{name} data checks must be blocking: {checks}"
