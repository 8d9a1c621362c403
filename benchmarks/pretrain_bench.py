"""SLTrain against full-rank, low-rank, LoRA, ReLoRA, GaLore and Fira: same model, data, token budget and seed.

    python benchmarks/pretrain_bench.py                 # CPU default: tiny LLaMA, shared corpora, ~40 min on 2 cores
    python benchmarks/pretrain_bench.py --sweep-lr      # first: each method's best learning rate, on runs of the
                                                        # table's schedule (three rates or more per method)
    python benchmarks/pretrain_bench.py --size 60m --device-note "1x H100"   # the 60M preset (its 512 x 256-token
                                        # steps: 2000 of them are 80 passes over the shared corpora; the README's 60M
                                        # table passes a one-pass budget after `--`)

Every method runs `scripts/pretrain.py` in its own process (so that peak memory is its own), at its own best
learning rate from the sweep file, and the results land in `benchmarks/results/pretrain_<size>.{json,png}` plus
`..._curves.png`: validation perplexity at equal tokens, trainable and total parameters, the exact bytes of
parameters + gradients + optimizer states, peak process memory (RSS on CPU, max allocated on GPU), tokens/s and wall
time, with the command, versions, machine and seeds. On the CPU default two runs go side by side with one thread each
(logs land next to each run directory): runs made together share the CPU, so tokens/s compare only between them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_env import (  # noqa: E402
    checkout_env,
    environment,
    git_commit,
    positive_int,
    recorded_command,
    write_results,
)

RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "benchmarks" / "runs"
SHARED_LM = ROOT.parent / "shared" / "data" / "lm"
METHODS = ["full", "lowrank", "lora", "relora", "galore", "fira", "sltrain"]
LR_GRID = [1e-3, 3e-3, 1e-2]
EMBEDDED = [str(ROOT / "data/austen/train.txt.gz")], [str(ROOT / "data/austen/validation.txt.gz")]  # without SHARED_LM

# Budgets: the CPU default runs all methods in about 40 minutes on 2 cores (one seed, two runs at a time). The
# learning-rate sweep runs the same schedule: a rate picked on shorter runs can hold a method back (200-step runs with
# 20 warmup steps picked 1e-3 for full-rank and 3e-3 for Fira; at 500 steps 3e-3 and 1e-2 gave them 33 and 13 points
# lower perplexity at seed 0: README).
SIZES = {
    "tiny": {"max_steps": 500, "warmup_steps": 50, "eval_every": 100},
    "60m": {"max_steps": 2000, "warmup_steps": 200, "eval_every": 250},
}


@functools.cache  # one note per invocation
def corpus_files() -> tuple[list[str], list[str]]:
    """The shared offline corpora (Austen, King James Bible, Brown), or the embedded Austen corpus without them."""
    train = sorted(str(p) for p in SHARED_LM.glob("*_train.txt.gz"))
    validation = sorted(str(p) for p in SHARED_LM.glob("*_validation.txt.gz"))
    if not train:
        print(f"note: {SHARED_LM} not found; using the embedded Austen corpus")
        return EMBEDDED
    return train, validation


def _scripts_importable() -> None:
    """`scripts/` on the import path, for pretrain.py's parser and methods.py's registry (imported when needed)."""
    if str(ROOT / "scripts") not in sys.path:
        sys.path.insert(0, str(ROOT / "scripts"))


class Diverged(RuntimeError):
    """A run stopped because its loss diverged: NaN, infinite, or past 709 nats in validation (pretrain.py's exit
    status `DIVERGED`)."""


def diverged_status() -> int:
    """The exit status with which `scripts/pretrain.py` stops a diverged run."""
    _scripts_importable()
    from pretrain import DIVERGED

    return DIVERGED


def method_version(method: str) -> int:
    """What a run of `method` computes (methods.py's `Method.version`); runs recorded none while it was 1."""
    _scripts_importable()
    from methods import METHODS

    return METHODS[method].version


# pretrain.py's settings that the benchmark gives each run itself, and where they come from
OWNED_FLAGS = {"model": "from --size", "method": "from --methods", "lr": "from the sweep file, or 3e-3",
               "seed": "from --seeds", "out_dir": "under benchmarks/runs",
               "resume": "finished runs are reused"}  # fmt: skip


def check_runs(methods: list[str], size: str, budget: dict, extra: list[str]) -> None:
    """Every method's run is checked as `scripts/pretrain.py` would check it (`resolve`), before the first starts: a
    flag after `--` that one method refuses (`--rank` for full-rank) fails now, not after the others have run."""
    _scripts_importable()
    from pretrain import parse_args, resolve

    lr, seed = 1.2345e-4, 3_456_789_012  # values no one passes: a flag after `--` that sets them shows, whatever value
    for method in methods:
        out, cmd = pretrain_command(method, size, lr, seed, budget["max_steps"], budget["warmup_steps"],
                                    budget["eval_every"], "check", extra)  # fmt: skip
        parsed = parse_args(cmd[2:])
        ours = {"model": size, "method": method, "lr": lr, "seed": seed, "out_dir": str(out), "resume": False}
        for key, value in ours.items():  # parsed as the run parses them: abbreviations and `--flag=value` too
            if getattr(parsed, key) != value:
                raise ValueError(
                    f"the flags for pretrain.py after `--` ({shlex.join(extra)}) set `--{key.replace('_', '-')}`, "
                    f"which the benchmark sets itself ({OWNED_FLAGS[key]}): the runs would train with yours and the "
                    "table record the benchmark's"
                )
        try:
            resolve(parsed)
        except ValueError as error:
            raise ValueError(f"--method {method} with the flags after `--` ({shlex.join(extra)}): {error}") from None


def schedule(steps: int, warmup: int, eval_every: int, extra: list[str]) -> dict:
    """The schedule `scripts/pretrain.py` runs with: the benchmark's, with what the flags after `--` override (read
    by pretrain.py's own parser, as the runs read them: a repeated flag's last value wins, abbreviations too)."""
    parsed = _parsed_flags(steps, warmup, eval_every, extra)
    return {"max_steps": parsed.max_steps, "warmup_steps": parsed.warmup_steps, "eval_every": parsed.eval_every}


def _parsed_flags(steps: int, warmup: int, eval_every: int, extra: list[str]):
    """pretrain.py's parse of the benchmark's schedule flags followed by the flags after `--`."""
    _scripts_importable()
    from pretrain import parse_args

    flags = ["--max-steps", str(steps), "--warmup-steps", str(warmup), "--eval-every", str(eval_every), *extra]
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            parsed = parse_args(["--out-dir", "unused", *flags])
    except SystemExit:  # argparse's usage and error: pretrain.py would refuse these flags
        reason = (errors.getvalue().strip().splitlines() or ["refused"])[-1].split("error: ", 1)[-1]
        raise ValueError(f"the flags for pretrain.py after `--` ({shlex.join(extra)}): {reason}") from None
    return parsed


def pretrain_command(method: str, size: str, lr: float, seed: int, steps: int, warmup: int, eval_every: int, tag: str,
                     extra: list[str]) -> tuple[Path, list[str]]:  # fmt: skip
    """The run directory and `scripts/pretrain.py` command line of one run. The method's schedule settings follow
    the steps the run gets (`extra` may override `--max-steps`), and come before `extra`, whose own `--method-arg`
    entries win (pretrain.py keeps a repeated key's last value)."""
    train, validation = corpus_files()
    out = RUNS / tag / f"{method}-lr{lr:g}-seed{seed}"
    effective = _parsed_flags(steps, warmup, eval_every, extra)
    effective_steps = effective.max_steps
    # the benchmark's trained tokenizer has 8192 entries; a hub tokenizer given after `--` brings its own
    vocab = ["--vocab-size", "8192"] if effective.tokenizer == "train" else []
    method_args = []
    if method == "relora":  # 3 restarts, as ReLoRA's short runs
        method_args = ["--method-arg", f"relora_every={max(1, effective_steps // 4)}"]
    if method in ("galore", "fira"):
        method_args = ["--method-arg", f"update_proj_gap={max(50, effective_steps // 10)}"]
    cmd = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--model", size, "--method", method,
           "--lr", str(lr), "--seed", str(seed), "--max-steps", str(steps), "--warmup-steps", str(warmup),
           "--eval-every", str(eval_every), "--out-dir", str(out), "--overwrite", *vocab,
           "--train-files", *train, "--validation-files", *validation, *method_args, *extra]  # fmt: skip
    return out, cmd


