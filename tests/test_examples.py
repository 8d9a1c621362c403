"""The script a newcomer runs first keeps working: examples/quickstart.py end to end (about 20 s on 2 cores)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_runs_and_shows_what_it_promises():
    run = subprocess.run(
        [sys.executable, "examples/quickstart.py"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    planned = re.search(r"planned: ParameterCounts\(trainable=(\d+), total=(\d+)\)", out)
    built = re.search(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+)", out)
    assert (
        planned and built and [int(n) for n in planned.groups()] == [int(n.replace(",", "")) for n in built.groups()]
    )
    assert "reload bit-identical: True" in out and "merged q_proj is a plain nn.Linear: True" in out
    assert "RobertaForSequenceClassification predicts as the adapter: True" in out
    assert "Failed to load CPU" not in run.stderr and "`is_gradient_checkpointing` is deprecated" not in run.stderr
    lm, classifier = (float(x) for x in re.findall(r"loss of the 20th step ([\d.]+)", out))
    assert lm < math.log(256) / 4 and classifier < math.log(2)  # both trained: well below a uniform guess
