"""Eval loss vs linear FLOPs of every run in one or more `bench_quality.py` reports (their `.json` twins), one panel
per report (two per row): dense runs (full and iso-FLOP) joined by a line, SDT runs as labelled points.

    cd benchmarks/results && python ../plot_quality.py quality_*.json --output quality_vs_flops.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def points(report: dict) -> tuple[list[tuple[float, float]], list[tuple[str, float, float]]]:
    """(dense points, SDT points) as (linear FLOPs in % of the full dense run, mean eval loss[, label])."""
    rows = report["rows"]
    dense_steps = rows[0]["runs"][0]["max_steps"]
    dense, sdt = [], []
    for row in rows:
        loss = statistics.mean(run["eval_loss"] for run in row["runs"])
        if row["dense"]:
            dense.append((100 * row["runs"][0]["max_steps"] / dense_steps, loss))
        else:
            saved = statistics.mean(run["sdt/linear_flops_saved"] for run in row["runs"])
            sdt.append((row["name"], 100 * (1 - saved), loss))
    return sorted(dense), sdt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", help="`.json` files written by bench_quality.py --output")
    parser.add_argument("--output", required=True, help="the PNG to write")
    args = parser.parse_args()
    columns = min(2, len(args.reports))
    rows = -(-len(args.reports) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(7 * columns, 5 * rows), squeeze=False)
    for axis in axes.flat[len(args.reports) :]:
        axis.set_visible(False)
    for axis, path in zip(axes.flat, args.reports, strict=False):
        with open(path, encoding="utf-8") as handle:
            report = json.load(handle)
        dense, sdt = points(report)
        axis.plot(
            [x for x, _ in dense], [y for _, y in dense], "o-", color="tab:gray", label="dense (full and iso-FLOP)"
        )
        axis.scatter([x for _, x, _ in sdt], [y for _, _, y in sdt], color="tab:blue", zorder=3, label="SDT")
        for name, x, y in sdt:
            axis.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        title = os.path.splitext(os.path.basename(path))[0] + "\n" + textwrap.fill(report["setting"], 100)
        axis.set_title(title, fontsize=7)
        axis.set_xlabel("linear-layer FLOPs over training, % of the dense run")
        axis.set_ylabel("eval loss (held-out text)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.output, dpi=120)
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