def run_method(method: str, size: str, lr: float, seed: int, steps: int, warmup: int, eval_every: int, tag: str,
               extra: list[str], threads: int | None = None) -> dict:  # fmt: skip
    """One `scripts/pretrain.py` run in its own process. A finished run with the same command is reused, so an
    interrupted benchmark only runs what is missing."""
    out, cmd = pretrain_command(method, size, lr, seed, steps, warmup, eval_every, tag, extra)
    env = checkout_env()  # pretrain.py imports this checkout's library, whose commit the run records
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    record = out / "bench.json"
    saved = json.loads(record.read_text()) if record.is_file() else {}
    version = method_version(method)
    if saved.get("cmd") == cmd[1:] and saved.get("threads") == threads and saved.get("method_version", 1) == version:
        return {**saved, "reused": True}  # measured by an earlier invocation (see its finished_at and commit)
    t0, commit = time.perf_counter(), git_commit()  # (the code that runs, not what the checkout holds by the end)
    try:
        if threads:  # parallel runs: keep their progress bars out of each other's way
            out.mkdir(parents=True, exist_ok=True)
            with open(out.with_name(out.name + ".log"), "w") as log:
                subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
        else:
            subprocess.run(cmd, check=True, env=env)
    except subprocess.CalledProcessError as error:
        if error.returncode == diverged_status():
            raise Diverged(f"{method} at lr={lr:g}, seed {seed} diverged (its loss became NaN or infinite)") from None
        raise
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    summary.update(lr=lr, seed=seed, wall_seconds=time.perf_counter() - t0, threads=threads,
                   curve=[(r["tokens"], r["val_ppl"]) for r in rows if "val_ppl" in r],
                   train_curve=[(r["tokens"], r["loss"]) for r in rows if "loss" in r])  # fmt: skip
    summary["cmd"] = cmd[1:]  # the exact pretrain.py command line of this run
    # when and from what code: runs side by side share the CPU, so tokens/s compare only between runs made together
    summary.update(finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), commit=commit, reused=False)
    record.write_text(json.dumps(summary))
    print(f"done {method} seed={seed}: val_ppl={summary['val_ppl']:.2f} tokens/s={summary['tokens_per_s']:,.0f}")
    return summary


