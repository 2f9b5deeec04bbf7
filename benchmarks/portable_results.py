"""Rewrite campaign folders written before results were portable, so that they hold no machine's path.

Campaigns of gdfo-ray before 2026-12-05 recorded each cell's ``output_dir`` and data root as absolute
paths (in ``config_json`` and ``summary_json`` of every cell, and in ``campaign.yaml``), and the
report named the folder by its absolute path. This rewrites, in place and idempotently:

- each cell's ``output_dir`` as ``runs/<cell>`` (relative to the campaign folder), its data root and
  every path under it as ``$GDFO_DATA_DIR``, in ``config_json`` and ``summary_json``;
- ``campaign.yaml``: ``results_dir`` as ``.``, the same data root by name, ``reuse`` relative;
- a ``report.md`` line ``Results: `/abs/path```, for a folder without cells to regenerate it from
  (run ``gdfo report DIR`` for the others).

Nothing else changes, numbers included. Example::

    python benchmarks/portable_results.py benchmarks/results/campaign-*
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from gdfo_ray.campaign import portable
from gdfo_ray.config import DATA_DIR_ENV

DATA = "$" + DATA_DIR_ENV


def _cell_paths(config: dict) -> dict:
    """The machine's paths a cell's config recorded: its campaign folder and its data root."""
    paths = {}
    out = config.get("output_dir") or ""
    marker = os.sep + "runs" + os.sep
    if os.path.isabs(out) and marker in out:
        paths[out.rsplit(marker, 1)[0]] = "."
    root = (config.get("task") or {}).get("data_dir")
    if root and os.path.isabs(root):
        paths[root] = DATA
    return paths


def rewrite_cells(folder: str) -> tuple[int, dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    changed, seen = 0, {}
    for base, _, names in os.walk(os.path.join(folder, "cells")):
        for name in sorted(n for n in names if n.endswith(".parquet")):
            path = os.path.join(base, name)
            table = pq.read_table(path)
            config = json.loads(table.column("config_json")[0].as_py())
            paths = _cell_paths(config)
            seen.update(paths)
            if not paths:
                continue
            out = config["output_dir"]
            config = portable(config, paths)
            config["output_dir"] = os.path.join("runs", os.path.basename(out.rstrip(os.sep)))
            summary = portable(json.loads(table.column("summary_json")[0].as_py()), paths)
            if isinstance(summary.get("config"), dict):
                summary["config"]["output_dir"] = config["output_dir"]
            for column, value in (("config_json", config), ("summary_json", summary)):
                at = table.column_names.index(column)
                table = table.set_column(at, column, pa.array([json.dumps(value)]))
            pq.write_table(table, path + ".tmp")
            os.replace(path + ".tmp", path)
            changed += 1
    return changed, seen


def rewrite_campaign_file(folder: str, paths: dict) -> bool:
    import yaml

    path = os.path.join(folder, "campaign.yaml")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    for run in data.get("invocations", []):
        recorded = run.get("results_dir")
        here = {**paths, **({recorded: "."} if recorded and os.path.isabs(recorded) else {})}
        reuse = run.get("reuse")
        run.update(portable(run, here))
        run["results_dir"] = "."
        if reuse and os.path.isabs(reuse):
            run["reuse"] = os.path.relpath(reuse, recorded or folder)
    with open(path + ".tmp", "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    os.replace(path + ".tmp", path)
    return True


def rewrite_report_line(folder: str) -> bool:
    path = os.path.join(folder, "report.md")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        text = f.read()
    fixed = re.sub(r"^Results: `/[^`]*`$", "Results: `.` (this folder)", text, flags=re.M)
    with open(path, "w") as f:
        f.write(fixed)
    return fixed != text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="campaign folders")
    args = p.parse_args(argv)
    for folder in args.folders:
        cells, paths = rewrite_cells(folder) if os.path.isdir(os.path.join(folder, "cells")) else (0, {})
        yaml_done = rewrite_campaign_file(folder, paths)
        report = rewrite_report_line(folder)
        print(f"{folder}: {cells} cells rewritten{', campaign.yaml' if yaml_done else ''}"
              f"{', report.md line' if report else ''}; paths named: {sorted(set(paths.values()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
