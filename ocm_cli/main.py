"""``ocm``: the project's command line.

    ocm registry init                         create the embedded git+DVC registry under $OCM_HOME
    ocm registry seed                         init + publish v1.0.0 of every dataset that has none
    ocm registry holdout DATASET              publish the dataset's fixed holdout (once; seed/publish do it)
    ocm registry publish DATASET VERSION      publish a version from the real data that ships here
    ocm registry list [DATASET]               versions by tag (any registry: --repo PATH_OR_URL)
    ocm registry show TAG                     commit, files, md5s and metadata of one version

The datasets are those of the families in ``ocm_assets.families`` that ``ocm_ml.sources`` can build from the
data shipped here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def datasets() -> tuple[str, ...]:
    """Registry datasets of the declared families, in family order, that can be built from shipped data."""
    from ocm_assets.families import FAMILIES
    from ocm_ml.sources import SHIPPED

    return tuple(d for d in dict.fromkeys(f.dataset for f in FAMILIES) if d in SHIPPED)


def _publisher(args):
    from ocm_resources.env import local_paths
    from ocm_resources.registry import RegistryPublisher

    paths = local_paths()
    root = Path(args.registry) if args.registry else paths.registry
    remote = Path(args.remote) if args.remote else paths.dvc_remote
    return RegistryPublisher(root, remote_dir=remote)


def _reader(args):
    from ocm_resources.env import registry_url
    from ocm_resources.registry import DvcRegistry

    return DvcRegistry(repo_url=args.repo or (args.registry or registry_url()))


def _ensure_holdout(pub, dataset: str, source: str | None = None) -> None:
    from ocm_ml.contract import holdout_tag
    from ocm_ml.sources import build_holdout

    if pub.has_tag(holdout_tag(dataset)):
        return
    table = build_holdout(dataset, source)
    v = pub.publish_holdout(dataset, table)
    print(f"published {v.tag} at {v.commit[:10]} ({table.num_rows} rows no version may train on)")


def _publish(pub, dataset: str, version: str, options, message: str | None = None, force: bool = False):
    from ocm_ml.sources import build_version

    tables, metadata = build_version(dataset, options)
    metadata["version"] = version
    v = pub.publish(dataset, version, tables, metadata, message=message, force=force)
    rows = ", ".join(f"{split} {t.num_rows}" for split, t in tables.items())
    print(f"published {v.tag} at {v.commit[:10]} in {pub.root} ({rows})")


def cmd_init(args) -> int:
    pub = _publisher(args)
    created = pub.init()
    state = "created" if created else "already exists"
    print(f"registry {state} at {pub.root} (DVC remote {pub.remote_dir})")
    return 0


def cmd_holdout(args) -> int:
    pub = _publisher(args)
    pub.init()
    _ensure_holdout(pub, args.dataset, args.source)
    return 0


def cmd_publish(args) -> int:
    from ocm_ml.sources import VersionOptions
    from ocm_resources.registry import tag_for

    tag_for(args.dataset, args.version)  # a bad version fails before any data is read
    pub = _publisher(args)
    pub.init()
    _ensure_holdout(pub, args.dataset, args.source)
    fields = {f.name for f in dataclasses.fields(VersionOptions)}
    options = VersionOptions(**{k: v for k, v in vars(args).items() if k in fields})
    _publish(pub, args.dataset, args.version, options, message=args.message, force=args.force)
    return 0


def cmd_seed(args) -> int:
    from ocm_ml.sources import VersionOptions
    from ocm_resources.registry import DvcRegistry

    pub = _publisher(args)
    pub.init()
    registry = DvcRegistry(repo_url=str(pub.root))
    for dataset in datasets():
        _ensure_holdout(pub, dataset)
        existing = registry.list_versions(dataset)
        if existing:
            print(f"{dataset}: {', '.join(v.tag for v in existing)} (kept)")
            continue
        _publish(pub, dataset, "1.0.0", VersionOptions())
    return 0


def cmd_list(args) -> int:
    registry = _reader(args)
    for dataset in [args.dataset] if args.dataset else datasets():
        scan = registry.scan(dataset)
        for v in scan.versions:
            print(f"{v.tag}\t{v.commit[:10]}")
        for tag in scan.malformed:
            print(f"{tag}\t(malformed tag, ignored)")
    return 0


def cmd_show(args) -> int:
    from ocm_ml.contract import SPLITS, split_path

    registry = _reader(args)
    v = registry.resolve(args.tag)
    files = {s: dataclasses.asdict(registry.file_info(v, split_path(v.dataset, s))) for s in SPLITS}
    metadata = dict(registry.read_metadata(v).raw)
    print(json.dumps({"tag": v.tag, "commit": v.commit, "files": files, "metadata": metadata}, indent=2))
    return 0


COMMANDS = {"init": cmd_init, "seed": cmd_seed, "holdout": cmd_holdout, "publish": cmd_publish,
            "list": cmd_list, "show": cmd_show}


def parser() -> argparse.ArgumentParser:
    names = datasets()
    p = argparse.ArgumentParser(prog="ocm", description="ocm: the asset-graph ML platform's command line")
    sub = p.add_subparsers(dest="group", required=True)
    reg = sub.add_parser("registry", help="the DVC data registry")
    rsub = reg.add_subparsers(dest="command", required=True)

    def common(sp, reading=False):
        sp.add_argument("--registry", help="registry working copy (default $OCM_HOME/registry)")
        if reading:
            sp.add_argument("--repo", help="any registry repo by path or git URL (read-only)")
        else:
            sp.add_argument("--remote",
                            help="DVC remote folder for a new registry (default $OCM_HOME/dvc-remote)")

    source_help = "IDX folder (fashion-mnist) or CSV (tweet-sentiment); default: what ships"
    common(rsub.add_parser("init", help="create the embedded registry"))
    common(rsub.add_parser("seed", help="init and publish v1.0.0 of each dataset that has no version"))
    pub = rsub.add_parser("publish", help="publish a dataset version from the real data")
    common(pub)
    pub.add_argument("dataset", choices=names)
    pub.add_argument("version", help="semver, e.g. 1.1.0")
    pub.add_argument("--source", help=source_help)
    pub.add_argument("--train-rows", type=int, help="keep only the first N training rows")
    pub.add_argument("--val-rows", type=int, help="keep only the first N validation rows")
    pub.add_argument("--resplit-seed", type=int,
                     help="fashion-mnist: pool train+test and re-split with this seed")
    pub.add_argument("--seed", type=int, default=0, help="tweet-sentiment: split seed (default 0)")
    pub.add_argument("--val-fraction", type=float, default=0.2, help="tweet-sentiment: validation share")
    pub.add_argument("--message", help="commit and tag message")
    pub.add_argument("--force", action="store_true", help="move an existing tag to the new content")
    hold = rsub.add_parser("holdout", help="publish a dataset's fixed holdout (once; seed and publish do it)")
    common(hold)
    hold.add_argument("dataset", choices=names)
    hold.add_argument("--source", help=source_help)
    ls = rsub.add_parser("list", help="list versions")
    common(ls, reading=True)
    ls.add_argument("dataset", nargs="?")
    show = rsub.add_parser("show", help="show one version")
    common(show, reading=True)
    show.add_argument("tag")
    return p


def main(argv: list[str] | None = None) -> int:
    from ocm_ml.sources import SourceError
    from ocm_resources.registry import RegistryError

    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (RegistryError, SourceError, ValueError) as exc:
        print(f"ocm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
