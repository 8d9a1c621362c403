"""scripts/compare_runs.py: its table, and a command line that needs at least one run directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "scripts" / "compare_runs.py")


def write_summary(run: Path, method: str, val_ppl: float, tokens_per_s: float | None = 1234.7) -> str:
    run.mkdir()
    summary = {
        "method": method,
        "val_ppl": val_ppl,
        "trainable_params": 1_000,
        "total_params": 2_000,
        "training_state_bytes": 3 * 2**20,
        "peak_memory_bytes": 100 * 2**20,
        "peak_memory_kind": "cpu_peak_rss",
        "tokens_per_s": tokens_per_s,
        "tokens": 4096,
    }  # the keys scripts/pretrain.py writes that the table reads
    (run / "summary.json").write_text(json.dumps(summary))
    return str(run)


def compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)


def test_table_of_two_runs(tmp_path):
    result = compare(write_summary(tmp_path / "a", "sltrain", 93.5), write_summary(tmp_path / "b", "full", 127.0))
    assert result.returncode == 0, result.stderr
    header, sltrain, full, note = result.stdout.strip().splitlines()
    assert header.split()[:4] == ["run", "method", "val", "ppl"]
    assert sltrain.split()[:3] == ["a", "sltrain", "93.50"] and full.split()[:3] == ["b", "full", "127.00"]
    assert "3.0 MiB" in sltrain and "1,235" in sltrain and "cpu_peak_rss" in note

    saved = tmp_path / "new" / "record.json"  # its directory is made
    (tmp_path / "a" / "run_config.json").write_text(json.dumps({"lr": 0.003, "seed": 0}))
    result = compare(str(tmp_path / "a"), str(tmp_path / "b"), "--save", str(saved))
    record = json.loads(saved.read_text())
    assert record["table"] == result.stdout.rstrip("\n").splitlines()
    assert record["summaries"][str(tmp_path / "b")]["val_ppl"] == 127.0
    assert record["run_configs"] == {str(tmp_path / "a"): {"lr": 0.003, "seed": 0}}  # (b has none)


def test_a_run_without_timing(tmp_path):
    """A run resumed from a checkpoint that predates recorded training time has `tokens_per_s: null`."""
    result = compare(write_summary(tmp_path / "a", "sltrain", 93.5, tokens_per_s=None))
    assert result.returncode == 0, result.stderr
    assert "unknown" in result.stdout.splitlines()[1].split()


def test_command_line(tmp_path):
    result = compare()  # no run directory: an error, not an empty table
    assert result.returncode == 2 and not result.stdout
    assert "error: the following arguments are required: RUN_DIR" in result.stderr

    result = compare("--help")  # help, not a run directory named --help
    assert result.returncode == 0 and "side by side" in result.stdout and "RUN_DIR" in result.stdout

    result = compare(str(tmp_path / "missing"))
    assert result.returncode == 1 and "missing/summary.json does not exist (did the run finish?)" in result.stderr

    (tmp_path / "glue").mkdir()
    (tmp_path / "glue" / "summary.json").write_text(json.dumps({"method": "sltrain", "metrics": {}}))
    result = compare(str(tmp_path / "glue"))  # a run_glue.py run
    assert result.returncode == 1 and "is not from scripts/pretrain.py (no val_ppl)" in result.stderr

    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "summary.json").write_text('{"val_ppl": 3')
    result = compare(str(tmp_path / "cut"))  # damaged: one line, no traceback
    assert result.returncode == 1 and "cut/summary.json cannot be read (JSONDecodeError: " in result.stderr
    (tmp_path / "cut" / "summary.json").write_text('{"val_ppl": 3}')
    result = compare(str(tmp_path / "cut"))
    assert result.returncode == 1 and "summary.json lacks ['method', 'trainable_params', " in result.stderr
    assert "Traceback" not in result.stderr
    result = compare(write_summary(tmp_path / "a", "sltrain", 93.5), "--save", str(tmp_path))
    assert result.returncode == 1 and "`--save` " in result.stderr and "is a directory; give a file" in result.stderr


def test_runs_are_named_also_when_given_as_dot_or_under_one_name(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    first, second = (
        write_summary(tmp_path / "x" / "run", "sltrain", 1.0),
        write_summary(tmp_path / "y" / "run", "full", 2.0),
    )
    rows = compare(first, second).stdout.splitlines()[1:3]
    assert [row.split()[0] for row in rows] == [first, second]  # one name twice: the paths tell them apart
    result = subprocess.run([sys.executable, SCRIPT, "."], capture_output=True, text=True, cwd=first)
    assert result.stdout.splitlines()[1].split()[:2] == ["run", "sltrain"]  # ".": the directory's own name


def test_runs_validated_on_different_text_are_flagged(tmp_path):
    """Per-token perplexities compare only over the same tokens of the same text and vocabulary: runs that differ
    there get a note (from their run_config.json and summary.json), runs that do not get none; a different
    --eval-blocks that scored the same tokens (a validation text shorter than both) is no difference."""
    runs = [write_summary(tmp_path / name, "sltrain", 90.0) for name in ("a", "b", "c", "d")]
    config = {"seq_len": 128, "eval_blocks": 256, "data_sha256": {"validation": "v1", "vocabulary": "w1"}}
    changes = ({}, {"eval_blocks": 512}, {"data_sha256": {"validation": "v2", "vocabulary": "w1"}}, {})
    for run, change, tokens in zip(runs, changes, (1000, 1000, 1000, 500)):
        (Path(run) / "run_config.json").write_text(json.dumps({**config, **change}))
        summary = json.loads((Path(run) / "summary.json").read_text())
        (Path(run) / "summary.json").write_text(json.dumps({**summary, "val_tokens": tokens}))
    assert "note:" not in compare(runs[0], runs[1]).stdout
    note = compare(*runs).stdout.strip().splitlines()[-1]
    assert note == "note: the runs' val ppl are not on the same footing: their scored tokens, validation text differ"
    streamed = {"seq_len": 128, "dataset": "allenai/c4", "data_sha256": {"vocabulary": "w1"}}
    for run, dataset_config in zip(runs[:2], ("en", "realnewslike")):
        (Path(run) / "run_config.json").write_text(json.dumps({**streamed, "dataset_config": dataset_config}))
    assert compare(*runs[:2]).stdout.strip().endswith("their validation text differ")


def test_each_validation_setting_is_compared_alone_and_an_unrecorded_one_is_left_out(tmp_path):
    """Another seq_len, another vocabulary: each flagged by itself; a run that recorded no data digest (an older
    run) is left out of the comparisons it cannot take part in, not flagged as different."""
    runs = [write_summary(tmp_path / name, "sltrain", 90.0) for name in ("a", "b", "c", "old")]
    config = {"seq_len": 128, "data_sha256": {"validation": "v1", "vocabulary": "w1"}}
    configs = (config, {**config, "seq_len": 256}, {**config, "data_sha256": {"validation": "v1", "vocabulary": "w2"}})
    for run, run_config in zip(runs, (*configs, {"seq_len": 128})):
        (Path(run) / "run_config.json").write_text(json.dumps(run_config))
    assert compare(runs[0], runs[1]).stdout.strip().endswith("not on the same footing: their seq_len differ")
    assert compare(runs[0], runs[2]).stdout.strip().endswith("not on the same footing: their vocabulary differ")
    assert "note:" not in compare(runs[0], runs[3]).stdout
