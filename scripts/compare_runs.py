"""Print finished pretraining runs side by side (reads each run's summary.json).

python scripts/compare_runs.py runs/tiny-sltrain runs/tiny-full
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="compare_runs.py",
        description="Print finished pretraining runs (scripts/pretrain.py) side by side: validation perplexity, "
        "parameter counts, training-state bytes, peak memory and throughput, from each run's summary.json.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="an --out-dir of scripts/pretrain.py")
    parser.add_argument("--save", metavar="FILE", help="also write the runs' summaries and the table to FILE (JSON)")
    return parser.parse_args(argv)


# what the table reads from each summary.json
SUMMARY_KEYS = ("method", "val_ppl", "trainable_params", "total_params", "training_state_bytes", "peak_memory_bytes",
                "peak_memory_kind", "tokens_per_s", "tokens")  # fmt: skip


def main(run_dirs: list[str]) -> str:
    """The table of the runs in `run_dirs`, one row each, in the order given."""
    rows = []
    for run in run_dirs:
        path = Path(run) / "summary.json"
        if not path.is_file():
            raise SystemExit(f"compare_runs.py: error: {path} does not exist (did the run finish?)")
        try:
            row = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            reason = f"{type(error).__name__}: {error}"
            raise SystemExit(f"compare_runs.py: error: {path} cannot be read ({reason})") from None
        if not isinstance(row, dict) or "val_ppl" not in row:
            raise SystemExit(f"compare_runs.py: error: {path} is not from scripts/pretrain.py (no val_ppl)")
        missing = [key for key in SUMMARY_KEYS if key not in row]
        if missing:
            raise SystemExit(f"compare_runs.py: error: {path} lacks {missing}: damaged, or not from pretrain.py")
        rows.append(row)
    names = [Path(run).resolve().name for run in run_dirs]  # "." has a name too
    if len(set(names)) < len(names):  # runs of one name in different places: their paths as given
        names = [os.path.normpath(run) for run in run_dirs]
    header = ("run", "method", "val ppl", "trainable", "total", "params+grads+opt", "peak mem", "tokens/s", "tokens")
    table = [header] + [
        (
            name,  # several runs may share a method
            r["method"],
            f"{r['val_ppl']:.2f}",
            f"{r['trainable_params']:,}",
            f"{r['total_params']:,}",
            f"{r['training_state_bytes'] / 2**20:.1f} MiB",
            f"{r['peak_memory_bytes'] / 2**20:.0f} MiB",
            "unknown" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}",  # resumed from an old checkpoint
            f"{r['tokens']:,}",
        )
        for name, r in zip(names, rows)
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in table]
    kinds = sorted({r["peak_memory_kind"] for r in rows})
    lines.append(
        f"(peak mem: {', '.join(kinds)}; params+grads+opt: exact bytes of parameters, gradients and optimizer states)"
    )
    differ = validation_differences(run_dirs, rows)
    if differ:
        lines.append(f"note: the runs' val ppl are not on the same footing: their {', '.join(differ)} differ")
    return "\n".join(lines)


# what a perplexity is measured on, read from (run_config.json, summary.json): per-token perplexities compare only
# over the same tokens of the same text, cut into the same sequences by the same vocabulary
VALIDATION_SETTINGS = {
    "seq_len": lambda config, summary: config.get("seq_len"),
    "scored tokens": lambda config, summary: summary.get("val_tokens"),
    "validation text": lambda config, summary: (
        (config.get("data_sha256") or {}).get("validation")
        or (config.get("dataset") and [config["dataset"], config.get("dataset_config")])
    ),
    "vocabulary": lambda config, summary: (config.get("data_sha256") or {}).get("vocabulary"),
}


def validation_differences(run_dirs: list[str], summaries: list[dict]) -> list[str]:
    """Which of `VALIDATION_SETTINGS` differ between the runs (runs without a run_config.json, or a setting an older
    run did not record, are left out of that comparison)."""
    runs = []
    for run, summary in zip(run_dirs, summaries):
        try:
            runs.append((json.loads((Path(run) / "run_config.json").read_text()), summary))
        except (OSError, ValueError):
            continue
    differ = []
    for name, read in VALIDATION_SETTINGS.items():
        values = {json.dumps(read(*run)) for run in runs if read(*run) is not None}
        if len(values) > 1:
            differ.append(name)
    return differ


if __name__ == "__main__":
    args = parse_args()
    if args.save and Path(args.save).is_dir():  # checked before the table, which may take a while to read
        raise SystemExit(f"compare_runs.py: error: `--save` {args.save} is a directory; give a file name (.json).")
    text = main(args.run_dirs)
    print(text)
    if args.save:  # a record to commit: what the table was made from
        summaries = {run: json.loads((Path(run) / "summary.json").read_text()) for run in args.run_dirs}
        command = shlex.join(["python", "scripts/compare_runs.py", *args.run_dirs])
        configs = {run: json.loads(config.read_text()) for run in args.run_dirs
                   if (config := Path(run) / "run_config.json").is_file()}  # fmt: skip
        # (each run's settings: lr, steps, seed, data digests)
        record = {"command": command, "table": text.splitlines(), "summaries": summaries, "run_configs": configs}
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(json.dumps(record, indent=2) + "\n")