def sweep(args) -> None:
    """Each method's best learning rate on a run of the table's schedule (seed 0, evaluated at its end): the grid,
    extended by 3x beyond an edge that wins.
    A run in the sweep file is reused only if it records the command this invocation would run (same steps, corpus
    and flags after `--`); the others run again, so an interrupted or extended sweep only runs what is missing. The
    file's command and machine are those of the last invocation that measured something; each run made since runs
    began to record their own (`cmd`, `commit`, `finished_at`) has its own."""
    budget = SIZES[args.size]
    steps, warmup = budget["max_steps"], budget["warmup_steps"]
    eval_every = steps  # (pretrain.py evaluates the last step whatever the cadence)
    path = args.results_dir / f"lr_sweep_{args.size}.json"
    old = read_json(args.parser, path) if path.is_file() else {}
    runs = {(r["method"], r["lr"]): r for r in old.get("runs", [])}
    measured = False  # whether this invocation ran anything: only then are its command and machine recorded
    device = "cpu"  # where this invocation's runs trained (each run's summary says), for the recorded environment

    def val_ppl(method: str, lr: float) -> float:
        nonlocal measured, device
        tag = f"sweep-{args.size}"
        _, cmd = pretrain_command(method, args.size, lr, 0, steps, warmup, eval_every, tag, args.extra)
        entry = runs.get((method, lr))
        version = method_version(method)
        if entry is None or entry.get("cmd") != cmd[1:] or entry.get("method_version", 1) != version:
            if entry is not None:
                print(f"sweep {method} lr={lr:g}: recorded with another command or method version; running it again")
            try:
                s = run_method(method, args.size, lr, 0, steps, warmup, eval_every, tag, args.extra)
            except Diverged:  # recorded as such (val_ppl null): a rate too high for the method, never its best
                s = {"val_ppl": None, "diverged": True, "cmd": cmd[1:], "reused": False, "device": device,
                     "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": git_commit()}  # fmt: skip
            runs[(method, lr)] = {"method": method, "lr": lr, "val_ppl": s["val_ppl"], "cmd": s["cmd"],
                                  "finished_at": s["finished_at"], "commit": s["commit"],
                                  "method_version": version,
                                  **({"diverged": True} if s.get("diverged") else {})}  # fmt: skip
            measured |= not s["reused"]
            device = s["device"] if not s["reused"] else device
            result = "diverged" if s.get("diverged") else f"val_ppl={s['val_ppl']:.2f}"
            print(f"sweep {method} lr={lr:g}: {result}")
            save()
        ppl = runs[(method, lr)]["val_ppl"]
        return math.inf if ppl is None else ppl

    def save() -> None:
        best = {}
        for method in sorted({m for m, _ in runs}):
            trained = [r for (m, _), r in runs.items() if m == method and r["val_ppl"] is not None]
            if trained:  # a method that diverged at every rate tried has none
                best[method] = min(trained, key=lambda r: r["val_ppl"])["lr"]
        if measured or not old:
            provenance = {"command": args.command, "environment": environment(device)}
        else:  # runs measured earlier, with this command, came from their run directories: the file's stay
            provenance = {key: old[key] for key in ("command", "environment") if key in old}
        write_results(path, {  # (whole or not at all: an interrupted write would lose the sweep so far)
            "command": provenance.get("command"), "grid": LR_GRID, "steps": effective["max_steps"],
            "warmup_steps": effective["warmup_steps"], "extra_flags": args.extra,
            "runs": sorted(runs.values(), key=lambda r: (r["method"], r["lr"])), "best_lr": best,
            "environment": provenance.get("environment"),
        })  # fmt: skip

    effective = schedule(steps, warmup, eval_every, args.extra)
    before = dict(runs)
    for method in args.methods:
        grid = list(LR_GRID)
        for lr in grid:
            val_ppl(method, lr)
        while True:  # extend past a winning edge of the grid
            tried = sorted(lr for m, lr in runs if m == method)
            beyond = next_rate(tried, min(tried, key=lambda lr: val_ppl(method, lr)))
            if beyond is None:
                break
            val_ppl(method, beyond)
    if runs == before:
        print(f"nothing to run: every run is in {path} with this command; left it as it was")
        return
    print(f"wrote {path}: {json.loads(path.read_text())['best_lr']}")


