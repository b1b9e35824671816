"""What the daemon does with the automation sensors, in-process: each sensor evaluates the conditions of its
selection with Dagster's own test helper (``dg.evaluate_automation_conditions``) and its own cursor, and every
request becomes a run, one per partition with the sensor's run tags, executed here."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import dagster as dg


@dataclass
class Tick:
    #: (sensor name, partition or None, sorted asset keys as strings, run succeeded) per run launched
    runs: list[tuple[str, str | None, tuple[str, ...], bool]] = field(default_factory=list)
    results: dict[str, dg.ExecuteInProcessResult] = field(default_factory=dict)

    def requested(self) -> list[tuple[str | None, tuple[str, ...]]]:
        return [(partition, keys) for _, partition, keys, _ in self.runs]


def automation_sensors(defs: dg.Definitions) -> list[dg.AutomationConditionSensorDefinition]:
    return [s for s in defs.sensors if isinstance(s, dg.AutomationConditionSensorDefinition)]


def _op_config(run_config: dict | None, keys: list[dg.AssetKey]) -> dict:
    ops = (run_config or {}).get("ops", {})
    selected = {"__".join(k.path) for k in keys}
    return {"ops": {op: cfg for op, cfg in ops.items() if op in selected}}


def automation_tick(defs: dg.Definitions, instance: dg.DagsterInstance, cursors: dict,
                    run_config: dict | None = None, only: tuple[str, ...] | None = None) -> Tick:
    """One evaluation of every automation sensor (or those named in ``only``), then its runs. ``run_config``
    (per op) stands in for the launchpad defaults a deployment sets; only the selected ops' entries are
    passed."""
    tick = Tick()
    assets = list(defs.assets or [])
    for sensor in automation_sensors(defs):
        if only is not None and sensor.name not in only:
            continue
        result = dg.evaluate_automation_conditions(
            defs=defs, instance=instance, asset_selection=sensor.asset_selection,
            cursor=cursors.get(sensor.name))
        cursors[sensor.name] = result.cursor
        by_partition: dict[str | None, list[dg.AssetKey]] = defaultdict(list)
        for key in sensor.asset_selection.resolve(defs.resolve_asset_graph()):
            for partition in result.get_requested_partitions(key):
                by_partition[partition].append(key)
        for partition, keys in sorted(by_partition.items(), key=lambda kv: str(kv[0])):
            run = dg.materialize(
                assets, selection=keys, partition_key=partition, instance=instance,
                resources=dict(defs.resources or {}), tags=dict(sensor.run_tags), raise_on_error=False,
                run_config=_op_config(run_config, keys),
            )
            names = tuple(sorted(k.to_user_string() for k in keys))
            tick.runs.append((sensor.name, partition, names, run.success))
            tick.results[f"{partition}:{','.join(names)}"] = run
    return tick


def drive(defs: dg.Definitions, instance: dg.DagsterInstance, cursors: dict, run_config: dict | None = None,
          max_ticks: int = 8, only: tuple[str, ...] | None = None) -> list[Tick]:
    """Ticks until one requests nothing (the chain has settled); returns the ticks that requested runs."""
    ticks = []
    for _ in range(max_ticks):
        tick = automation_tick(defs, instance, cursors, run_config, only)
        if not tick.runs:
            return ticks
        ticks.append(tick)
    raise AssertionError(f"automation still requesting runs after {max_ticks} ticks: {ticks[-1].runs}")
