"""What numba's on-disk cache of the CPU kernels saves a process: the seconds to get the kernels ready (compiled, or
loaded from the cache) and the RSS that numba and its compiler add, each in a fresh process, against a process that
never runs them.

    python benchmarks/numba_cache.py          # -> benchmarks/results/numba_cache_cpu.json

Per round and kernel set (`warm_up` for fp32 only; for fp32, fp64 and bf16): one process with an empty cache
directory (it compiles and fills it), then one with that directory (it loads). `cpu_kernels.warm_up` runs the kernels
on a 2 x 2 problem; RSS is read from /proc before and after it, after importing torch and peft_sltrain. The kernels
compile (or load) every dtype when they are first imported, so the two sets now measure the same work (kept: they
show it); `cache_hits` counts the forward and backward kernels' signatures loaded (3 each).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

PROBE = """
import json, sys, time, torch
from peft_sltrain import cpu_kernels

def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

dtypes = [getattr(torch, name) for name in sys.argv[1:]]
before, start = rss_mib(), time.perf_counter()
ready = cpu_kernels.warm_up(dtypes)
seconds = time.perf_counter() - start
kernels = cpu_kernels._kernels() if ready else None
hits = sum(k.stats.cache_hits.total() for k in (kernels.forward, kernels.backward)) if kernels else 0
print(json.dumps({"seconds": seconds, "rss_added_mib": rss_mib() - before, "rss_mib": rss_mib(), "cache_hits": hits}))
"""

KERNEL_SETS = {"fp32": ["float32"], "fp32+fp64+bf16": ["float32", "float64", "bfloat16"], "no kernels": []}


def probe(dtypes: list[str], cache_dir: str) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", PROBE, *dtypes], capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    from bench_env import (
        add_replace_flag,
        check_replaceable,
        environment,
        positive_int,
        recorded_command,
        write_results,
    )

    from peft_sltrain import cpu_kernels

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=positive_int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "numba_cache_cpu.json")
    add_replace_flag(p)
    args = p.parse_args(argv)
    command = recorded_command(__file__, argv)
    check_replaceable(p, args.out, command, args.replace)
    if not cpu_kernels.AVAILABLE:  # (each probe would time an import that compiles nothing)
        p.error("numba is not installed: there are no kernels to compile or load (pip install 'peft-sltrain[cpu]')")

    env = environment()  # (now: the commit of the code measured)
    runs = {name: {"compiled": [], "loaded": [], "baseline": []} for name in KERNEL_SETS}
    with tqdm(total=args.rounds * 5, desc="processes") as bar:
        for _ in range(args.rounds):
            for name, dtypes in KERNEL_SETS.items():
                with tempfile.TemporaryDirectory() as cache_dir:
                    for kind in ("compiled", "loaded") if dtypes else ("baseline",):
                        runs[name][kind].append(probe(dtypes, cache_dir))
                        bar.update()
    summary = {}
    for name, kinds in runs.items():
        for kind, rows in kinds.items():
            if rows:
                summary[f"{name} {kind}"] = {
                    key: statistics.median(row[key] for row in rows) for key in ("seconds", "rss_added_mib", "rss_mib")
                }
                summary[f"{name} {kind}"]["cache_hits"] = [row["cache_hits"] for row in rows]
    runs = {name: {kind: rows for kind, rows in kinds.items() if rows} for name, kinds in runs.items()}
    result = {"command": command, "environment": env, "rounds": args.rounds, "median": summary, "runs": runs}
    write_results(args.out, result, indent=1)
    for name, row in summary.items():
        print(f"{name:>24}: {row['seconds']:6.2f} s, +{row['rss_added_mib']:4.0f} MiB RSS ({row['rss_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