def next_rate(tried: list[float], best: float) -> float | None:
    """The rate a sweep tries next, 3x beyond a winning edge of the sorted rates `tried` (down to 1e-5, up to 0.1),
    or None: its sweep is complete."""
    if best == tried[0] and best / 3 >= 1e-5:
        return round(best / 3, 8)
    if best == tried[-1] and best * 3 <= 0.1:
        return round(best * 3, 8)
    return None


def swept_rates(swept: dict, name: str, methods: list[str], size: str, extra: list[str]) -> dict[str, float]:
    """Each of `methods`' best learning rate in the sweep file `swept` (called `name`) for a table run with the flags
    `extra`, found as `sweep` finds it, among its runs alone; `ValueError` unless every run of the method there
    trained as `--sweep-lr` with those flags would now (`_trajectory`: the table's schedule and training flags; the
    same method version) and its sweep is complete. The file's `best_lr` is not trusted: a later `--sweep-lr` of one
    method with other flags rewrites it for all."""
    budget = SIZES[size]
    steps, warmup = budget["max_steps"], budget["warmup_steps"]
    runs = {(r["method"], r["lr"]): r for r in swept.get("runs", [])}
    rates = {}
    for method in methods:
        version = method_version(method)
        tried = sorted(lr for m, lr in runs if m == method)
        stale = [
            lr for lr in tried
            if _trajectory(runs[(method, lr)].get("cmd"))
            != _trajectory(pretrain_command(method, size, lr, 0, steps, warmup, steps, f"sweep-{size}", extra)[1][1:])
            or runs[(method, lr)].get("method_version", 1) != version
        ]  # fmt: skip
        ppl = {
            lr: math.inf if runs[(method, lr)]["val_ppl"] is None else runs[(method, lr)]["val_ppl"] for lr in tried
        }
        best = min(tried, key=ppl.get) if tried else None
        incomplete = not set(LR_GRID) <= set(tried) or next_rate(tried, best) is not None
        again = f"run --sweep-lr --methods {method} first, with this table's flags after `--`"
        if stale:
            raise ValueError(
                f"{name}: {method}'s runs at {', '.join(f'{lr:g}' for lr in stale)} trained otherwise than this "
                "table's sweep would (another schedule, other flags after `--`, or another version of the method), "
                f"and a rate picked on another schedule can hold a method back: {again}."
            )
        if incomplete:
            raise ValueError(f"{name} holds no complete sweep of {method}: {again}.")
        if math.isinf(ppl[best]):
            raise ValueError(f"{name}: {method} diverged at every rate its sweep tried; it has no rate to train at.")
        rates[method] = best
    return rates


