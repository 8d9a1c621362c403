r"""Plot whole training steps from step_bench results: SLTrain's tokens/s against full-rank's, by tokens per step.

    cd benchmarks/results && python ../plot_steps.py step_cuda.json step_cuda_launch_bound.json \
        step_cuda_350m_batch128.json step_cuda_60m_batch256.json step_cuda_60m_batch512.json \
        step_cuda_60m_batch128_rerun.json step_cuda_compiled_*60m.json --out step_cuda.png

(the H200 runs of one machine; the H100's and the fifth run's files are left out: other machines, and the H100's
holds several runs in another layout)

Left: each variant's tokens/s as a fraction of full-rank's in the same file and round (one dot per round, a line
through the medians of the eager runs of each size). Right: the time each variant adds to full-rank's step, in ms.
A ratio compares only within a file (both ran in the same interleaved rounds); dots from different files may come
from different machines. Compiled runs are drawn as crosses and left off the lines.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def points(paths: list[Path]) -> list[dict]:
    """One point per (file, size, variant other than full): tokens per step, whether compiled, and per round the
    variant's tokens/s over full-rank's and its extra seconds per step."""
    out = []
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
            out += _file_points(path, result)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):  # a PNG, a layer file
            raise ValueError(f"{path}: not a step_bench results file (rows with size, variant and rounds)") from None
    return out


def _file_points(path: Path, result: dict) -> list[dict]:
    out = []
    full = {row["size"]: row for row in result["rows"] if row["variant"] == "full"}
    for row in result["rows"]:
        if row["variant"] == "full":
            continue
        if row["size"] not in full:
            raise ValueError(f"{path}: no full-rank row for size {row['size']!r} to compare {row['variant']!r} to")
        base = full[row["size"]]
        out.append({
            "file": Path(path).name,
            "size": row["size"],
            "variant": row["variant"],
            "tokens": row["tokens"],
            "compile_mode": result.get("compile_mode"),
            "tokens_per_s_vs_full": [1 / t for t in row["time_vs_full_rounds"]],
            "extra_s": [s - b for s, b in zip(row["step_s_rounds"], base["step_s_rounds"])],
        })  # fmt: skip
    return out


def plot(pts: list[dict], path: Path, target: float | None = 0.95) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    series = sorted({(p["size"], p["variant"]) for p in pts})
    for i, (size, variant) in enumerate(series):
        color = f"C{i}"
        mine = [p for p in pts if (p["size"], p["variant"]) == (size, variant)]
        for p in mine:
            xs, marker = [p["tokens"]] * len(p["extra_s"]), "x" if p["compile_mode"] else "o"
            left.scatter(xs, p["tokens_per_s_vs_full"], c=color, marker=marker, s=20)
            right.scatter(xs, [1e3 * s for s in p["extra_s"]], c=color, marker=marker, s=20)
        by_tokens: dict[int, list[dict]] = {}
        for p in mine:
            if not p["compile_mode"]:
                by_tokens.setdefault(p["tokens"], []).append(p)
        xs = sorted(by_tokens)
        for ax, key, scale in ((left, "tokens_per_s_vs_full", 1), (right, "extra_s", 1e3)):
            ys = [statistics.median(v for p in by_tokens[x] for v in p[key]) * scale for x in xs]
            ax.plot(xs, ys, color=color, label=f"{size}, {variant}")
    if target is not None:
        left.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target}x")
    left.set(xscale="log", xlabel="tokens per step", ylabel="tokens/s, SLTrain / full-rank")
    right.set(xscale="log", xlabel="tokens per step", ylabel="extra time per step over full-rank (ms)")
    right.axhline(0, color="grey", linewidth=0.5)
    ticks = sorted({p["tokens"] for p in pts})
    for ax in (left, right):
        ax.set_xticks(ticks, [f"{t / 1024:g}k" for t in ticks])
        ax.minorticks_off()
    left.legend(fontsize=8)
    fig.suptitle("Whole training steps (dots: interleaved rounds; x: compiled; lines: medians of eager runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path, help="step_bench results files (JSON)")
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--target", type=float, default=0.95, help="a dashed line at this tokens/s ratio (0: none)")
    args = p.parse_args(argv)
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        raise SystemExit(f"no such results file: {', '.join(missing)}")
    try:
        pts = points(args.files)
    except ValueError as error:
        raise SystemExit(f"plot_steps.py: error: {error}") from None
    if not pts:
        raise SystemExit("the files hold no variant besides full-rank: nothing to plot")
    plot(pts, args.out, args.target or None)
    return pts


if __name__ == "__main__":
    main()
