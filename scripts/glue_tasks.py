"""The eight GLUE tasks the paper reports: their text columns, labels and metrics.

Metrics are GLUE's own: Matthews correlation (CoLA), Pearson and Spearman (STS-B), F1 and accuracy (MRPC, QQP),
accuracy (SST-2, MNLI, QNLI, RTE). `load_metric` uses `evaluate.load("glue", task)` when it can be loaded (it comes
from the Hub) and otherwise `glue_metric`, the same numbers from scikit-learn and scipy under the same keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef


@dataclass(frozen=True)
class Task:
    name: str
    text_columns: tuple[str, ...]  # the columns of the Hub's `nyu-mll/glue` config
    labels: tuple[str, ...]  # class names by id; empty for regression (STS-B scores in [0, 5])
    metrics: tuple[str, ...]  # the keys its metric returns
    validation_splits: tuple[str, ...] = ("validation",)

    @property
    def is_regression(self) -> bool:
        return not self.labels

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}

    @property
    def pair(self) -> bool:
        return len(self.text_columns) == 2


TASKS: dict[str, Task] = {
    task.name: task
    for task in [
        Task("cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",)),
        Task("sst2", ("sentence",), ("negative", "positive"), ("accuracy",)),
        Task("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1")),
        Task("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1")),
        Task("stsb", ("sentence1", "sentence2"), (), ("pearson", "spearmanr")),
        Task(
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            ("validation_matched", "validation_mismatched"),
        ),
        Task("qnli", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",)),
        Task("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",)),
    ]
}
STSB_RANGE = (0.0, 5.0)


def get_task(name: str | None) -> Task:
    if name is None:
        raise ValueError(f"`--task_name` is required; choose one of {sorted(TASKS)}.")
    if name not in TASKS:
        raise ValueError(f"Unknown `--task_name` {name!r}; choose one of {sorted(TASKS)}.")
    return TASKS[name]


def text_columns(task: Task, columns: Sequence[str], where: str) -> tuple[str, ...]:
    """The text columns to read: GLUE's own names, or the generic `sentence` / `sentence1`, `sentence2`."""
    generic = ("sentence1", "sentence2") if task.pair else ("sentence",)
    for candidate in (task.text_columns, generic):
        if all(column in columns for column in candidate):
            return candidate
    wanted = " and ".join(f"`{c}`" for c in generic)
    own = " and ".join(f"`{c}`" for c in task.text_columns)
    alternative = "" if own == wanted else f" (or GLUE's {own})"
    raise ValueError(f"{task.name} needs the text column(s) {wanted}{alternative} in {where}; found {list(columns)}.")


# ----------------------------------------------------------------------------------------------------------- metrics
def glue_metric(task: str, predictions: Sequence, references: Sequence) -> dict[str, float]:
    """GLUE's metric for `task` from scikit-learn and scipy: the keys and numbers of `evaluate.load("glue", task)`."""
    task = get_task(task)
    if task.is_regression:  # evaluate hands STS-B scores to scipy as float32: so do we, for the same numbers
        predictions, references = np.asarray(predictions, np.float32), np.asarray(references, np.float32)
        return {
            "pearson": float(pearsonr(predictions, references)[0]),
            "spearmanr": float(spearmanr(predictions, references)[0]),
        }
    predictions, references = np.asarray(predictions, dtype=np.int64), np.asarray(references, dtype=np.int64)
    if task.name == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
    accuracy = float((predictions == references).mean())
    if "f1" in task.metrics:
        return {"accuracy": accuracy, "f1": float(f1_score(references, predictions))}
    return {"accuracy": accuracy}


def load_metric(task: str) -> tuple[Callable[[Sequence, Sequence], dict[str, float]], str]:
    """(metric function of (predictions, references), where it comes from): evaluate's glue metric if it loads."""
    get_task(task)
    fallback = lambda p, r: glue_metric(task, p, r)  # noqa: E731
    try:
        import evaluate
    except ImportError:
        return fallback, "scikit-learn/scipy (evaluate is not installed)"
    try:
        metric = evaluate.load("glue", task)
    except Exception:  # offline or no Hub: FileNotFoundError, ConnectionError or the HTTP client's own errors
        return fallback, "scikit-learn/scipy (evaluate's glue metric could not be loaded from the Hub)"

    def compute(predictions: Sequence, references: Sequence) -> dict[str, float]:
        return {k: float(v) for k, v in metric.compute(predictions=predictions, references=references).items()}

    return compute, "evaluate"