def _trajectory(cmd: list[str] | None) -> dict | None:
    """What the pretrain.py command line `cmd` (script, then flags) trains, as pretrain.py's `--resume` compares it
    (`trajectory_config`: not the evaluation or checkpoint cadence; the micro-batch aside too, which only splits each
    global batch); None for none, or one that pretrain.py refuses."""
    if not cmd:
        return None
    _scripts_importable()
    from pretrain import parse_args, resolve, trajectory_config

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = resolve(parse_args(cmd[1:]))
    except (SystemExit, ValueError):
        return None
    return {key: value for key, value in trajectory_config(args, 1).items() if key != "micro_batch"}


def aggregate(runs: list[dict]) -> dict:
    """Mean (and standard deviation over seeds, where repeated) of the measured quantities of one method."""
    keys = ["val_ppl", "tokens_per_s", "peak_memory_bytes", "wall_seconds"]
    row = {k: runs[0][k] for k in ("method", "lr", "trainable_params", "total_params", "training_state_bytes",
                                     "param_bytes", "grad_bytes", "optimizer_state_bytes", "tokens")}  # fmt: skip
    for key in keys:
        values = [r[key] for r in runs]
        row[key] = statistics.mean(values)
        row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
    row["seeds"] = [r["seed"] for r in runs]
    return row


