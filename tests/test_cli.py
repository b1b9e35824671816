"""The ``ocm`` command in its own package: its datasets come from the one family table, its dataset building
from the core, and the resource room imports nothing of the core but the registry contract."""

import ast
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from ocm_assets.families import FAMILIES
from ocm_cli.main import datasets, parser
from ocm_ml import sources
from tests.registry_helpers import new_registry, text_version

ROOT = Path(__file__).resolve().parents[1]


def test_datasets_are_the_families_datasets_that_ship():
    assert datasets() == tuple(dict.fromkeys(f.dataset for f in FAMILIES if f.dataset in sources.SHIPPED))
    assert datasets() == ("fashion-mnist", "tweet-sentiment")
    publish = parser().parse_args(["registry", "publish", "tweet-sentiment", "1.0.0"])
    assert (publish.dataset, publish.version) == ("tweet-sentiment", "1.0.0")
    with pytest.raises(SystemExit):
        parser().parse_args(["registry", "publish", "cifar-10", "1.0.0"])


def test_unknown_shipped_dataset_says_what_ships():
    with pytest.raises(sources.SourceError, match="shipped: fashion-mnist, tweet-sentiment"):
        sources.build_holdout("cifar-10")


def _ocm_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in modules if m == "ocm_ml" or m.startswith(("ocm_ml.", "ocm_cli", "ocm_assets"))}


@pytest.mark.parametrize("module", sorted(p.name for p in (ROOT / "ocm_resources").glob("*.py")))
def test_resources_import_only_the_registry_contract(module):
    imported = _ocm_modules(ROOT / "ocm_resources" / module)
    assert all(m == "ocm_ml.contract" or m.startswith("ocm_ml.contract.") for m in imported), imported


def test_console_script_runs_the_cli_package(tmp_path):
    scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")}
    assert scripts["ocm"] == "ocm_cli.main:main"
    pub, _ = new_registry(tmp_path)
    tables, meta = text_version()
    v = pub.publish("tweet-sentiment", "1.0.0", tables, meta)
    ocm = Path(sys.executable).parent / "ocm"
    out = subprocess.run([str(ocm), "registry", "list", "--repo", str(pub.root)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [v.tag, v.commit[:10]]