def plot(rows: list[dict], runs: list[dict], stem: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    biggest = max(r["total_params"] for r in rows)
    for i, r in enumerate(rows):
        mem = r["training_state_bytes"] / 2**20
        ax.scatter(mem, r["val_ppl"], s=2000 * r["total_params"] / biggest, alpha=0.45, color=f"C{i}")
        if r.get("val_ppl_std"):  # several seeds: their spread, which may be wider than the gaps between methods
            ax.errorbar(mem, r["val_ppl"], yerr=r["val_ppl_std"], fmt="none", ecolor=f"C{i}", capsize=5)
        ax.annotate(r["method"], (mem, r["val_ppl"]), ha="center", va="center", fontsize=9)
    ax.set_xlabel("parameters + gradients + optimizer states (MiB)")
    seeds = len(runs) > len(rows)
    ax.set_ylabel("validation perplexity (mean ± std over seeds)" if seeds else "validation perplexity")
    ax.set_title(f"{title}\n(circle area = total parameters)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, method in enumerate(r["method"] for r in rows):
        own = [r for r in runs if r["method"] == method]  # every seed: one seed alone can mislead (README)
        for k, run in enumerate(own):
            label = None if k else (method if len(own) == 1 else f"{method} ({len(own)} seeds)")
            tokens, loss = zip(*run["train_curve"])
            window = 20
            smooth = [statistics.mean(loss[max(0, j - window + 1) : j + 1]) for j in range(len(loss))]
            ax1.plot(tokens, smooth, color=f"C{i}", label=label, alpha=0.8, linewidth=1.2)
            ax2.plot(*zip(*run["curve"]), "o-", color=f"C{i}", label=label, alpha=0.8, markersize=4)
    ax1.set_ylabel("training loss (running mean of 20 steps)")
    ax2.set_ylabel("validation perplexity")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(stem.with_name(stem.name + "_curves.png"), dpi=120)
    plt.close(fig)


def plot_title(size: str, rows: list[dict], device_note: str, env: dict) -> str:
    return f"LLaMA-{size}, {rows[0]['tokens'] / 1e6:.1f}M tokens, {device_note or env['cpu']}"


def table(rows: list[dict]) -> str:
    lines = ["| method | lr | val ppl | trainable | total | params+grads+opt | peak mem | tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        std = f" ± {r['val_ppl_std']:.2f}" if r["val_ppl_std"] is not None else ""
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['val_ppl']:.2f}{std} | {r['trainable_params'] / 1e6:.2f}M | "
            f"{r['total_params'] / 1e6:.2f}M | {r['training_state_bytes'] / 2**20:.1f} MiB | "
            f"{r['peak_memory_bytes'] / 2**20:.0f} MiB | {r['tokens_per_s']:,.0f} |"
        )
    return "\n".join(lines)


def read_json(parser: argparse.ArgumentParser, path: Path) -> dict:
    """A results or sweep file, or a usage error naming it (not a JSONDecodeError from deep inside)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        parser.error(f"{relative(path)} cannot be read ({error}); delete it (or restore it with git) and run again")


def relative(path: Path) -> str:
    """`path` relative to the repository where it lies inside it (as results files name their sources)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument(
        "--sweep-lr", action="store_true", help="measure each method's best lr first, on runs of the table's schedule"
    )
    p.add_argument(
        "--jobs",
        type=positive_int,
        default=None,
        help="runs side by side, each with cores/jobs threads (default: 2 for the CPU size 'tiny', else 1)",
    )
    p.add_argument(
        "--device-note", default="", help="how to name the machine in the plot, e.g. '1x H100' (default: its CPU)"
    )
    p.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS,
        help="where the sweep file is read and written and the results land (default: benchmarks/results; a trial "
        "run with a smaller budget belongs elsewhere, so that it does not replace the committed results; the runs "
        "themselves stay in benchmarks/runs, where a later run with other settings replaces them)",
    )
    p.add_argument(
        "--replot",
        action="store_true",
        help="draw the plots again from the results file (pretrain_<size>.json in --results-dir; with the "
        "--device-note it records, unless one is given), running nothing",
    )
    p.add_argument("extra", nargs="*", help="further flags for pretrain.py, after --")
    args = p.parse_args(argv)
    args.command = recorded_command(__file__, argv)
    for flag, values in (("--seeds", args.seeds), ("--methods", args.methods)):
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice:  # (the same run twice, side by side in one directory, and a spread of 0 reported over "seeds")
            p.error(f"{flag}: {', '.join(twice)} given more than once")
    stem = args.results_dir / f"pretrain_{args.size}"
    if args.replot:
        if not stem.with_suffix(".json").is_file():
            p.error(f"--replot: no results file {stem.with_suffix('.json')}")
        result = read_json(p, stem.with_suffix(".json"))
        note = args.device_note or result.get("device_note", "")  # (files made before it was recorded: pass it)
        plot(result["methods"], result["runs"], stem, plot_title(args.size, result["methods"], note,
                                                                 result["environment"]))  # fmt: skip
        print(f"wrote {stem.with_suffix('.png')}, {stem.name}_curves.png")
        return
    if corpus_files() == EMBEDDED and args.results_dir.resolve() == RESULTS.resolve():
        p.error(  # the committed results were measured on the three shared corpora
            f"the shared corpora are not in {SHARED_LM}, and results on the embedded Austen corpus would replace the "
            "committed ones: pass --results-dir DIR to write them elsewhere (with --sweep-lr first, so that each "
            "method trains at its own best learning rate there rather than at 3e-3)"
        )
    budget = SIZES[args.size]
    try:  # bad flags after `--` fail here, not in the first run (nor after some runs)
        effective = schedule(budget["max_steps"], budget["warmup_steps"], budget["eval_every"], args.extra)
        check_runs(args.methods, args.size, budget, args.extra)
    except ValueError as error:
        p.error(str(error))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    if args.sweep_lr:
        args.parser = p
        sweep(args)
        return

    sweep_file = args.results_dir / f"lr_sweep_{args.size}.json"
    best_lr = {}
    if sweep_file.is_file():
        try:
            best_lr = swept_rates(read_json(p, sweep_file), relative(sweep_file), args.methods, args.size,
                                  args.extra)  # fmt: skip
        except ValueError as error:
            p.error(str(error))
    args.jobs = args.jobs or (2 if args.size == "tiny" else 1)
    jobs = [(m, seed) for m in args.methods for seed in args.seeds]
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None

    def one(job):
        method, seed = job
        lr = best_lr.get(method, 3e-3)
        steps, warmup, every = budget["max_steps"], budget["warmup_steps"], budget["eval_every"]
        return run_method(method, args.size, lr, seed, steps, warmup, every, f"bench-{args.size}", args.extra, threads)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        try:
            runs = list(pool.map(one, jobs))
        except Diverged as error:  # no table with a hole in it: say which run, and where its rate came from
            source = f"from {relative(sweep_file)}" if best_lr else "the default: no sweep file"
            raise SystemExit(f"pretrain_bench.py: {error}; its rate is {source}") from None
    rows = [aggregate([r for r in runs if r["method"] == m]) for m in args.methods]
    device = runs[0]["device"]
    env = environment(device)
    result = {
        "command": args.command,
        "environment": env,
        "device_note": args.device_note,  # the plots' name for the machine (`--replot` reuses it)
        "seeds": args.seeds,
        "jobs": args.jobs,
        "threads_per_run": threads,
        "lr_source": relative(sweep_file) if best_lr else "default 3e-3 (no sweep file)",
        "budget": effective,  # what the runs got: the size's budget, with what the flags after `--` override
        "extra_flags": args.extra,
        "methods": rows,
        "runs": runs,
        "table": table(rows),
    }
    write_results(stem.with_suffix(".json"), result)
    plot(rows, runs, stem, plot_title(args.size, rows, args.device_note, env))
    print(table(rows))
    print(f"wrote {stem.with_suffix('.json')}, {stem.with_suffix('.png')}, {stem.name}_curves.png")


if __name__ == "__main__":
    main()
