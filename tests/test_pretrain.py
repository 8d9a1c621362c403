"""The pretraining script end to end on a micro LLaMA and a slice of the embedded corpus."""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import peft_sltrain  # noqa: E402

import checkpointing  # noqa: E402
import model_card  # noqa: E402
import pretrain  # noqa: E402
import pretrain_data as data  # noqa: E402
import sample  # noqa: E402
from conftest import FailingHfApi, FakeHfApi, needs_cxx, perturb_trainable  # noqa: E402
from methods import METHODS, Hyper  # noqa: E402

MICRO = str(ROOT / "tests" / "data" / "llama_micro.json")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, str]:
    """About 60 kB of training text and 10 kB of held-out text from the embedded corpus."""
    root = tmp_path_factory.mktemp("corpus")
    train, validation = data.local_corpus(None, None)
    (root / "train.txt").write_text(train[:60_000])
    (root / "validation.txt").write_text(validation[:10_000])
    return str(root / "train.txt"), str(root / "validation.txt")


def run(out: Path, corpus, *extra: str) -> dict:
    args = [
        "--model",
        MICRO,
        "--out-dir",
        str(out),
        "--train-files",
        corpus[0],
        "--validation-files",
        corpus[1],
        "--eval-every",  # (the tokenizer's size: the micro preset's vocab_size, 300)
        "3",
        "--eval-blocks",
        "8",
        *extra,
    ]
    return pretrain.main(args)


def log_rows(out: Path, key: str = "loss") -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if key in r]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_trains(tmp_path, corpus, method):
    summary = run(
        tmp_path / method, corpus, "--method", method, *([] if method in ("galore", "fira") else ["--save-every", "6"])
    )
    losses = [r["loss"] for r in log_rows(tmp_path / method)]
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert summary["val_ppl"] > 1 and summary["trainable_params"] > 0
    for name in ("summary.json", "loss.png", "run_config.json", "tokenizer", "final"):
        assert (tmp_path / method / name).exists(), name
    if METHODS[method].checkpointable:
        assert (tmp_path / method / "checkpoints" / "step_000006" / "model.safetensors").is_file()


def test_sltrain_counts_come_from_the_library(tmp_path, corpus):
    summary = run(tmp_path, corpus, "--method", "sltrain")
    from transformers import AutoModelForCausalLM, LlamaConfig

    preset = json.loads(Path(MICRO).read_text())
    base = AutoModelForCausalLM.from_config(LlamaConfig(**preset["model"]))
    from methods import sltrain_config

    expected = peft_sltrain.count_parameters(base, sltrain_config(Hyper(rank=4, sparsity=0.05, alpha=1)))
    assert summary["trainable_params"] == summary["total_params"] == expected.trainable


@pytest.mark.parametrize("method", ["sltrain", "relora"])
def test_per_layer_updates_equal_a_normal_step(tmp_path, corpus, method):
    # ReLoRA restarts after step 2: the per-parameter optimizers forget the LoRA factors' state as AdamW does
    extra = ["--method", method, "--global-batch", "4", "--max-steps", "3", "--save-every", "3"]
    extra += ["--method-arg", "relora_every=2"] if method == "relora" else []
    run(tmp_path / "normal", corpus, *extra)
    run(tmp_path / "per_layer", corpus, *extra, "--per-layer-updates")
    a = load_file(tmp_path / "normal" / "checkpoints" / "step_000003" / "model.safetensors")
    b = load_file(tmp_path / "per_layer" / "checkpoints" / "step_000003" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)
    assert [r["loss"] for r in log_rows(tmp_path / "normal")] == pytest.approx(
        [r["loss"] for r in log_rows(tmp_path / "per_layer")], rel=1e-6
    )


def test_resume_equals_uninterrupted(tmp_path, corpus):
    full = tmp_path / "full"
    run(full, corpus, "--method", "sltrain", "--save-every", "3")
    # a run killed right after its step-3 checkpoint: later checkpoints, log rows and outputs never happened
    killed = tmp_path / "killed"
    shutil.copytree(full, killed)
    shutil.rmtree(killed / "checkpoints" / "step_000006")
    shutil.rmtree(killed / "final")
    (killed / "summary.json").unlink()
    rows = [line for line in (killed / "log.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 3]
    cut = [line for line in (killed / "log.jsonl").read_text().splitlines() if json.loads(line)["step"] == 4][0]
    (killed / "log.jsonl").write_text("\n".join(rows) + "\n" + cut[:12])  # killed while writing step 4's row
    run(killed, corpus, "--method", "sltrain", "--save-every", "3", "--resume")
    assert log_rows(killed) == log_rows(full)  # bit-identical losses, steps 4-6 included
    assert log_rows(killed, "val_ppl") == log_rows(full, "val_ppl")
    a = load_file(full / "checkpoints" / "step_000006" / "model.safetensors")
    b = load_file(killed / "checkpoints" / "step_000006" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    (killed / "summary.json").unlink()
    with pytest.raises(ValueError, match=r"different config or method \(eval_blocks: saved 8 vs now 5\)"):
        run(killed, corpus, "--method", "sltrain", "--save-every", "3", "--resume", "--eval-blocks", "5")
    (killed / "run_config.json").write_text((killed / "run_config.json").read_text()[:100])
    with pytest.raises(ValueError, match=r"`--resume`: .*run_config.json is damaged \(.*\); it cannot be resumed"):
        run(killed, corpus, "--method", "sltrain", "--save-every", "3", "--resume")


def killed_after(run_dir: Path, to: Path, step: int) -> Path:
    """A copy of the finished run in `run_dir` as a kill right after its step-`step` checkpoint would have left it."""
    shutil.copytree(run_dir, to)
    for checkpoint in (to / "checkpoints").iterdir():
        if int(checkpoint.name.removeprefix(checkpointing.CHECKPOINT_PREFIX)) > step:
            shutil.rmtree(checkpoint)
    shutil.rmtree(to / "final")
    (to / "summary.json").unlink()
    rows = [line for line in (to / "log.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
    (to / "log.jsonl").write_text("".join(row + "\n" for row in rows))
    return to


def test_resume_with_per_layer_updates_across_a_relora_restart_equals_uninterrupted(tmp_path, corpus):
    """What the sltrain resume test does not reach: the per-parameter optimizers' schedules, ReLoRA's restart after
    the resume (its new A is drawn from the restored RNG state) and the optimizer settings saved with them."""
    extra = ["--method", "relora", "--per-layer-updates", "--global-batch", "4", "--save-every", "3"]
    extra += ["--method-arg", "relora_every=2", "--weight-decay", "0.1"]  # restarts after steps 2 and 4
    summary = run(tmp_path / "full", corpus, *extra)
    killed = killed_after(tmp_path / "full", tmp_path / "killed", 3)
    run(killed, corpus, *extra, "--resume")
    assert log_rows(killed) == log_rows(tmp_path / "full")  # losses and learning rates, steps 4-6 included
    assert log_rows(killed, "val_ppl") == log_rows(tmp_path / "full", "val_ppl")
    a, state = checkpointing.load_checkpoint(tmp_path / "full" / "checkpoints" / "step_000006")
    b = load_file(killed / "checkpoints" / "step_000006" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    groups = [group for entry in state["optimizer"].values() for group in entry["optimizer"]["param_groups"]]
    assert {(g["weight_decay"], g["betas"]) for g in groups} == {(0.1, (0.9, 0.999))}  # --weight-decay reached AdamW
    # one gradient resident at a time: the largest parameter's (all of them fp32 here)
    assert summary["grad_bytes"] == max(v.numel() * 4 for v in a.values() if v.is_floating_point())
    with pytest.raises(ValueError, match=r"different config or method \(seed: saved 0 vs now 1\)"):
        run(killed, corpus, *extra, "--resume", "--seed", "1")  # another seed draws other supports and data


def test_a_resume_keeps_the_runs_micro_batch_unless_given_another(tmp_path, corpus, capsys, monkeypatch):
    """The micro-batch only splits each global batch into forward passes: a resume may lower or raise it (another
    machine's memory) and follows the run up to rounding; one that does not pass it takes the run's own."""
    full = tmp_path / "full"
    run(full, corpus, "--micro-batch", "8", "--save-every", "3")  # one forward pass per step
    own = killed_after(full, tmp_path / "own", 3)
    run(own, corpus, "--resume", "--save-every", "3")  # not the preset's 4: the run's 8, so bit for bit
    assert log_rows(own) == log_rows(full)
    failing = killed_after(full, tmp_path / "failing", 3)
    with monkeypatch.context() as patched:  # a resume that fails before it trains leaves the run as it was
        patched.setattr(checkpointing, "load_checkpoint", lambda path: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            run(failing, corpus, "--resume", "--save-every", "3", "--micro-batch", "2")
    assert json.loads((failing / "run_config.json").read_text())["micro_batch"] == 8
    other = killed_after(full, tmp_path / "other", 3)
    capsys.readouterr()
    run(other, corpus, "--resume", "--save-every", "3", "--micro-batch", "2")  # 4 accumulation steps
    assert "--resume: --micro-batch 2 (the run trained with 8): the same global batches" in capsys.readouterr().out
    resumed, uninterrupted = log_rows(other), log_rows(full)
    assert resumed[:3] == uninterrupted[:3] and [r["lr"] for r in resumed] == [r["lr"] for r in uninterrupted]
    assert [r["loss"] for r in resumed[3:]] == pytest.approx([r["loss"] for r in uninterrupted[3:]], rel=1e-5)
    assert json.loads((other / "run_config.json").read_text())["micro_batch"] == 2  # with its first checkpoint
    with pytest.raises(ValueError, match="multiple of --micro-batch"):  # still checked against the global batch
        run(killed_after(full, tmp_path / "bad", 3), corpus, "--resume", "--save-every", "3", "--micro-batch", "3")


def test_the_last_step_is_evaluated_and_checkpointed_off_the_cadence(tmp_path, corpus):
    """5 steps, every 3: steps 3 and 5 are evaluated and saved (--save-every "and at the end"); each evaluation scores
    the first --eval-blocks sequences, and the summary's val_ppl is the last one logged."""
    summary = run(tmp_path, corpus, "--method", "sltrain", "--max-steps", "5", "--save-every", "3")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000003", "step_000005"]
    val = log_rows(tmp_path, "val_ppl")
    assert [r["step"] for r in val] == [3, 5] and summary["val_ppl"] == val[-1]["val_ppl"]
    assert summary["val_tokens"] == 8 * (32 - 1)  # --eval-blocks 8 of the validation text's more than 8 blocks


def test_interrupted_save_leaves_no_complete_looking_checkpoint(tmp_path, monkeypatch):
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while writing the optimizer state
        Path(path).write_bytes(b"partial")

    monkeypatch.setattr(checkpointing, "save_file", failing_save)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.save_checkpoint(tmp_path / "checkpoints" / "step_000003", {"w": torch.ones(2)}, {"step": 3})
    assert not (tmp_path / "checkpoints" / "step_000003").exists()
    assert checkpointing.latest_checkpoint(tmp_path) is None
    with pytest.raises(FileExistsError):
        (tmp_path / "checkpoints" / "step_000004").mkdir()
        checkpointing.save_checkpoint(tmp_path / "checkpoints" / "step_000004", {}, {})


def test_latest_checkpoint_is_the_highest_step_not_the_last_name(tmp_path):
    for name in ("step_999999", "step_1000000", "step_000007", "step_notes"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert checkpointing.latest_checkpoint(tmp_path).name == "step_1000000"  # as text, step_999999 sorts last


def test_checkpoint_state_round_trip_without_pickle(tmp_path):
    state = {
        "step": 3,
        "opt": {
            "state": {0: {"exp_avg": torch.arange(3.0), "step": torch.tensor(2.0)}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0]}],
        },
    }
    w = torch.ones(2, 2)
    checkpointing.save_checkpoint(tmp_path / "c", {"a.weight": w, "b.weight": w}, state)  # tied: stored once
    model_state, loaded = checkpointing.load_checkpoint(tmp_path / "c")
    assert loaded["opt"]["param_groups"][0]["betas"] == (0.9, 0.99)
    assert torch.equal(loaded["opt"]["state"][0]["exp_avg"], torch.arange(3.0))
    assert set(model_state) == {"a.weight", "b.weight"} and len(load_file(tmp_path / "c" / "model.safetensors")) == 1
    rows = torch.arange(8.0).view(2, 4)  # two views of one storage, of one shape, at other offsets: not tied
    checkpointing.save_checkpoint(tmp_path / "d", {"a": rows[0], "b": rows[1]}, {})
    model_state, _ = checkpointing.load_checkpoint(tmp_path / "d")
    assert model_state["a"].tolist() == [0, 1, 2, 3] and model_state["b"].tolist() == [4, 5, 6, 7]


def test_merged_export_loads_as_plain_model(tmp_path, corpus):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run(tmp_path, corpus, "--method", "sltrain", "--merge", "--max-steps", "2")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any(isinstance(m, peft_sltrain.SLTrainLayer) for m in plain.modules())
    base = AutoModelForCausalLM.from_config(plain.config)
    adapter = PeftModel.from_pretrained(base, tmp_path / "final").eval()
    ids = torch.randint(0, plain.config.vocab_size, (2, 16))
    torch.testing.assert_close(plain(ids).logits, adapter(ids).logits, rtol=0, atol=1e-5)


def test_the_end_of_text_embedding_is_an_ordinary_trained_row(tmp_path, corpus):
    """EOS separates documents and is not padding (the blocks have none): its embedding starts random and trains as
    every row does; LLaMA would zero and freeze the row of a `pad_token_id`, and a model fed EOS alone (`sample.py`
    with no prompt) would then predict a uniform distribution."""
    from transformers import AutoModelForCausalLM

    run(tmp_path, corpus, "--method", "sltrain", "--merge", "--max-steps", "2")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    embeddings, eos = model.get_input_embeddings(), model.config.eos_token_id
    assert model.config.pad_token_id is None and embeddings.padding_idx is None
    assert embeddings.weight[eos].abs().min() > 0
    with torch.no_grad():
        probs = model(torch.tensor([[eos]])).logits[0, -1].softmax(-1)
    assert probs.max() > 1.2 * probs.min()  # with a zero row: exactly uniform (zero logits)


def card_loading_code(export: Path) -> dict:
    """Runs the "How to use" code of the model card in `export` (its generation included), for that directory."""
    card = (export / "README.md").read_text()
    code = card.split("## How to use")[1].split("```python")[1].split("```")[0]
    namespace = {}
    exec(code.replace("path/to/this/directory", str(export)), namespace)
    return namespace


@pytest.fixture
def fake_hub(monkeypatch):
    """The Hub as `FakeHfApi`, online, logged in as alice."""
    FakeHfApi.calls, FakeHfApi.private, FakeHfApi.message, FakeHfApi.existing = [], None, None, {}
    monkeypatch.setattr(model_card.hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(model_card, "HfApi", FakeHfApi)
    monkeypatch.setattr(model_card, "get_token", lambda: "hf_fake")
    return FakeHfApi


def test_push_to_hub_uploads_final_whose_card_loads_it_by_id(tmp_path, corpus, fake_hub):
    """`--push-to-hub` uploads all of `final/` (adapter, architecture, tokenizer, card) and nothing else; the card's
    code names the repository, and loads the model from what was uploaded alone."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    run(out, corpus, "--method", "sltrain", "--max-steps", "2", "--merge", "--push-to-hub", "--hub-model-id",
        "alice/micro-sltrain", "--hub-private")  # fmt: skip
    (_, token), (_, repo), (_, repo_again, uploaded) = fake_hub.calls
    assert token == "hf_fake" and repo == repo_again == "alice/micro-sltrain" and fake_hub.private is True
    final = out / "final"
    assert uploaded == sorted(p.name for p in final.iterdir())  # everything of final/, nothing of merged/ or the run
    assert {"README.md", "adapter_model.safetensors", "config.json", "tokenizer.json"} <= set(uploaded)
    assert "scripts/pretrain.py run: sltrain" in fake_hub.message
    card = (final / "README.md").read_text()
    assert 'PeftModel.from_pretrained(base, "alice/micro-sltrain")' in card and "path/to/this" not in card
    # no folder of this machine goes public: the data files, the preset and --out-dir by their names alone
    for folder in (tmp_path, Path(corpus[0]).parent, ROOT):
        for name in uploaded:
            if name.endswith((".json", ".md", ".txt", ".jinja")):
                assert str(folder) not in (final / name).read_text(), name
    assert "--model llama_micro.json --out-dir run --train-files train.txt" in card
    assert '"train_files": [\n    "train.txt"\n  ]' in card and "(local folders left out):" in card
    hub_copy = tmp_path / "hub"
    hub_copy.mkdir()
    for name in uploaded:
        shutil.copy(final / name, hub_copy / name)
    namespace = {}
    code = card.split("## How to use")[1].split("```python")[1].split("```")[0]
    exec(code.replace("alice/micro-sltrain", str(hub_copy)), namespace)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    ids = torch.randint(0, merged.config.vocab_size, (1, 8))
    torch.testing.assert_close(namespace["model"](ids).logits, merged(ids).logits, rtol=0, atol=1e-5)


def test_what_goes_public_names_local_paths_without_their_folders():
    value = {"files": ["/home/alice/corpus/a.txt", "rel/b.txt"], "n": 3, "tokenizer": "/srv/tok/"}
    assert model_card.without_folders(value) == {"files": ["a.txt", "rel/b.txt"], "n": 3, "tokenizer": "tok"}
    args = ["python", "scripts/pretrain.py", "--out-dir=/home/alice/runs/x", "--train-files", "/data/t.txt", "--lr=3"]
    assert model_card.without_folders(args) == [*args[:2], "--out-dir=x", "--train-files", "t.txt", "--lr=3"]
    assert model_card.command_without_folders("python x.py --data '/a b/c d.txt'") == "python x.py --data 'c d.txt'"


def test_push_to_hub_names_the_repository_after_the_out_dir(tmp_path, corpus, fake_hub):
    run(tmp_path / "micro-full", corpus, "--method", "full", "--max-steps", "2", "--push-to-hub")
    assert fake_hub.calls[-1][1] == "alice/micro-full" and fake_hub.private is None
    assert (
        'AutoModelForCausalLM.from_pretrained("alice/micro-full")'
        in (tmp_path / "micro-full/final/README.md").read_text()
    )


def test_push_to_hub_fails_before_anything_without_access(tmp_path, corpus, monkeypatch):
    """No token, an unreachable Hub, offline mode or a bad repository id: one clear error before any data is read or
    an earlier run is deleted, naming pretrain.py's own flags."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(model_card.hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(model_card, "get_token", lambda: None)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "log.jsonl").write_text("{}\n")
    argv = ["--model", MICRO, "--train-files", corpus[0], "--validation-files", corpus[1], "--push-to-hub"]
    with pytest.raises(
        SystemExit,
        match=r"pretrain.py: error: `--push-to-hub` needs a Hugging Face token.*auth login`, or set HF_TOKEN\.$",
    ):
        pretrain.cli([*argv, "--out-dir", str(earlier), "--overwrite"])
    assert (earlier / "log.jsonl").exists()  # not deleted
    monkeypatch.setattr(model_card, "get_token", lambda: "hf_fake")
    monkeypatch.setattr(model_card.hub_constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises(model_card.HubError, match=r"`--push-to-hub`: cannot reach the Hugging Face Hub"):
        pretrain.main([*argv, "--out-dir", str(tmp_path / "a")])
    monkeypatch.setattr(model_card, "HfApi", FakeHfApi)
    with pytest.raises(
        model_card.HubError, match=r"'alice/lr=4e-4' \(from `--out-dir`'s name\) is no valid.*`--hub-model-id`"
    ):
        pretrain.main([*argv, "--out-dir", str(tmp_path / "lr=4e-4")])
    with pytest.raises(model_card.HubError, match=r"`--hub-model-id` 'alice/bad id!' is no valid"):
        pretrain.main([*argv, "--out-dir", str(tmp_path / "b"), "--hub-model-id", "alice/bad id!"])
    monkeypatch.setattr(model_card.hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(model_card.HubError, match=r"`--push-to-hub` is impossible in offline mode"):
        pretrain.main([*argv, "--out-dir", str(tmp_path / "c")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier"]  # nothing made, not even a tokenizer cache


@pytest.mark.parametrize("flag", [["--hub-model-id", "alice/x"], ["--hub-private"]])
def test_hub_flags_without_push_to_hub_are_refused(tmp_path, corpus, flag):
    with pytest.raises(ValueError, match=f"`{flag[0]}.*without `--push-to-hub` nothing is uploaded"):
        run(tmp_path, corpus, *flag)


def test_a_failed_upload_keeps_the_run_and_says_how_to_upload_it(tmp_path, corpus, fake_hub, monkeypatch):
    monkeypatch.setattr(model_card, "HfApi", FailingHfApi)
    with pytest.raises(
        model_card.HubError,
        match=r"Everything is saved locally in .*final: upload it later with `hf upload alice/run ",
    ):
        run(tmp_path / "run", corpus, "--method", "sltrain", "--max-steps", "2", "--push-to-hub")
    out = tmp_path / "run"
    assert (out / "summary.json").exists() and (out / "final" / "adapter_model.safetensors").exists()


# ------------------------------------------------------------------ review CE: --push-to-hub edge cases
@pytest.mark.parametrize("method", sorted(METHODS))
def test_push_to_hub_uploads_all_of_final_for_every_method(tmp_path, corpus, fake_hub, method):
    """Every method's final/ goes up whole (a dense model's generation_config.json included)."""
    run(tmp_path / method, corpus, "--method", method, "--max-steps", "2", "--push-to-hub")
    uploaded = fake_hub.calls[-1][2]
    assert uploaded == sorted(p.name for p in (tmp_path / method / "final").iterdir())


def test_push_to_hub_uploads_a_tokenizers_chat_template(tmp_path, corpus, fake_hub):
    """A `--tokenizer` with a chat template (most instruct and many base tokenizers on the Hub) saves it as
    `chat_template.jinja` next to tokenizer.json: final/ holds it, so the repository must too ("all of it")."""
    tokenizer = data.train_tokenizer(Path(corpus[0]).read_text(), 300)
    tokenizer.hf.chat_template = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    tokenizer.save(tmp_path / "tok")
    run(tmp_path / "run", corpus, "--tokenizer", str(tmp_path / "tok"), "--max-steps", "2", "--push-to-hub")
    final = tmp_path / "run" / "final"
    assert (final / "chat_template.jinja").is_file()
    assert fake_hub.calls[-1][2] == sorted(p.name for p in final.iterdir())


def test_hub_model_id_without_a_namespace_is_the_users(tmp_path, corpus, fake_hub):
    """`--hub-model-id micro`: the Hub creates `alice/micro`; the card's code must name that, not `micro` (which
    `from_pretrained` does not resolve to alice's repository)."""
    run(tmp_path / "run", corpus, "--max-steps", "2", "--push-to-hub", "--hub-model-id", "micro")
    assert fake_hub.calls[-1][1] == "alice/micro"
    assert 'from_pretrained("alice/micro")' in (tmp_path / "run" / "final" / "README.md").read_text()


class RemoteHfApi(FakeHfApi):
    """FakeHfApi that keeps each repository's files, as the Hub does between commits (`delete_patterns` honoured)."""

    files: dict = {}

    def upload_folder(
        self, folder_path, repo_id, allow_patterns, ignore_patterns, commit_message, delete_patterns=None
    ):
        from huggingface_hub.utils import filter_repo_objects

        local = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
        uploaded = set(filter_repo_objects(local, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        remote = RemoteHfApi.files.setdefault(repo_id, set())
        if delete_patterns:
            remote -= set(filter_repo_objects(sorted(remote), allow_patterns=delete_patterns))
        remote |= uploaded


def test_a_second_push_to_the_same_repository_leaves_no_stale_files(tmp_path, corpus, fake_hub, monkeypatch):
    """An SLTrain run pushed, then the same --out-dir rerun (`--overwrite`) with `--method full`: the repository
    keeps the first push's adapter_config.json, and `AutoModelForCausalLM.from_pretrained(id)` (the full card's
    code) then loads the adapter's model, not the pushed one."""
    RemoteHfApi.files = {}
    monkeypatch.setattr(model_card, "HfApi", RemoteHfApi)
    out = tmp_path / "run"
    for method in ("sltrain", "full"):
        run(out, corpus, "--method", method, "--max-steps", "2", "--overwrite", "--push-to-hub")
    assert RemoteHfApi.files["alice/run"] == {p.name for p in (out / "final").iterdir()}


def test_push_to_hub_on_a_resumed_run(tmp_path, corpus, fake_hub):
    """A run resumed with `--push-to-hub` (not given at its start) resumes (the flag is no trajectory setting) and
    uploads; its card says it was resumed and names the repository."""
    out = tmp_path / "run"
    run(out, corpus, "--max-steps", "4", "--save-every", "2")
    shutil.rmtree(out / "checkpoints" / "step_000004")
    (out / "summary.json").unlink()
    run(out, corpus, "--max-steps", "4", "--save-every", "2", "--resume", "--push-to-hub")
    assert fake_hub.calls[-1][:2] == ("upload_folder", "alice/run")
    card = (out / "final" / "README.md").read_text()
    assert '"alice/run"' in card and "--resume" in card


def test_ctrl_c_during_the_upload_says_how_to_upload(tmp_path, corpus, fake_hub, monkeypatch, capsys):
    """A Ctrl-C in the upload comes after summary.json: `--resume` refuses the complete run, so the hint must be
    the `hf upload` command, not `--resume`."""

    class Interrupted(FakeHfApi):
        def upload_folder(self, **kwargs):
            raise KeyboardInterrupt

    monkeypatch.setattr(model_card, "HfApi", Interrupted)
    out = tmp_path / "run"
    argv = ["--model", MICRO, "--out-dir", str(out), "--train-files", corpus[0], "--validation-files", corpus[1],
            "--eval-blocks", "8", "--max-steps", "2", "--save-every", "2", "--push-to-hub"]  # fmt: skip
    with pytest.raises(SystemExit) as stopped:
        pretrain.cli(argv)
    assert (out / "summary.json").exists()
    said = f"{stopped.value.code}\n{capsys.readouterr().err}"  # (SystemExit's message, or a line on stderr)
    assert "hf upload alice/run" in said and "--resume" not in said


HUB_RUN = """
import sys, time
from datetime import timedelta
sys.path.insert(0, {scripts!r})
import torch.distributed as dist
_init = dist.init_process_group
def init(*a, **k):  # a short process-group timeout stands in for NCCL's 10 minutes
    k["timeout"] = timedelta(seconds=3)
    return _init(*a, **k)
dist.init_process_group = init
import model_card, pretrain
class SlowHub:
    def __init__(self, token=None, endpoint=None): self.endpoint = "https://fake.hub"
    def whoami(self): return {{"name": "alice"}}
    def create_repo(self, repo_id, private=None, exist_ok=False): return "https://fake.hub/" + repo_id
    def upload_folder(self, **kwargs): time.sleep(8)  # a big model over a slow link
model_card.hub_constants.HF_HUB_OFFLINE = False
model_card.HfApi, model_card.get_token = SlowHub, lambda: {token!r}
pretrain.cli()
"""


def torchrun_with_a_hub(tmp_path, corpus, token: str | None) -> subprocess.CompletedProcess:
    """pretrain.py under torchrun, 2 CPU processes, pushing to a fake Hub whose upload takes 8 s (longer than the
    process group's timeout, here 3 s), with `token` as the stored login."""
    script = tmp_path / "hub_run.py"
    script.write_text(HUB_RUN.format(scripts=str(ROOT / "scripts"), token=token))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, str(script),
           "--model", MICRO, "--out-dir", str(tmp_path / "ddp"), "--train-files", corpus[0], "--validation-files",
           corpus[1], "--eval-blocks", "8", "--max-steps", "2", "--push-to-hub"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    return subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)


def test_an_upload_longer_than_the_process_group_timeout_completes_under_torchrun(tmp_path, corpus):
    """With several processes, the others must not sit in a barrier while the main process uploads: a barrier
    outliving the process group's timeout (NCCL: 10 min) kills them, and torchrun then kills the upload."""
    done = torchrun_with_a_hub(tmp_path, corpus, token="hf_fake")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pretrain.py: uploaded" in done.stdout


def test_a_failed_hub_check_stops_every_process_alike(tmp_path, corpus):
    """The main process checks the Hub; the others stop with it, with a line each, not at their next collective
    with a gloo traceback."""
    done = torchrun_with_a_hub(tmp_path, corpus, token=None)
    assert done.returncode != 0 and not (tmp_path / "ddp").exists()
    assert done.stderr.count("pretrain.py: error: `--push-to-hub` needs a Hugging Face token") == 1
    assert "pretrain.py: error: `--push-to-hub`: the main process's check of the Hub failed" in done.stderr
    assert "gloo" not in done.stderr and "Connection closed" not in done.stderr


@pytest.mark.parametrize(
    "me, repo_id, private, existing, message",
    [
        ({"name": "alice", "auth": {"accessToken": {"role": "read"}}}, None, None, {}, "the token is read-only"),
        ({"name": "alice", "orgs": [{"name": "lab"}]}, "bob/x", None, {},
         r"`--hub-model-id` 'bob/x' is in 'bob', which is neither you \('alice'\) nor one of your organizations "
         r"\(\['lab'\]\)"),
        ({"name": "alice"}, "", None, {}, "`--hub-model-id` is empty; give USER/NAME, or leave it out for alice/run"),
        ({"name": "alice"}, "alice/x", True, {"alice/x": False},
         "'alice/x' exists and is public, and `--hub-private` asks for a private repository"),
    ],
)  # fmt: skip
def test_the_hub_check_refuses_an_upload_that_would_fail_or_go_public(
    fake_hub, monkeypatch, me, repo_id, private, existing, message
):
    """Before training: a read-only token, a namespace that is not the user's nor an organization's (the upload
    would fail after training), an empty id, a private upload to an existing public repository (it would stay
    public: `create_repo(exist_ok=True)` leaves it as it is)."""
    monkeypatch.setattr(FakeHfApi, "me", me)
    monkeypatch.setattr(FakeHfApi, "existing", existing)
    with pytest.raises(model_card.HubError, match=message):
        model_card.check_hub_access(None, repo_id, "run", pretrain.HUB_FLAGS, private)


def test_the_hub_check_takes_organizations_and_private_repositories(fake_hub, monkeypatch):
    me = {"name": "alice", "orgs": [{"name": "lab"}], "auth": {"accessToken": {"role": "write"}}}
    monkeypatch.setattr(FakeHfApi, "me", me)
    monkeypatch.setattr(FakeHfApi, "existing", {"lab/old": True})
    for repo_id in ("lab/new", "lab/old", "alice/x"):
        assert model_card.check_hub_access(None, repo_id, "run", pretrain.HUB_FLAGS, True).repo_id == repo_id


def test_sltrain_final_loads_without_a_base_and_samples(tmp_path, corpus, capsys):
    """SLTrain's `final/` holds the architecture, the tokenizer and a card whose code loads it: the same model as the
    dense `merged/`, loaded with nothing but that directory; `sample.py` generates from it."""
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    run(tmp_path, corpus, "--method", "sltrain", "--merge", "--max-steps", "2")
    final = tmp_path / "final"
    card = ModelCard.load(final / "README.md")
    assert (
        card.data.library_name == "peft"
        and "sltrain" in card.data.tags
        and card.data.model_name == "llama-micro-sltrain"
    )
    assert "--max-steps 2" in card.text and "validation perplexity" in card.text
    assert re.search(r"trained on [\d,]+ tokens of `.*train.txt` in \d+ s \(one process on cpu\)", card.text)
    loaded = card_loading_code(final)
    assert isinstance(loaded["model"].base_model.model.model.layers[0].mlp.up_proj, peft_sltrain.SLTrainLayer)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 16))
    torch.testing.assert_close(loaded["model"](ids).logits, merged(ids).logits, rtol=0, atol=1e-5)
    dense, tokenizer = sample.load(final)  # merged into plain layers
    assert not any(isinstance(m, peft_sltrain.SLTrainLayer) for m in dense.modules())
    torch.testing.assert_close(dense(ids).logits, merged(ids).logits, rtol=0, atol=1e-5)
    assert tokenizer.get_vocab() == loaded["tokenizer"].get_vocab() and len(tokenizer) == merged.config.vocab_size

    capsys.readouterr()
    greedy = sample.main(
        [str(tmp_path), "--prompt", "It is", "--temperature", "0", "--num-samples", "2", "--max-new-tokens", "40"]
    )
    prompt = tokenizer("It is", add_special_tokens=False)["input_ids"]  # local text: no EOS between documents
    expected = merged.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert greedy == [tokenizer.decode(expected[0], skip_special_tokens=True)] * 2
    assert greedy[0].startswith("It is") and greedy[0] in capsys.readouterr().out
    sampled = sample.main([str(final), "--max-new-tokens", "20", "--seed", "3"])
    assert sampled == sample.main([str(final), "--max-new-tokens", "20", "--seed", "3"]) and len(set(sampled)) > 1


def test_sample_refuses_bad_input(tmp_path, corpus):
    with pytest.raises(ValueError, match="neither it nor .*final has a config.json"):
        sample.main([str(tmp_path)])
    run(tmp_path, corpus, "--method", "sltrain", "--max-steps", "2")
    for flag, value, message in [
        ("--temperature", "nan", "`--temperature` must be a finite number >= 0, got nan"),
        ("--num-samples", "0", "`--num-samples` must be at least 1, got 0"),
        ("--max-new-tokens", "64", "prompt (0 tokens) plus `--max-new-tokens` 64 exceed the model's 63 positions"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            sample.main([str(tmp_path), flag, value])
    # an EOS and up to 63 new tokens fill the 64 positions: allowed (greedy may stop early, at an EOS)
    assert len(sample.main([str(tmp_path), "--max-new-tokens", "63", "--num-samples", "1", "--temperature", "0"])) == 1
    with pytest.raises(ValueError, match=re.escape("`--seed` must be in [0, 2**64), got 99999999999999999999")):
        sample.main([str(tmp_path), "--seed", "99999999999999999999"])
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    (tmp_path / "final" / "config.json").write_text(
        json.dumps({**config, "architectures": ["RobertaForSequenceClassification"]})
    )
    with pytest.raises(ValueError, match="holds a RobertaForSequenceClassification, no language model that writes"):
        sample.main([str(tmp_path)])
    (tmp_path / "final" / "config.json").unlink()  # as exported before the architecture was saved with it
    with pytest.raises(ValueError, match="SLTrain adapter without config.json"):
        sample.main([str(tmp_path)])
    adapter = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    (tmp_path / "final" / "adapter_config.json").write_text(json.dumps({**adapter, "task_type": "SEQ_CLS"}))
    with pytest.raises(ValueError, match="holds a SLTRAIN adapter of no pretrain.py run .*: it writes no text"):
        sample.main([str(tmp_path)])
    shutil.rmtree(tmp_path / "final")  # a run killed before its export
    with pytest.raises(ValueError, match="is a pretrain.py run that has not exported its model yet .* `--resume`"):
        sample.main([str(tmp_path)])


@pytest.mark.parametrize("method", ["lowrank", "lora"])
def test_final_is_the_trained_model_as_plain_transformers(tmp_path, corpus, method):
    """Methods other than SLTrain save `final` as the dense model: every trained tensor, in plain Transformers form
    (LoRA's frozen W0 merged with its update, the trained embeddings and head included)."""
    from transformers import AutoModelForCausalLM

    run(tmp_path, corpus, "--method", method, "--max-steps", "2", "--save-every", "2")
    final, info = AutoModelForCausalLM.from_pretrained(tmp_path / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    sl = json.loads(Path(MICRO).read_text())["sltrain"]
    torch.manual_seed(1)  # another init: everything must come from the checkpoint
    trained = METHODS[method].build(final.config, Hyper(rank=sl["rank"], alpha=sl["alpha"]))
    trained.load_state_dict(checkpointing.load_checkpoint(tmp_path / "checkpoints" / "step_000002")[0])
    dense = METHODS[method].to_dense(trained).eval()
    ids = torch.randint(0, final.config.vocab_size, (2, 16))
    torch.testing.assert_close(final.eval()(ids).logits, dense(ids).logits, rtol=0, atol=1e-5)
    loaded = card_loading_code(tmp_path / "final")  # with the tokenizer, as the card shows
    torch.testing.assert_close(loaded["model"](ids).logits, dense(ids).logits, rtol=0, atol=1e-5)
    assert len(loaded["tokenizer"]) == final.config.vocab_size


def test_logged_learning_rate_is_the_one_each_step_trained_at(tmp_path, corpus):
    run(tmp_path, corpus, "--method", "sltrain", "--max-steps", "4", "--warmup-steps", "2", "--eval-every", "100")
    lrs = [r["lr"] for r in log_rows(tmp_path)]
    assert lrs[:2] == pytest.approx([0.003 / 2, 0.003])  # linear warmup: step 1 at half the peak, step 2 at it
    assert lrs[2] == pytest.approx(0.003) and lrs[3] < lrs[2]  # then the cosine decay starts


def test_vocab_size_defaults_to_the_presets_and_is_refused_with_a_hub_tokenizer(tmp_path):
    """A trained tokenizer gets the preset's model.vocab_size unless --vocab-size is given (`--model 60m` is the 60M
    shape); a hub tokenizer brings its own, so a --vocab-size beside it, which would be ignored, is refused."""
    preset = json.loads(Path(MICRO).read_text())
    preset["model"]["vocab_size"] = 320
    (tmp_path / "preset.json").write_text(json.dumps(preset))

    def resolved(*flags):
        return pretrain.resolve(pretrain.parse_args(["--out-dir", "x", *flags]))

    assert resolved("--model", str(tmp_path / "preset.json")).vocab_size == 320
    assert resolved("--model", str(tmp_path / "preset.json"), "--vocab-size", "400").vocab_size == 400
    assert (resolved().vocab_size, resolved("--model", "60m").vocab_size) == (4096, 32000)  # tiny, 60m
    assert resolved("--tokenizer", "t5-base").vocab_size is None  # not loaded here: resolve checks flags only
    with pytest.raises(ValueError, match=r"`--vocab-size` is the size of a tokenizer trained here .*'t5-base'"):
        resolved("--tokenizer", "t5-base", "--vocab-size", "400")
    preset["model"]["vocab_size"] = 64  # fine for a hub tokenizer's model, too small for a trained BPE
    (tmp_path / "preset.json").write_text(json.dumps(preset))
    with pytest.raises(ValueError, match=r"'.*preset.json' sets model.vocab_size 64, .* pass `--vocab-size`"):
        resolved("--model", str(tmp_path / "preset.json"))


def test_a_tokenizer_smaller_than_asked_is_said(tmp_path, corpus, capsys):
    """BPE stops where the text has no pair left to merge (the embedded corpus gives 27,664 of 60M's 32,000): the
    model gets the tokenizer's size, and a line says so."""
    run(tmp_path, corpus, "--vocab-size", "20000", "--max-steps", "2")
    size = json.loads((tmp_path / "final" / "config.json").read_text())["vocab_size"]
    assert size < 20000
    assert f"the trained tokenizer has {size:,} tokens, fewer than --vocab-size 20,000" in capsys.readouterr().out


def test_schedule_is_warmup_then_cosine_to_the_min_lr_ratio_over_the_steps_after_warmup():
    """The whole curve, not only its direction: linear warmup over --warmup-steps, then a half cosine over the
    remaining max_steps - warmup_steps steps, from the peak down to --min-lr-ratio of it (and no lower)."""
    args = pretrain.resolve(
        pretrain.parse_args(["--model", MICRO, "--out-dir", "x", "--max-steps", "10", "--warmup-steps", "2"])
    )
    factor = pretrain.lr_lambda(args, METHODS["sltrain"], pretrain.hyper_from_args(args))
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 11)]
    assert [factor(s) for s in range(11)] == pytest.approx([0.5, 1.0, *cosine])
    assert factor(6) == pytest.approx(0.55) and factor(10) == pytest.approx(0.1) == factor(12)
    # ReLoRA's jagged warmup multiplies it, and reads the run's warmup from the flags: inside the run's own warmup
    # (steps 0-3) only that one applies; its default warmup after a restart is a tenth of relora_every
    argv = ["--model", MICRO, "--out-dir", "x", "--method", "relora", "--max-steps", "60", "--warmup-steps", "4"]
    args = pretrain.resolve(pretrain.parse_args([*argv, "--method-arg", "relora_every=20"]))
    hyper = pretrain.hyper_from_args(args)
    assert (hyper.warmup_steps, hyper.max_steps, hyper.extra) == (4, 60, {"relora_every": 20})
    factor = pretrain.lr_lambda(args, METHODS["relora"], hyper)
    base = pretrain.lr_lambda(args, METHODS["sltrain"], hyper)
    assert [factor(s) / base(s) for s in (0, 3, 19, 20, 21, 22, 40, 41)] == pytest.approx([1, 1, 1, 0.5, 1, 1, 0.5, 1])
    args = pretrain.resolve(pretrain.parse_args([*argv, "--method-arg", "relora_every=3", "--method-arg",
                                                 "relora_warmup=2"]))  # fmt: skip
    factor, base = (pretrain.lr_lambda(args, METHODS[m], pretrain.hyper_from_args(args)) for m in ("relora", "full"))
    assert [factor(s) / base(s) for s in (3, 6, 7)] == pytest.approx([1.0, 0.5, 1.0])  # step 3: in the run's warmup


def test_accumulated_gradient_is_the_global_batch_mean_and_is_clipped(tmp_path, corpus, monkeypatch):
    """2 micro-batches of 4 give the gradient of one batch of 8 (the mean, not the sum: AdamW would hide a factor 2,
    `--grad-clip` would not), and `--grad-clip` bounds the norm the optimizer steps with."""
    from accelerate import Accelerator

    norms = []  # (norm before clipping, norm after), each step
    clip = Accelerator.clip_grad_norm_

    def recording_clip(self, parameters, max_norm, norm_type=2):
        parameters = [p for p in parameters if p.grad is not None]
        before = clip(self, parameters, max_norm, norm_type)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters]))
        norms.append((float(before), float(after)))
        return before

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", recording_clip)
    extra = ("--method", "sltrain", "--max-steps", "2", "--eval-every", "100", "--grad-clip", "0.5")
    run(tmp_path / "accumulated", corpus, *extra)  # the preset's micro-batch 4: 2 accumulation steps
    run(tmp_path / "whole", corpus, *extra, "--micro-batch", "8")
    assert len(norms) == 4
    (accumulated, _), (whole, _) = norms[0], norms[2]  # step 1: the same weights, the same 8 sequences
    assert accumulated == pytest.approx(whole, rel=1e-4) and whole > 0.5
    assert all(after == pytest.approx(0.5, rel=1e-4) for before, after in norms if before > 0.5)
    losses = [[r["loss"] for r in log_rows(tmp_path / name)] for name in ("accumulated", "whole")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


@pytest.mark.parametrize("compute", ["auto", "batched"])
def test_two_process_ddp_matches_one_process(tmp_path, corpus, compute):
    """2 CPU processes (gloo) x micro-batch 4 follow the same loss trajectory as 1 process x 2 accumulation steps;
    batched too, whose gradients all come in at the end of backward, when the groups' backward runs."""
    run(tmp_path / "single", corpus, "--method", "sltrain", "--eval-every", "100", "--compute", compute)
    args = [
        "--model",
        MICRO,
        "--method",
        "sltrain",
        "--compute",
        compute,
        "--out-dir",
        str(tmp_path / "ddp"),
        "--train-files",
        corpus[0],
        "--validation-files",
        corpus[1],
        "--vocab-size",
        "300",
        "--eval-blocks",
        "8",
        "--eval-every",
        "100",
    ]
    done = two_processes(args, tmp_path)
    assert done.stdout.count("2 processes, global batch 8 = micro-batch 4 x 1 accumulation step x 2 processes") == 1
    # the main process alone trains the tokenizer while the other waits: the Trainer's 30 minutes, not NCCL's 10
    assert done.stdout.count("init_process_group timeout=0:30:00") == 2
    single, ddp = log_rows(tmp_path / "single"), log_rows(tmp_path / "ddp")
    assert [r["step"] for r in ddp] == [r["step"] for r in single]
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in single], rel=1e-4)
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["processes"] == 2


REPORTED_TIMEOUT = """
import sys
sys.path.insert(0, {scripts!r})
import torch.distributed as dist
_init = dist.init_process_group
def init(*args, **kwargs):  # says the timeout the process group gets
    print(f"init_process_group timeout={{kwargs.get('timeout')}}", flush=True)
    return _init(*args, **kwargs)
dist.init_process_group = init
import pretrain
pretrain.cli()
"""


def two_processes(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """`scripts/pretrain.py ARGS` on 2 CPU processes (gloo), as `torchrun --nproc_per_node 2` starts them; each
    prints the timeout its process group gets."""
    script = tmp_path / "reported_timeout.py"
    script.write_text(REPORTED_TIMEOUT.format(scripts=str(ROOT / "scripts")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    # `python -m torch.distributed.run` is torchrun, found whether or not the venv's bin/ is on PATH
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, str(script),
           *args]  # fmt: skip
    return subprocess.run(cmd, check=True, env=env, capture_output=True, text=True, timeout=300)


def test_a_global_batch_that_no_micro_batch_splits_over_the_processes_says_so():
    args = pretrain.resolve(pretrain.parse_args(["--model", "tiny", "--out-dir", "unused"]))  # global batch 32
    with pytest.raises(ValueError, match=r"`--global-batch` 32 \(the preset's\) does not divide over 3 processes"):
        pretrain.fit_micro_batch(args, 3)
    assert pretrain.fit_micro_batch(args, 2)[0] == 1 and args.micro_batch == 16  # the preset's 32 lowered to fit


def test_training_state_bytes_count_what_each_process_holds_of_a_dtensor(tmp_path):
    """FSDP2's parameters, gradients and optimizer states are DTensors, whose `numel()` is the whole tensor's: each
    process counts its local shard, so that the sum over processes is the model's (not world_size times it)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)  # (no port to race for)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        half = DTensor.from_local(
            torch.ones(3, 4), mesh, [Shard(0)], run_check=False, shape=torch.Size([6, 4]), stride=(4, 1)
        )  # fmt: skip  (one rank's half of a (6, 4) weight)
        model = torch.nn.Module()
        model.w = torch.nn.Parameter(half)
        optimizer = torch.optim.AdamW([model.w])
        optimizer.state[model.w] = {"exp_avg": half.clone(), "exp_avg_sq": half.clone()}

        class TwoEqualShards:  # `Accelerator.reduce` over two processes holding shards of the same size
            device = torch.device("cpu")

            def reduce(self, tensor, reduction):
                return tensor * 2

        counts = pretrain.training_state_bytes(model, optimizer, TwoEqualShards())
    finally:
        torch.distributed.destroy_process_group()
    whole = 6 * 4 * 4  # bytes of the (6, 4) fp32 weight
    assert counts == {"param_bytes": whole, "grad_bytes": whole, "optimizer_state_bytes": 2 * whole,
                      "training_state_bytes": 4 * whole}  # fmt: skip


def test_a_two_process_run_resumes_as_if_uninterrupted(tmp_path, corpus):
    """Each rank's RNG state is gathered into the checkpoint and given back to it, and only the main process writes:
    a 2-process run killed after its step-3 checkpoint resumes to the uninterrupted run's losses and export."""

    def args(out: Path) -> list[str]:
        return ["--model", MICRO, "--out-dir", str(out), "--train-files", corpus[0], "--validation-files", corpus[1],
                "--eval-blocks", "8", "--eval-every", "3", "--save-every", "3"]  # fmt: skip

    two_processes(args(tmp_path / "full"), tmp_path)
    killed = killed_after(tmp_path / "full", tmp_path / "killed", 3)
    done = two_processes([*args(killed), "--resume", "--ddp-timeout", "600"], tmp_path)
    assert done.stdout.count("init_process_group timeout=0:10:00") == 2  # (accelerate's default: it would drop it)
    assert log_rows(killed) == log_rows(tmp_path / "full")
    assert log_rows(killed, "val_ppl") == log_rows(tmp_path / "full", "val_ppl")
    a = load_file(tmp_path / "full" / "final" / "adapter_model.safetensors")
    b = load_file(killed / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "extra,message",
    [
        (["--method", "magic"], "Unknown `--method` 'magic'"),
        (["--model", "13b"], r"Unknown `--model` .13b.: choose one of \[.tiny., .60m., .130m., .350m., .1b., .7b.\]"),
        (["--method", "sltrain", "--rank", "33"], r"`--rank` 33 does not fit the model: it must be in \[1, 32\]"),
        (["--method", "galore", "--rank", "33"], r"`--rank` 33 does not fit the model: it must be in \[1, 32\]"),
        (["--method", "fira", "--rank", "33"], r"`--rank` 33 does not fit the model: it must be in \[1, 32\]"),
        (["--method", "lowrank", "--rank", "0"], r"`--rank` must be positive, got 0"),
        (["--method", "sltrain", "--optimizer", "adam8bit"], "adam8bit"),
        (["--method", "sltrain", "--per-layer-updates", "--grad-clip", "1"], "cannot clip"),
        (["--method", "sltrain", "--per-layer-updates"], r"no gradient accumulation .*: pass `--micro-batch 8` if it"),
        (["--method", "sltrain", "--global-batch", "6", "--micro-batch", "4"], "multiple of --micro-batch"),
        (["--method", "sltrain", "--global-batch", "4000", "--micro-batch", "4000"], "fewer than one global batch"),
        (["--method", "sltrain", "--seq-len", "65"], "`--seq-len` 65 exceeds the model's max_position_embeddings 64"),
        (["--method", "sltrain", "--warmup-steps", "6"], r"`--warmup-steps` must be in \[0, --max-steps\), got 6\.$"),
        (
            ["--method", "sltrain", "--max-steps", "1"],
            r"got 1 \(the preset's; pass a `--warmup-steps` below --max-steps 1\)",
        ),
        (["--seq-len", "1"], r"`--seq-len` must be at least 2 \(.*\), got 1"),
        (["--grad-clip", "nan"], "`--grad-clip` must be a finite number, got nan"),
        (["--ddp-timeout", "0"], "`--ddp-timeout` must be positive, got 0"),
        (["--grad-clip", "inf"], "`--grad-clip` must be a finite number, got inf"),
        (["--lr", "nan"], "`--lr` must be a finite number, got nan"),
        (["--eval-every", "0"], "`--eval-every` must be positive, got 0"),
        (["--eval-blocks", "0"], "`--eval-blocks` must be positive, got 0"),
        (["--save-every", "-1"], "`--save-every` must be 0 or more, got -1"),
        (["--weight-decay", "-1"], "`--weight-decay` must be 0 or more, got -1.0"),
        (["--min-lr-ratio", "-1"], r"`--min-lr-ratio` must be in \[0, 1\], got -1.0"),
        (["--min-lr-ratio", "1.5"], r"`--min-lr-ratio` must be in \[0, 1\], got 1.5"),
        (["--global-batch", "0"], "`--global-batch` must be positive, got 0"),
        (["--resume", "--overwrite"], "pass one of them"),
        (["--method-arg", "foo"], "`--method-arg` must be KEY=VALUE, got 'foo'"),
        (["--method", "galore", "--method-arg", "scale=inf"], "scale must be a positive float, got 'inf'"),
        (["--vocab-size", "299"], r"`--vocab-size` must be at least 300 \(256 bytes plus merges\), got 299"),
        (["--method", "relora", "--method-arg", "relora_every=abc"], "relora_every must be a positive int, got 'abc'"),
        (["--method", "relora", "--method-arg", "relora_every=0"], "relora_every must be a positive int, got '0'"),
        (
            ["--method", "relora", "--method-arg", "relora_every=4", "--method-arg", "relora_warmup=4"],
            "`--method-arg relora_warmup=4` must be smaller than relora_every 4: ",
        ),
        (
            ["--method", "relora", "--method-arg", "relora_warmup=3"],  # 6 steps: a restart every step
            r"relora_warmup=3` must be smaller than relora_every 1 \(the default, --max-steps // 4\)",
        ),
        (
            ["--method", "sltrain", "--method-arg", "relora_every=5"],
            r"has no setting 'relora_every' \(it takes none\)",
        ),
        (["--method", "galore", "--per-layer-updates"], "works with AdamW-trained methods, not `--method galore`"),
        (["--method", "full", "--alpha", "8"], r"`--method full` does not use --alpha \(it reads none of --rank, "),
        (["--method", "lowrank", "--sparsity", "0.1"], r"does not use --sparsity \(it reads --rank, --alpha\)"),
        (["--method", "galore", "--alpha", "2", "--sparsity", "0.1"], "does not use --sparsity, --alpha"),
        (["--method", "lora", "--compute", "batched"], r"`--method lora` does not use --compute \(SLTrain's compute "),
        (
            ["--method", "full", "--alpha", "8", "--compute", "dense"],
            r"does not use --alpha \(it reads none of --rank, "
            r"--sparsity, --alpha\); nor --compute \(SLTrain's compute path: only `--method sltrain` reads it\)\.",
        ),
        (["--method", "lowrank", "--alpha", "0"], r"`--alpha` must be positive \(B A is scaled by alpha / r\), got 0"),
        (["--alpha", "0"], r"`--alpha` must be positive \(B A is scaled by alpha / r\), got 0.0"),  # the flag's name
        (["--sparsity", "1.5"], r"`--sparsity` must be in \(0, 1\), got 1.5"),
        (["--method", "relora", "--alpha", "-1"], "`--alpha` must be positive"),
        (
            ["--method", "relora", "--method-arg", "relora_every=6"],  # 6 steps
            r"relora_every=6` must be below --max-steps 6: no restart would happen, .* plain LoRA",
        ),
        (["--dataset", "allenai/c4"], "`--dataset` and `--train-files` both name the training text: pass one"),
        (["--seed", "1000000000000000"], r"`--seed` must be in \[0, 2\*\*32\), got 1000000000000000"),
        (["--method", "full", "--seed", "-1"], r"`--seed` must be in \[0, 2\*\*32\), got -1"),
        (["--tokenizer", "/nonexistent/tokenizer"], r"`--tokenizer` '/nonexistent/tokenizer': no such folder \(nor"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, corpus, extra, message):
    with pytest.raises(ValueError, match=message) as refused:
        run(tmp_path / "out", corpus, *extra)
    assert "\n" not in str(refused.value)  # one line, also where it quotes a library's error
    assert not any(tmp_path.iterdir())  # nothing written, not even the tokenizer cache next to --out-dir


def test_flag_checks_at_their_edges(tmp_path):
    """What the bad-input list does not reach: a sequence as long as the position embeddings is fine; a streamed
    dataset needs a hub tokenizer; a rank must fit the k/v projections, narrower than hidden under grouped-query
    attention (1 k/v head of 8 here), as a clear error before anything runs."""

    def resolve(*extra: str):
        return pretrain.resolve(pretrain.parse_args(["--model", MICRO, "--out-dir", str(tmp_path / "out"), *extra]))

    assert resolve("--seq-len", "64").seq_len == 64
    with pytest.raises(ValueError, match=r"With `--dataset`, give a hub tokenizer \(e.g. `--tokenizer t5-base`"):
        resolve("--dataset", "allenai/c4")
    preset = json.loads(Path(MICRO).read_text())
    preset["model"]["num_key_value_heads"] = 1
    (tmp_path / "gqa.json").write_text(json.dumps(preset))
    for method in ("sltrain", "lowrank"):
        assert resolve("--model", str(tmp_path / "gqa.json"), "--method", method, "--rank", "8").rank == 8
        with pytest.raises(ValueError, match=r"`--rank` 9 does not fit the model: it must be in \[1, 8\]"):
            resolve("--model", str(tmp_path / "gqa.json"), "--method", method, "--rank", "9")
    assert not any(tmp_path.glob("out*"))


def test_the_seed_draws_the_sparse_supports():
    """`--seed` reaches SLTrain's config: the same seed draws the same supports, another seed others."""

    def supports(seed: int) -> list[torch.Tensor]:
        args = pretrain.resolve(pretrain.parse_args(["--model", MICRO, "--out-dir", "x", "--seed", str(seed)]))
        model = METHODS["sltrain"].build(micro_config(), pretrain.hyper_from_args(args))
        assert model.peft_config["default"].seed == seed
        return [m.sltrain_indices["default"] for m in model.modules() if isinstance(m, peft_sltrain.SLTrainLayer)]

    seven, again, zero = supports(7), supports(7), supports(0)
    assert len(seven) == 14 and all(torch.equal(a, b) for a, b in zip(seven, again))
    assert not any(torch.equal(a, b) for a, b in zip(seven, zero))


def test_presets_are_listed_smallest_first():
    assert pretrain.SIZES == ["tiny", "60m", "130m", "350m", "1b", "7b"]  # (--help, and the unknown-preset error)
    names = ["7b", "1.5b", "notes", "125M", "tiny", "60m"]
    assert sorted(names, key=pretrain._by_size) == ["tiny", "60m", "125M", "1.5b", "7b", "notes"]


def test_preset_without_training_settings(tmp_path, corpus):
    preset = json.loads(Path(MICRO).read_text())
    del preset["train"]["max_steps"], preset["sltrain"]
    (tmp_path / "partial.json").write_text(json.dumps(preset))
    with pytest.raises(ValueError, match=r"sets no \['max_steps', 'rank', 'sparsity', 'alpha'\]: .* --max-steps"):
        run(tmp_path / "out", corpus, "--model", str(tmp_path / "partial.json"))
    with pytest.raises(ValueError, match=r"sets no \['max_steps', 'rank', 'alpha'\]"):  # what each method reads
        run(tmp_path / "out", corpus, "--model", str(tmp_path / "partial.json"), "--method", "lora")
    with pytest.raises(ValueError, match=r"sets no \['max_steps'\]"):
        run(tmp_path / "out", corpus, "--model", str(tmp_path / "partial.json"), "--method", "full")
    for broken in ({"model": preset["model"]}, {**preset, "sltrain": 3}, [1]):  # no "train", a bad section, a list
        (tmp_path / "broken.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match='needs a "model" object .*, a "train" object'):
            run(tmp_path / "out", corpus, "--model", str(tmp_path / "broken.json"))
    (tmp_path / "heads.json").write_text(json.dumps({**preset, "model": {**preset["model"], "hidden_size": 30}}))
    with pytest.raises(ValueError, match=r'heads.json\': its "model" object is no valid LlamaConfig: .*hidden size'):
        run(tmp_path / "out", corpus, "--model", str(tmp_path / "heads.json"), "--method", "full")
    typo = {k if k != "num_hidden_layers" else "num_hidden_layer": v for k, v in preset["model"].items()}
    (tmp_path / "typo.json").write_text(json.dumps({**preset, "model": typo}))  # LlamaConfig would train 32 layers
    with pytest.raises(ValueError, match=r"object sets \['num_hidden_layer'\], which LlamaConfig does not know"):
        run(tmp_path / "out", corpus, "--model", str(tmp_path / "typo.json"), "--method", "full")
    (tmp_path / "kv.json").write_text(json.dumps({**preset, "model": {**preset["model"], "num_key_value_heads": 3}}))
    with pytest.raises(ValueError, match=r"num_key_value_heads 3 must divide num_attention_heads 4"):
        run(tmp_path / "out", corpus, "--model", str(tmp_path / "kv.json"), "--method", "full")
    assert not (tmp_path / "out").exists()  # refused before anything is written
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="`--out-dir` .*a_file' is a file, not a directory"):
        run(tmp_path / "a_file", corpus)


@pytest.mark.parametrize(
    "section,key,value,message",
    [
        ("train", "optimizer", "sgd", r"sets 'optimizer' to 'sgd'; choose one of \['adamw', 'adam8bit'\]"),
        ("train", "dtype", "fp16", r"sets 'dtype' to 'fp16'; choose one of \['fp32', 'bf16'\]"),
        ("train", "lr", "0.003", r"sets 'lr' to '0.003', which is no float"),
        ("train", "max_steps", 6.5, r"sets 'max_steps' to 6.5, which is no int"),
        ("train", "seq_len", True, r"sets 'seq_len' to True, which is no int"),
        ("train", "save_every", 3, r"sets 'save_every', which a preset cannot set; .* e.g. --save-every"),
        ("sltrain", "rank", 4.0, r"\"sltrain\" object sets 'rank' to 4.0, which is no int"),
    ],
)
def test_preset_values_are_checked_as_their_flags_are(tmp_path, corpus, section, key, value, message):
    """argparse checks only flags: a preset's value gets the same check (type, choices), and a key no preset may
    set is refused, rather than trained past (an `sgd` optimizer run as AdamW, recorded as sgd) or ignored."""
    preset = json.loads(Path(MICRO).read_text())
    (tmp_path / "preset.json").write_text(json.dumps({**preset, section: {**preset[section], key: value}}))
    with pytest.raises(ValueError, match=message):
        run(tmp_path / "out", corpus, "--model", str(tmp_path / "preset.json"))
    assert not (tmp_path / "out").exists()
    preset["train"]["lr"] = 3  # an int where a float is taken is fine, as on the command line
    (tmp_path / "preset.json").write_text(json.dumps(preset))
    args = pretrain.parse_args(["--model", str(tmp_path / "preset.json"), "--out-dir", "x"])
    assert pretrain.resolve(args).lr == 3.0


def test_methods_without_their_package_and_compile_without_a_compiler_fail_first(tmp_path, corpus, monkeypatch):
    """Before the first step: without matplotlib a run used to train to its end and fail at the loss plot, with no
    final model or summary written."""
    for missing, extra, message in (
        ("galore_torch", ("--method", "galore"), r"`--method galore` needs the galore_torch package: pip install"),
        (
            "matplotlib",
            (),
            r"this run needs matplotlib \(for loss.png\), not installed: pip install 'peft-sltrain\[scripts\]'",
        ),
    ):
        monkeypatch.setattr(pretrain, "installed", lambda name, missing=missing: name != missing)
        with pytest.raises(ValueError, match=message):
            run(tmp_path / "out", corpus, *extra)
        assert not (tmp_path / "out").exists()
    monkeypatch.setattr(pretrain, "installed", lambda name: name != "datasets")
    args = pretrain.parse_args(["--model", MICRO, "--out-dir", "x", "--dataset", "allenai/c4", "--tokenizer", "t5"])
    with pytest.raises(ValueError, match=r"this run needs datasets \(for --dataset\), not installed: pip install"):
        pretrain.resolve(args)
    monkeypatch.undo()
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(ValueError, match="`--compile` on a CPU needs a C\\+\\+ compiler"):
        run(tmp_path / "out", corpus, "--compile")
    assert not any(tmp_path.iterdir())
    monkeypatch.syspath_prepend(str(tmp_path))  # a directory named like a package (a cache dir) is no package
    (tmp_path / "matplotlib_like_dir").mkdir()
    assert not pretrain.installed("matplotlib_like_dir") and pretrain.installed("json")
    assert not pretrain.installed("no_such_module_anywhere")


def test_a_directory_with_any_run_file_is_not_overwritten_without_asking(tmp_path, corpus):
    """Not only `run_config.json` and `checkpoints/` are protected: an export (`final/`, `summary.json`) copied into a
    directory is not deleted by a new run, and without a run_config.json not even with `--overwrite`."""
    out = tmp_path / "out"
    (out / "final").mkdir(parents=True)
    (out / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds final, summary.json but no run_config.json"):
        run(out, corpus)
    assert (out / "final").is_dir() and (out / "summary.json").read_text() == "{}"
    (out / "run_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"already holds a run \(run_config.json, final, summary.json\); pass `--res"):
        run(out, corpus)


def test_damaged_data_files_are_one_clear_error(tmp_path):
    """A truncated gzip, a plain file named .gz and text that is not UTF-8: each named, as a ValueError."""
    good = gzip.compress(b"some text " * 1000)
    (tmp_path / "cut.txt.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "plain.txt.gz").write_text("not gzip")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    for name in ("cut.txt.gz", "plain.txt.gz", "latin.txt"):
        with pytest.raises(ValueError, match=rf"Data file '.*{name}' cannot be read as UTF-8 text"):
            data.read_text(tmp_path / name)


def test_an_unreadable_tokenizer_cache_entry_is_trained_again(tmp_path, corpus):
    text = data.read_text(corpus[0])[:20000]
    expected = data.train_tokenizer(text, 300, cache_dir=tmp_path).encode(["Emma Woodhouse"])
    (entry,) = tmp_path.glob("tokenizer-*.json")
    entry.write_text(entry.read_text()[:100])  # a write cut short
    assert data.train_tokenizer(text, 300, cache_dir=tmp_path).encode(["Emma Woodhouse"]) == expected
    assert data.train_tokenizer(text, 300, cache_dir=tmp_path).encode(["Emma Woodhouse"]) == expected  # re-cached
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]  # no temporary file left


def test_the_tokenizer_cache_tells_vocabulary_sizes_apart(tmp_path, corpus):
    text = data.read_text(corpus[0])[:20000]
    small = data.train_tokenizer(text, 300, cache_dir=tmp_path)
    large = data.train_tokenizer(text, 400, cache_dir=tmp_path)  # the same text: not the 300-token one from the cache
    assert (small.vocab_size, large.vocab_size) == (300, 400) and len(list(tmp_path.iterdir())) == 2


def test_samplers_give_each_process_its_slice_of_one_global_batch():
    """BlockSampler: each epoch visits every block once, in a new order; the batch of step t depends on (seed, t)
    only (a fresh sampler, as after a resume, gives it too); process k of 2 takes its slice of the global batch one
    process would take. StreamingBlocks: the same slices of the packed stream."""
    blocks = torch.arange(10).view(10, 1)
    one = data.BlockSampler(blocks, micro_batch=2, grad_accum=1, world_size=1, seed=3)
    batches = [torch.cat(one.micro_batches(step, 0)).flatten().tolist() for step in range(10)]
    first, second = sum(batches[:5], []), sum(batches[5:], [])  # 5 steps of 2 blocks an epoch
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert torch.cat(data.BlockSampler(blocks, 2, 1, 1, seed=3).micro_batches(7, 0)).flatten().tolist() == batches[7]
    two = data.BlockSampler(blocks, micro_batch=1, grad_accum=1, world_size=2, seed=3)
    assert [[int(two.micro_batches(step, rank)[0]) for rank in (0, 1)] for step in range(10)] == batches

    tokenizer = types.SimpleNamespace(encode=lambda texts: [[ord(c) for c in text] for text in texts], eos_token_id=0)
    texts = ["abcde", "fg", "hijklmn", "o", "pqrstu", "vwxyz"] * 3

    def streamed(micro_batch: int, world_size: int, rank: int) -> list[list[int]]:
        sampler = data.StreamingBlocks(iter(texts), tokenizer, 3, micro_batch, 2, world_size)  # 2 accumulation steps
        return [torch.cat(sampler.micro_batches(step, rank)).tolist() for step in range(2)]

    whole, ranks = streamed(2, 1, 0), [streamed(1, 2, rank) for rank in (0, 1)]
    assert [ranks[0][step] + ranks[1][step] for step in range(2)] == whole
    assert whole[0][:2] == [[97, 98, 99], [100, 101, 0]]  # documents packed in order, each followed by EOS


def test_streamed_dataset_problems_are_found_when_it_is_opened(monkeypatch):
    """Opened eagerly: a missing text column or an empty split fails before the run writes anything."""
    import datasets

    rows = {"train": [{"content": "a"}], "validation": [], "test": [{"text": "a"}, {"text": "b"}]}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split, streaming: rows[split])
    with pytest.raises(ValueError, match=r"needs a 'text' column; it has examples with the columns \['content'\]"):
        data.stream_hf_dataset("fake", None, "train")
    with pytest.raises(ValueError, match=r"split 'validation'\) needs a 'text' column; it has no examples"):
        data.stream_hf_dataset("fake", None, "validation")
    assert list(data.stream_hf_dataset("fake", None, "test")) == ["a", "b"]
    rows["test"].append({"text": None})  # a null document: its position, not a tokenizer's error mid-training
    with pytest.raises(ValueError, match=r"split 'test'\): document 2 has a NoneType 'text', not text"):
        list(data.stream_hf_dataset("fake", None, "test"))

    def no_such_split(name, config, split, streaming):
        raise ValueError(f"Bad split: {split}. Available splits: ['train']")  # as datasets says it

    monkeypatch.setattr(datasets, "load_dataset", no_such_split)
    with pytest.raises(ValueError, match=r"`--dataset` 'fake' \(`--dataset-config` 'en', split 'validation'\) cannot"):
        data.stream_hf_dataset("fake", "en", "validation")


def test_a_dataset_without_validation_split_validates_on_local_files(tmp_path, corpus, monkeypatch):
    """`--validation-files` with `--dataset` replace its validation split (which many corpora lack); the dataset
    has none here, so any read of it fails."""
    import datasets
    from huggingface_hub import ModelCard

    paragraphs = [p for p in Path(corpus[0]).read_text().split("\n\n") if p.strip()]

    def load_dataset(name, config, split, streaming):
        if split != "train":
            raise ValueError(f"Bad split: {split}. Available splits: ['train']")
        return [{"text": p} for p in paragraphs]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data.train_tokenizer(Path(corpus[0]).read_text(), 300).save(tmp_path / "tokenizer")
    args = ["--model", MICRO, "--out-dir", str(tmp_path / "out"), "--dataset", "fake", "--max-steps", "2"]
    summary = pretrain.main([*args, "--tokenizer", str(tmp_path / "tokenizer"), "--validation-files", corpus[1]])
    tokenizer = data.load_tokenizer(str(tmp_path / "tokenizer"))
    blocks = data.to_blocks(data.tokenize_text(tokenizer, Path(corpus[1]).read_text()), 32)[:256]
    assert summary["val_tokens"] == blocks.numel() - len(blocks)  # the local text, tokenised as local text is
    config = json.loads((tmp_path / "out" / "run_config.json").read_text())
    assert set(config["data_sha256"]) == {"validation", "vocabulary"}
    card = (tmp_path / "out" / "final" / "README.md").read_text()
    assert ModelCard.load(tmp_path / "out" / "final" / "README.md").data.datasets == ["fake"]
    scored = f"over {summary['val_tokens']:,} predicted tokens of held-out text: its first {len(blocks)} sequences"
    assert scored + " of 32" in card
    ids = card_loading_code(tmp_path / "out" / "final")["ids"]  # the card's prompt, as training saw documents
    prompt = tokenizer.hf("It is a truth universally acknowledged", add_special_tokens=False)["input_ids"]
    assert ids.tolist() == [[tokenizer.eos_token_id, *prompt]]
    loaded = sample.load(tmp_path / "out" / "final")  # sample.py prompts the model as the card does
    generate, prompts = loaded[0].generate, []
    monkeypatch.setattr(
        loaded[0], "generate", lambda ids, **kwargs: prompts.append(ids.tolist()) or generate(ids, **kwargs)
    )
    monkeypatch.setattr(sample, "load", lambda directory: loaded)
    argv = [str(tmp_path / "out"), "--prompt", "It is a truth universally acknowledged", "--max-new-tokens", "2"]
    sample.main([*argv, "--num-samples", "1"])
    assert prompts == [ids.tolist()]


class FakeAccelerator:
    """What `pretrain.evaluate` uses of an Accelerator, as process `rank` of `processes` on CPU: `reduce` records
    what this process sent and adds what the others would (`others`, as (sum of losses, tokens))."""

    device = torch.device("cpu")

    def __init__(self, rank: int = 0, processes: int = 1, others=(0.0, 0.0)):
        self.process_index, self.num_processes = rank, processes
        self.others = torch.tensor(others, dtype=torch.float64)

    def autocast(self):
        return contextlib.nullcontext()

    def reduce(self, total, reduction):
        assert reduction == "sum"
        self.sent = total.tolist()
        return total + self.others


def test_evaluate_refuses_a_non_finite_loss_and_does_not_overflow():
    class Model(torch.nn.Module):
        def __init__(self, loss):
            super().__init__()
            self.loss = loss

        def forward(self, **batch):
            return types.SimpleNamespace(loss=torch.tensor(self.loss))

    blocks = torch.zeros(2, 5, dtype=torch.int32)
    assert pretrain.evaluate(Model(708.0), blocks, 2, FakeAccelerator()) == pytest.approx(math.exp(708.0))
    with pytest.raises(FloatingPointError, match="Validation loss became 800.0 nats per token, a perplexity beyond"):
        pretrain.evaluate(Model(800.0), blocks, 2, FakeAccelerator())  # exp(800) overflows: never `Infinity` in JSON
    with pytest.raises(FloatingPointError, match="Validation loss became nan; lower `--lr`"):
        pretrain.evaluate(Model(math.nan), blocks, 2, FakeAccelerator())


def test_a_training_loss_that_becomes_nan_stops_the_run(tmp_path, corpus):
    with pytest.raises(FloatingPointError, match=r"Loss became nan at step \d+; lower `--lr`"):
        run(tmp_path / "out", corpus, "--lr", "1e8", "--max-steps", "6", "--warmup-steps", "1")
    assert not (tmp_path / "out" / "summary.json").exists()


@pytest.mark.parametrize(
    "error, status", [(FloatingPointError("Loss became nan at step 3"), pretrain.DIVERGED), (ValueError("bad"), 1)]
)
def test_cli_stops_with_one_line_and_tells_a_diverged_loss_from_bad_input(monkeypatch, capsys, error, status):
    def main(argv):
        raise error

    monkeypatch.setattr(pretrain, "main", main)
    with pytest.raises(SystemExit) as stop:
        pretrain.cli([])
    code = stop.value.code  # SystemExit("message") prints the message and exits with status 1
    assert (code if isinstance(code, int) else 1) == status
    message = capsys.readouterr().err if isinstance(code, int) else code
    assert message.strip() == f"pretrain.py: error: {error}"


def test_ctrl_c_stops_with_one_line_naming_the_checkpoint_to_resume_from(tmp_path, corpus, monkeypatch, capsys):
    """Ctrl-C: no traceback but status 130 and where to go on from (the newest checkpoint, or that there is none)."""
    run(tmp_path, corpus, "--method", "full", "--max-steps", "4", "--save-every", "2")
    capsys.readouterr()  # the run's progress bars

    def main(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "main", main)
    for out, hint in ((tmp_path, f"continue from {tmp_path / 'checkpoints' / 'step_000004'}."),
                      (tmp_path / "none", f"{tmp_path / 'none'} has no checkpoint to resume from")):  # fmt: skip
        with pytest.raises(SystemExit) as stop:
            pretrain.cli(["--out-dir", str(out)])
        assert stop.value.code == 130
        err = capsys.readouterr().err
        assert err.startswith("pretrain.py: interrupted; ") and hint in err and err.count("\n") == 1


def fake_streamed_dataset(corpus, tokenizer_dir: Path, monkeypatch) -> list[str]:
    """`datasets.load_dataset` streaming the corpus's paragraphs as a "train" split (its first 40 as "validation"),
    and a tokenizer trained on the corpus saved in `tokenizer_dir` (a streamed run needs one given); the paragraphs."""
    import datasets

    paragraphs = [p for p in Path(corpus[0]).read_text().split("\n\n") if p.strip()]
    rows = {"train": [{"text": p} for p in paragraphs], "validation": [{"text": p} for p in paragraphs[:40]]}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split, streaming: rows[split])
    data.train_tokenizer(Path(corpus[0]).read_text(), 300).save(tokenizer_dir)
    return paragraphs


def test_streamed_validation_documents_are_joined_by_eos_as_training_documents_are(tmp_path, corpus, monkeypatch):
    paragraphs = fake_streamed_dataset(corpus, tmp_path / "tokenizer", monkeypatch)
    tokenizer = data.load_tokenizer(str(tmp_path / "tokenizer"))
    blocked = []
    to_blocks = data.to_blocks
    monkeypatch.setattr(
        data, "to_blocks", lambda tokens, seq_len: blocked.append(tokens) or to_blocks(tokens, seq_len)
    )
    args = ["--model", MICRO, "--out-dir", str(tmp_path / "out"), "--dataset", "fake", "--tokenizer"]
    pretrain.main([*args, str(tmp_path / "tokenizer"), "--eval-every", "3", "--eval-blocks", "8"])
    validation = data.tokenize_documents(tokenizer, paragraphs[:40])
    assert torch.equal(blocked[0], validation)  # each document followed by EOS
    assert (validation == tokenizer.eos_token_id).sum() == 40
    training = data.StreamingBlocks(iter(paragraphs[:40]), tokenizer, seq_len=32, micro_batch=1, grad_accum=1,
                                    world_size=1)  # fmt: skip
    assert torch.equal(training.micro_batches(0, 0)[0][0], validation[:32].long())  # packed alike


def test_a_streamed_run_resumes_where_it_stopped(tmp_path, corpus, monkeypatch):
    """A streamed dataset has no random access: the resumed run streams past the blocks of the steps it did, and
    then trains on what the uninterrupted run trained on."""
    fake_streamed_dataset(corpus, tmp_path / "tokenizer", monkeypatch)
    args = ["--model", MICRO, "--dataset", "fake", "--tokenizer", str(tmp_path / "tokenizer"), "--eval-blocks", "8"]
    args += ["--eval-every", "3", "--save-every", "3"]
    pretrain.main([*args, "--out-dir", str(tmp_path / "full")])
    killed = killed_after(tmp_path / "full", tmp_path / "killed", 3)
    pretrain.main([*args, "--out-dir", str(killed), "--resume"])
    assert log_rows(killed) == log_rows(tmp_path / "full")
    assert log_rows(killed, "val_ppl") == log_rows(tmp_path / "full", "val_ppl")


def test_a_tokenizer_without_end_of_sequence_is_refused(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE())).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no end-of-sequence token, which the model's config, streamed"):
        data.load_tokenizer(str(tmp_path))


@pytest.mark.parametrize(
    "train,validation,message",
    [
        ("nope.txt", "VAL", "does not exist"),
        ("/", "VAL", "'/' is a directory, not a file"),
        ("EMPTY", "VAL", "holds no text"),
        ("TRAIN", "SHORT", "validation text is shorter than one sequence"),
        ("TRAIN", None, "Give both"),
        ("TRAIN", "TRAIN", r"`--validation-files` '.*' is also a training file \('.*'\): hold text out"),
    ],
)
def test_missing_empty_and_short_data(tmp_path, corpus, train, validation, message):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("Too short.")
    files = {"TRAIN": corpus[0], "VAL": corpus[1], "EMPTY": str(tmp_path / "empty.txt"),
             "SHORT": str(tmp_path / "short.txt")}  # fmt: skip
    args = ["--model", MICRO, "--out-dir", str(tmp_path / "out"), "--train-files", files.get(train, train)]
    if validation:
        args += ["--validation-files", files[validation]]
    with pytest.raises(ValueError, match=message):
        pretrain.main(args)
    assert not (tmp_path / "out" / "run_config.json").exists()
    assert not (tmp_path / ".cache").exists()  # the tokenizer trained to find the text short is not kept


def test_existing_runs_are_never_overwritten_by_mistake(tmp_path, corpus):
    run(tmp_path, corpus, "--method", "sltrain", "--max-steps", "2", "--save-every", "2")
    before = (tmp_path / "checkpoints" / "step_000002" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already holds a run"):
        run(tmp_path, corpus, "--method", "sltrain", "--max-steps", "2")
    with pytest.raises(ValueError, match="different config or method.*method: saved 'sltrain' vs now 'full'"):
        run(tmp_path, corpus, "--method", "full", "--max-steps", "2", "--resume")
    with pytest.raises(ValueError, match="different config or method.*lr"):
        run(tmp_path, corpus, "--method", "sltrain", "--max-steps", "2", "--resume", "--lr", "0.1")
    with pytest.raises(ValueError, match="works with AdamW-trained methods"):  # bad input, even with --overwrite
        run(tmp_path, corpus, "--method", "galore", "--max-steps", "2", "--per-layer-updates", "--overwrite")
    with pytest.raises(ValueError, match=r"is complete \(2 steps\); nothing to resume\.$"):
        run(tmp_path, corpus, "--method", "sltrain", "--max-steps", "2", "--save-every", "2", "--resume")
    with pytest.raises(ValueError, match=r"nothing to resume \(for a dense `merged/` model, load `final/` with PEFT"):
        run(tmp_path, corpus, "--method", "sltrain", "--max-steps", "2", "--save-every", "2", "--resume", "--merge")
    assert (tmp_path / "checkpoints" / "step_000002" / "model.safetensors").read_bytes() == before
    shutil.rmtree(tmp_path / "final")  # as if the process died while exporting: resuming exports it again
    (tmp_path / "summary.json").unlink()
    run(tmp_path, corpus, "--method", "sltrain", "--max-steps", "2", "--save-every", "2", "--resume")
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file() and (tmp_path / "summary.json").is_file()
    with pytest.raises(ValueError, match="holds no run to resume"):
        run(tmp_path / "fresh", corpus, "--method", "sltrain", "--resume")


def test_overwrite_starts_afresh_and_resume_needs_a_checkpoint(tmp_path, corpus):
    """`--overwrite` deletes the earlier run: none of its checkpoints, log rows or export is mixed into the new one.
    `--resume` of a run that saved no checkpoint (killed while exporting) is refused, not started over in place."""
    run(tmp_path, corpus, "--method", "sltrain", "--save-every", "3")
    run(tmp_path, corpus, "--method", "full", "--max-steps", "2", "--save-every", "2", "--overwrite")
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000002"]
    assert [r["step"] for r in log_rows(tmp_path)] == [1, 2]
    assert not (tmp_path / "final" / "adapter_config.json").exists()  # full-rank: a plain model, no adapter
    assert json.loads((tmp_path / "run_config.json").read_text())["method"] == "full"
    run(tmp_path / "unsaved", corpus, "--method", "sltrain", "--max-steps", "2")  # no --save-every
    shutil.rmtree(tmp_path / "unsaved" / "final")
    (tmp_path / "unsaved" / "summary.json").unlink()
    with pytest.raises(ValueError, match="`--resume`: .*unsaved has no complete checkpoint yet"):
        run(tmp_path / "unsaved", corpus, "--method", "sltrain", "--max-steps", "2", "--resume")
    assert [r["step"] for r in log_rows(tmp_path / "unsaved")] == [1, 2]


def test_overwrite_never_deletes_what_no_run_wrote(tmp_path, corpus):
    """A directory with a run's names in it (`checkpoints/`, `tokenizer/`) but no run_config.json holds no run of
    this script: refused, even with `--overwrite`, and nothing in it deleted."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "important.txt").write_text("keep")
    (tmp_path / "tokenizer").mkdir()
    for flags in ([], ["--overwrite"]):
        with pytest.raises(ValueError, match=r"holds checkpoints, tokenizer but no run_config.json, so no pretrain"):
            run(tmp_path, corpus, "--method", "full", "--max-steps", "2", *flags)
    assert (tmp_path / "checkpoints" / "important.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "tokenizer"]


def test_a_damaged_checkpoint_is_named_and_the_one_before_resumes(tmp_path, corpus, monkeypatch):
    """A checkpoint with a truncated file (a damaged disk or a partial copy: saves are atomic) stops a resume with one
    line naming it and the file, and which checkpoint to go back to; deleting it resumes from that one."""
    flags = ("--method", "sltrain", "--max-steps", "6", "--save-every", "2")
    run(tmp_path, corpus, *flags)
    shutil.rmtree(tmp_path / "final")  # as if killed after step 5
    shutil.rmtree(tmp_path / "checkpoints" / "step_000006")
    (tmp_path / "summary.json").unlink()
    weights = tmp_path / "checkpoints" / "step_000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"step_000004 is damaged: model.safetensors cannot be read \(Safetensor.*; "
                       r"delete it to resume from step_000002\.$"):  # fmt: skip
        run(tmp_path, corpus, *flags, "--resume")
    shutil.rmtree(weights.parent)
    run(tmp_path, corpus, *flags, "--resume")
    assert [r["step"] for r in log_rows(tmp_path) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    (tmp_path / "checkpoints" / "step_000002" / "state.json").write_text('{"__dict__": [')
    with pytest.raises(ValueError, match=r"step_000002 is damaged: state.json .*; no earlier checkpoint is left\.$"):
        checkpointing.load_checkpoint(tmp_path / "checkpoints" / "step_000002")

    for error in (PermissionError(13, "Permission denied"), FileNotFoundError(2, "No such file")):  # (safetensors:
        monkeypatch.setattr(checkpointing, "load_file", lambda path, e=error: (_ for _ in ()).throw(e))  # the latter)
        with pytest.raises(ValueError, match=r"step_000004: model.safetensors cannot be read \(\w+Error: .*\)\.$"):
            checkpointing.load_checkpoint(tmp_path / "checkpoints" / "step_000004")  # no advice to delete it


def test_resumed_export_keeps_the_runs_timing(tmp_path, corpus):
    first = run(tmp_path, corpus, "--method", "sltrain", "--max-steps", "2", "--save-every", "2")
    shutil.rmtree(tmp_path / "final")  # the export to redo: resuming trains no step
    again = run(tmp_path, corpus, "--method", "sltrain", "--max-steps", "2", "--save-every", "2", "--resume")
    assert first["train_seconds"] > 0 and first["tokens_per_s"] == first["tokens"] / first["train_seconds"]
    assert (again["train_seconds"], again["tokens_per_s"]) == (first["train_seconds"], first["tokens_per_s"])
    assert json.loads((tmp_path / "summary.json").read_text()) == again


def test_killed_export_leaves_the_run_resumable(tmp_path, corpus, monkeypatch):
    from peft import PeftModel

    def killed(self, directory, **kwargs):  # dies while writing final/
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "adapter_config.json").write_text("{")
        (Path(directory) / "model.safetensors").write_bytes(b"partial")  # no adapter writes this name
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(PeftModel, "save_pretrained", killed)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path, corpus, "--method", "sltrain", "--max-steps", "2", "--save-every", "2")
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "final").exists()  # not complete
    run(tmp_path, corpus, "--method", "sltrain", "--max-steps", "2", "--save-every", "2", "--resume")
    assert json.loads((tmp_path / "final" / "adapter_config.json").read_text())["peft_type"] == "SLTRAIN"
    assert "Finished by this command, resuming from a checkpoint" in (tmp_path / "final" / "README.md").read_text()
    assert (tmp_path / "summary.json").is_file() and not list(tmp_path.glob(".*.tmp"))
    assert not (tmp_path / "final" / "model.safetensors").exists()  # the killed export's leftovers are not kept


def test_save_removes_temporaries_of_killed_saves(tmp_path):
    root = tmp_path / "checkpoints"
    dead = subprocess.Popen(["true"])
    dead.wait()
    # a dead process's and this process's own are leftovers; a live one's (the parent's, here) is another save's
    for pid in (dead.pid, os.getpid(), os.getppid()):
        (root / f".step_000003.tmp-{pid}").mkdir(parents=True)
        (root / f".step_000003.tmp-{pid}" / "model.safetensors").write_bytes(b"partial")
    checkpointing.save_checkpoint(root / "step_000006", {"w": torch.ones(2)}, {"step": 6})
    assert sorted(p.name for p in root.iterdir()) == [f".step_000003.tmp-{os.getppid()}", "step_000006"]


@pytest.mark.parametrize("method", ["sltrain", "lora", "lowrank"])
def test_fsdp_export_equals_single_process_export(tmp_path, method):
    """Under FSDP the main process exports a CPU copy loaded from the gathered state dict. FSDP cannot run on CPUs
    (Accelerate makes CPU processes DDP), so this checks that branch: the copy writes what the trained model does."""
    config, hyper = micro_config(), Hyper(rank=4, sparsity=0.05, alpha=1)
    trained = METHODS[method].build(config, hyper)
    perturb_trainable(trained)
    full_state = {key: value.clone() for key, value in trained.state_dict().items()}
    tokenizer = types.SimpleNamespace(save=lambda directory: (directory / "tokenizer.json").write_text("{}"))
    pretrain.export(METHODS[method], trained, tmp_path / "single", False, tokenizer, "card")
    torch.manual_seed(1)  # another init: every tensor must come from the state dict
    pretrain.export(METHODS[method], pretrain.whole_model(METHODS[method], config, hyper, full_state),
                    tmp_path / "fsdp", False, tokenizer, "card")  # fmt: skip
    single, fsdp = tmp_path / "single" / "final", tmp_path / "fsdp" / "final"
    assert sorted(p.name for p in fsdp.iterdir()) == sorted(p.name for p in single.iterdir())
    for path in single.glob("*.safetensors"):
        a, b = load_file(path), load_file(fsdp / path.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("adapter_config.json", "config.json") if METHODS[method].saves_adapter else ("config.json",):
        assert json.loads((fsdp / name).read_text()) == json.loads((single / name).read_text())


def test_a_presets_micro_batch_is_lowered_to_fit_the_processes():
    """The README's `torchrun --nproc_per_node 2 ... --model tiny`: the preset's micro-batch 32 on each of 2
    processes is more than its global batch 32, so 16 is used; a micro-batch passed on the command line is kept."""
    args = pretrain.resolve(pretrain.parse_args(["--model", "tiny", "--out-dir", "unused"]))
    grad_accum, note = pretrain.fit_micro_batch(args, world=2)
    assert (grad_accum, args.micro_batch) == (1, 16) and note.startswith("--micro-batch 16: the preset's 32 x 2")
    args = pretrain.resolve(pretrain.parse_args(["--model", "tiny", "--out-dir", "unused"]))
    assert pretrain.fit_micro_batch(args, world=1) == (1, None) and args.micro_batch == 32
    args = pretrain.resolve(pretrain.parse_args(["--model", "tiny", "--out-dir", "unused", "--micro-batch", "32"]))
    with pytest.raises(ValueError, match="multiple of --micro-batch x processes = 64"):
        pretrain.fit_micro_batch(args, world=2)


def test_meta_build_keeps_no_dense_projection_weights():
    from transformers import LlamaConfig

    preset = json.loads(Path(MICRO).read_text())
    model = METHODS["sltrain"].build(LlamaConfig(**preset["model"]), Hyper(rank=4, sparsity=0.05, alpha=1))
    layers = [m for m in model.modules() if isinstance(m, peft_sltrain.SLTrainLayer)]
    assert len(layers) == 14 and all(m.get_base_layer().weight is None for m in layers)
    assert all(p.device.type == "cpu" for p in model.parameters())


# ---------------------------------------------------------------------------------------------- method wiring
def micro_config():
    from transformers import LlamaConfig

    return LlamaConfig(**json.loads(Path(MICRO).read_text())["model"])


def projection_shapes(config) -> list[tuple[int, int]]:
    """(d_in, d_out) of the 7 projections of every layer."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.hidden_size // config.num_attention_heads * config.num_key_value_heads
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)] * config.num_hidden_layers


@pytest.mark.parametrize("method", sorted(METHODS))
def test_parameter_counts_per_method(method):
    config, hyper = micro_config(), Hyper(rank=4, sparsity=0.05, alpha=1, max_steps=10)
    shapes = projection_shapes(config)
    dense = sum(a * b for a, b in shapes)
    other = 2 * config.vocab_size * config.hidden_size + (2 * config.num_hidden_layers + 1) * config.hidden_size
    factors = sum(4 * (a + b) for a, b in shapes)
    expected = {
        "full": (dense + other, dense + other),
        "galore": (dense + other, dense + other),
        "fira": (dense + other, dense + other),
        "lowrank": (factors + other, factors + other),
        "lora": (factors + other, factors + other + dense),
        "relora": (factors + other, factors + other + dense),
        "sltrain": (factors + other + sum(round(0.05 * a * b) for a, b in shapes),) * 2,
    }[method]
    counts = peft_sltrain.module_parameter_counts(METHODS[method].build(config, hyper))
    assert (counts.trainable, counts.total) == expected


def test_relora_merges_restarts_and_resets_optimizer_state():
    from peft.tuners.lora import LoraLayer

    hyper = Hyper(rank=4, alpha=4, max_steps=100, extra={"relora_every": 10, "relora_warmup": 5})
    method = METHODS["relora"]
    model = method.build(micro_config(), hyper)
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(input_ids=torch.ones(1, 4, dtype=torch.long)).logits.sum().backward()
    optimizer.step()
    method.after_step(model, optimizer, 9, hyper)  # not a restart step: nothing happens
    assert layer.lora_B["default"].weight.any() and layer.lora_A["default"].weight in optimizer.state
    expected = (layer.base_layer.weight + layer.get_delta_weight("default")).detach()
    method.after_step(model, optimizer, 10, hyper)
    torch.testing.assert_close(layer.base_layer.weight, expected)
    assert not layer.lora_B["default"].weight.any() and not layer.merged
    assert layer.lora_A["default"].weight not in optimizer.state
    assert [method.lr_multiplier(s, hyper) for s in (5, 10, 11, 14, 15)] == [1.0, 0.2, 0.4, 1.0, 1.0]
    # during the run's own warmup only it applies: restarts inside it warm up with it, not on top of it
    hyper.warmup_steps = 25
    assert [method.lr_multiplier(s, hyper) for s in (10, 11, 24, 30, 31)] == [1.0, 1.0, 1.0, 0.2, 0.4]


def test_relora_restart_draws_from_the_run_seed_not_the_global_rng():
    """A restart's new `A`s depend on the run's seed and the step only: the same whatever the global RNG's state (so on
    every process and after a resume), new at each restart and for each seed, drawn as PEFT's init (uniform within
    1 / sqrt(d_in)), with the global stream left as it was."""
    import copy

    from peft.tuners.lora import LoraLayer

    method = METHODS["relora"]
    built = method.build(micro_config(), Hyper(rank=4, alpha=4, max_steps=100, seed=7, extra={"relora_every": 10}))

    def restarted_a(global_seed: int, step: int = 10, seed: int = 7) -> list[torch.Tensor]:
        model = copy.deepcopy(built)
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        hyper = Hyper(rank=4, alpha=4, max_steps=100, seed=seed, extra={"relora_every": 10})
        method.after_step(model, torch.optim.AdamW(model.parameters()), step, hyper)
        assert torch.equal(torch.get_rng_state(), state)
        return [m.lora_A["default"].weight.detach().clone() for m in model.modules() if isinstance(m, LoraLayer)]

    first = restarted_a(0)
    assert len(first) == 14 and all(torch.equal(a, b) for a, b in zip(first, restarted_a(1)))
    before = [m.lora_A["default"].weight for m in built.modules() if isinstance(m, LoraLayer)]
    for other in (before, restarted_a(0, step=20), restarted_a(0, seed=8)):
        assert not any(torch.equal(a, b) for a, b in zip(first, other))
    for a in first:
        bound = a.shape[1] ** -0.5
        assert 0.9 * bound < a.abs().max() <= bound


def test_lowrank_is_scaled_like_sltrain():
    """The low-rank baseline computes (alpha / r) B A, SLTrain's scale (the reference's lora_alpha / r), and its
    dense export holds the scaled product."""
    from methods import LowRankLinear

    hyper = Hyper(rank=4, alpha=1)
    model = METHODS["lowrank"].build(micro_config(), hyper)
    layer = next(m for m in model.modules() if isinstance(m, LowRankLinear))
    assert layer.scaling == 0.25
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(layer(x), x @ (0.25 * layer.B @ layer.A).t())
    ids = torch.randint(0, micro_config().vocab_size, (2, 8))
    logits = model.eval()(ids).logits
    torch.testing.assert_close(METHODS["lowrank"].to_dense(model)(ids).logits, logits, rtol=0, atol=1e-5)


def test_lowrank_dense_export_keeps_the_projection_biases():
    """A preset may give LLaMA biased projections (`attention_bias`, `mlp_bias`): the dense export carries them."""
    from methods import LowRankLinear

    config = micro_config()
    config.attention_bias = config.mlp_bias = True
    model = METHODS["lowrank"].build(config, Hyper(rank=4, alpha=1))
    perturb_trainable(model)  # biases start at 0
    assert sum(isinstance(m, LowRankLinear) and m.bias is not None for m in model.modules()) == 14
    ids = torch.randint(0, config.vocab_size, (2, 8))
    logits = model.eval()(ids).logits
    torch.testing.assert_close(METHODS["lowrank"].to_dense(model)(ids).logits, logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["lowrank", "relora"])
def test_a_run_of_another_version_of_its_method_does_not_resume(tmp_path, corpus, method):
    """A low-rank run saved before its `B A` was scaled, or a ReLoRA run from before its restarts drew from a seeded
    generator (no method_version recorded: 1), would resume computing another model: refused."""
    extra = ["--method", method, "--save-every", "3"]
    extra += ["--method-arg", "relora_every=2"] if method == "relora" else []
    run(tmp_path, corpus, *extra)
    shutil.rmtree(tmp_path / "checkpoints" / "step_000006")
    (tmp_path / "summary.json").unlink()
    config = json.loads((tmp_path / "run_config.json").read_text())
    assert config.pop("method_version") == 2
    (tmp_path / "run_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"different config or method \(method_version: saved 1 vs now 2\)"):
        run(tmp_path, corpus, *extra, "--resume")


def test_settings_a_method_does_not_read_are_not_recorded(tmp_path, corpus):
    """The preset's SLTrain settings fill only what a method reads: a full-rank run records no rank, sparsity or
    alpha, a low-rank run no sparsity."""
    run(tmp_path / "full", corpus, "--method", "full", "--max-steps", "2")
    run(tmp_path / "lowrank", corpus, "--method", "lowrank", "--max-steps", "2")
    full = json.loads((tmp_path / "full" / "run_config.json").read_text())
    lowrank = json.loads((tmp_path / "lowrank" / "run_config.json").read_text())
    assert (full["rank"], full["sparsity"], full["alpha"]) == (None, None, None)
    assert lowrank["sparsity"] is None and (lowrank["rank"], lowrank["alpha"]) == (4, 1.0)


def test_galore_names_the_presets_optimizer(tmp_path, corpus):
    preset = json.loads(Path(MICRO).read_text())
    preset["train"]["optimizer"] = "adam8bit"  # as the 7b preset
    (tmp_path / "p.json").write_text(json.dumps(preset))
    with pytest.raises(ValueError, match="stay adamw .the preset '.*p.json' sets adam8bit: pass --optimizer adamw"):
        run(tmp_path / "out", corpus, "--model", str(tmp_path / "p.json"), "--method", "galore")


@pytest.mark.parametrize("method", ["galore", "fira"])
def test_methods_whose_state_needs_pickle_refuse_checkpoints(tmp_path, corpus, method):
    with pytest.raises(ValueError, match="cannot be saved without pickle"):
        run(tmp_path, corpus, "--method", method, "--save-every", "3")


def test_activation_checkpointing_gives_the_same_losses(tmp_path, corpus):
    run(tmp_path / "plain", corpus, "--method", "sltrain", "--max-steps", "3")
    run(tmp_path / "ckpt", corpus, "--method", "sltrain", "--max-steps", "3", "--activation-checkpointing")
    plain, ckpt = log_rows(tmp_path / "plain"), log_rows(tmp_path / "ckpt")
    assert [r["loss"] for r in ckpt] == pytest.approx([r["loss"] for r in plain], rel=1e-5)


@needs_cxx
def test_compile_gives_the_same_losses(tmp_path, corpus):
    run(tmp_path / "eager", corpus, "--method", "sltrain", "--max-steps", "3")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    summary = run(tmp_path / "compiled", corpus, "--method", "sltrain", "--max-steps", "3", "--compile")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    # the first step, which compiles, is timed apart: tokens/s are those of the other two
    assert summary["compile_step_seconds"] > 0 and summary["tokens_per_s"] * summary["train_seconds"] == (
        pytest.approx(2 / 3 * summary["tokens"])
    )
    eager, compiled = log_rows(tmp_path / "eager"), log_rows(tmp_path / "compiled")
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-4)
    ppl = [json.loads((tmp_path / d / "summary.json").read_text())["val_ppl"] for d in ("eager", "compiled")]
    assert ppl[1] == pytest.approx(ppl[0], rel=1e-4)
    one = run(tmp_path / "one", corpus, "--method", "sltrain", "--max-steps", "1", "--warmup-steps", "0", "--compile")
    assert one["tokens_per_s"] is None and "no timed step" in one["timing_note"]  # its only step compiled


def test_bf16_autocast_trains(tmp_path, corpus):
    """In its own process: Accelerate's state is a process-wide singleton, fixed at the first run's precision."""
    args = ["--model", MICRO, "--method", "sltrain", "--out-dir", str(tmp_path), "--train-files", corpus[0],
            "--validation-files", corpus[1], "--vocab-size", "300", "--eval-blocks", "8", "--dtype", "bf16",
            "--max-steps", "3"]  # fmt: skip
    subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain.py"), *args], check=True, capture_output=True)
    losses = [r["loss"] for r in log_rows(tmp_path)]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses))) and summary["val_ppl"] < 400


@pytest.mark.parametrize("method, scale_key", [("galore", "scale"), ("fira", "alpha")])
def test_galore_and_fira_take_their_method_args(method, scale_key):
    """`--method-arg update_proj_gap=7 --method-arg scale=0.5` reach every projector the optimizer builds (Fira calls
    the scale alpha), with the rank of `--rank`."""
    argv = ["--model", MICRO, "--out-dir", "x", "--method", method, "--rank", "3"]
    args = pretrain.resolve(
        pretrain.parse_args([*argv, "--method-arg", "update_proj_gap=7", "--method-arg", "scale=0.5"])
    )
    hyper = pretrain.hyper_from_args(args)
    model = METHODS[method].build(micro_config(), hyper)
    optimizer = METHODS[method].make_optimizer(model, hyper)
    ids = torch.ones(2, 8, dtype=torch.long)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    projectors = [state["projector"] for state in optimizer.state.values() if "projector" in state]
    assert len(projectors) == 14  # the 7 projections of each of 2 layers
    assert {(p.rank, p.update_proj_gap, getattr(p, scale_key)) for p in projectors} == {(3, 7, 0.5)}


@pytest.mark.parametrize("method", ["lora", "relora"])
def test_lora_baselines_train_without_dropout(method):
    """LoRA dropout 0 (README; ReLoRA's code has 0.1): in training mode, two forwards of a perturbed adapter agree."""
    model = METHODS[method].build(micro_config(), Hyper(rank=4, alpha=1, max_steps=10)).train()
    perturb_trainable(model)  # B = 0 would hide a dropout on the adapter's input
    ids = torch.randint(0, micro_config().vocab_size, (2, 8))
    torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_optimizer_state_bytes_count_galore_projectors():
    model = METHODS["galore"].build(micro_config(), Hyper(rank=4))
    optimizer = METHODS["galore"].make_optimizer(model, Hyper(rank=4))
    model(input_ids=torch.ones(2, 8, dtype=torch.long), labels=torch.ones(2, 8, dtype=torch.long)).loss.backward()
    optimizer.step()
    plain = sum(t.numel() * 4 for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    projectors = sum(s["projector"].ortho_matrix.numel() * 4 for s in optimizer.state.values() if "projector" in s)
    assert projectors > 0
    assert pretrain.optimizer_state_bytes(optimizer) == plain + projectors
    adam_bytes = 2 * sum(p.numel() * 4 for p in model.parameters())
    assert pretrain.optimizer_state_bytes(optimizer) < adam_bytes


def test_resume_refuses_changed_data_or_vocabulary(tmp_path, corpus):
    """run_config.json names the data files; a resumed run checks that they still hold what it was trained on."""
    train = tmp_path / "train.txt"
    train.write_text(Path(corpus[0]).read_text())
    files = (str(train), corpus[1])
    out = tmp_path / "run"
    run(out, files, "--method", "sltrain", "--save-every", "3")
    digest = json.loads((out / "run_config.json").read_text())["data_sha256"]
    assert sorted(digest) == ["train", "validation", "vocabulary"]
    # the same files named another way (relative to another directory): compared by their text, not the paths
    same = (str(tmp_path / "." / "train.txt"), str(Path(corpus[1]).parent / ".." / Path(corpus[1]).parent.name /
                                                    Path(corpus[1]).name))  # fmt: skip
    with pytest.raises(ValueError, match=r"the run in .* is complete"):  # (checked after the config: it matched)
        run(out, same, "--method", "sltrain", "--save-every", "3", "--resume")
    shutil.rmtree(out / "checkpoints" / "step_000006")  # killed after step 3
    shutil.rmtree(out / "final")
    (out / "summary.json").unlink()
    train.write_text(Path(corpus[0]).read_text()[::-1])  # the same path, other text
    cached = sorted((tmp_path / ".cache").iterdir())
    changed = r"\(train: saved \w+ vs now \w+, vocabulary: saved \w+ vs now \w+\)"
    with pytest.raises(
        ValueError, match=r"`--resume`: the data or tokenizer of .* changed since it was trained " + changed
    ):
        run(out, files, "--method", "sltrain", "--save-every", "3", "--resume")
    assert sorted((tmp_path / ".cache").iterdir()) == cached  # the tokenizer of the other text is not kept


@pytest.mark.parametrize("tokenizer", ["train", "directory"])
def test_a_run_from_before_the_vocabulary_default_changed_resumes_with_its_own_command(
    tmp_path, corpus, capsys, tokenizer
):  # fmt: skip
    """Runs made while --vocab-size defaulted to 4096 recorded that size: a trained tokenizer's run (here 400, where
    the preset now gives 300) resumes at its own size, saying so; a hub tokenizer's run, which recorded the unused
    flag, resumes as it is (the vocabulary itself is compared with the data either way)."""
    extra = ["--method", "sltrain", "--save-every", "3"]
    if tokenizer == "directory":
        data.train_tokenizer(Path(corpus[0]).read_text(), 300).save(tmp_path / "tokenizer")
        extra += ["--tokenizer", str(tmp_path / "tokenizer")]
    full = tmp_path / "full"
    run(full, corpus, *extra, *(["--vocab-size", "400"] if tokenizer == "train" else []))
    killed = killed_after(full, tmp_path / "killed", 3)
    if tokenizer == "directory":  # as the old code recorded it
        config = json.loads((killed / "run_config.json").read_text())
        (killed / "run_config.json").write_text(json.dumps({**config, "vocab_size": 4096}))
    capsys.readouterr()
    run(killed, corpus, *extra, "--resume")
    said = "pretrain.py: --resume: --vocab-size 400, the run's own"
    assert (said in capsys.readouterr().out) == (tokenizer == "train")
    assert log_rows(killed) == log_rows(full)


def test_an_old_run_under_a_preset_too_small_for_bpe_resumes_with_its_own_command(tmp_path, corpus):
    """A preset whose vocab_size a trained BPE cannot have is refused for a new run, but a run made with it under the
    old default (400 stands in for 4096) resumes: the run's own size is taken first (review W)."""
    preset = json.loads(Path(MICRO).read_text())
    preset["model"]["vocab_size"] = 64
    (tmp_path / "preset.json").write_text(json.dumps(preset))
    extra = ["--model", str(tmp_path / "preset.json"), "--method", "sltrain", "--save-every", "3"]
    full = tmp_path / "full"
    run(full, corpus, *extra, "--vocab-size", "400")
    killed = killed_after(full, tmp_path / "killed", 3)
    run(killed, corpus, *extra, "--resume")
    assert log_rows(killed) == log_rows(full)


def test_resume_with_another_given_vocab_size_is_refused(tmp_path, corpus):
    """A run's own size is taken only where --vocab-size is not given (review W): a given other size is refused."""
    full = tmp_path / "full"
    run(full, corpus, "--method", "sltrain", "--save-every", "3", "--vocab-size", "400")
    killed = killed_after(full, tmp_path / "killed", 3)
    with pytest.raises(ValueError, match=r"vocab_size: saved 400 vs now 500"):
        run(killed, corpus, "--method", "sltrain", "--save-every", "3", "--vocab-size", "500", "--resume")


def test_a_finished_run_is_complete_whatever_its_newest_checkpoint(tmp_path, corpus):
    """A run resumed without --save-every finishes with an older newest checkpoint; its summary still marks it done."""
    run(tmp_path, corpus, "--method", "sltrain", "--save-every", "3")
    shutil.rmtree(tmp_path / "checkpoints" / "step_000006")
    with pytest.raises(ValueError, match=r"the run in .* is complete \(6 steps\); nothing to resume"):
        run(tmp_path, corpus, "--method", "sltrain", "--save-every", "3", "--resume")


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--method", "relora"], "`--method relora` needs each weight whole on every process, and FSDP shards them"),
        (["--method", "galore"], "`--method galore` needs each weight whole"),
        (["--method", "sltrain", "--save-every", "2"], "Under FSDP the optimizer state is sharded"),
    ],
)
def test_fsdp_refuses_what_needs_whole_weights(tmp_path, corpus, monkeypatch, extra, message):
    """FSDP needs GPUs (accelerate runs CPU processes as DDP): its checks are reached with an Accelerator that says
    FSDP. ReLoRA's merges and GaLore/Fira's projections crashed mid-run on sharded weights."""
    from accelerate import Accelerator, DistributedType

    class FSDPAccelerator(Accelerator):
        distributed_type = DistributedType.FSDP

    monkeypatch.setattr(pretrain, "Accelerator", FSDPAccelerator)
    with pytest.raises(ValueError, match=message):
        run(tmp_path / "out", corpus, *extra)
    assert not (tmp_path / "out").exists()


def test_training_state_bytes_under_fsdp_sum_the_shards():
    class Shards:  # two processes holding equal shards
        device = torch.device("cpu")

        def reduce(self, tensor, reduction):
            return tensor * 2

    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    one = pretrain.training_state_bytes(model, optimizer)
    assert one["param_bytes"] == one["grad_bytes"] == 15 * 4 and one["optimizer_state_bytes"] == 2 * 15 * 4 + 2 * 4
    summed = pretrain.training_state_bytes(model, optimizer, Shards())
    assert summed == {key: 2 * value for key, value in one.items()}


def test_evaluate_runs_as_many_forwards_on_every_process():
    """Every process runs the same forwards (under FSDP each gathers weights with all processes, so uneven counts
    hang): a shorter shard is padded with ignored rows, which add nothing. 3 blocks over 2 processes, micro-batch 2:
    process 0 scores blocks 0 and 2, process 1 block 1 and a padding row; with 1 block, process 1 has only padding."""

    class Model(torch.nn.Module):  # the mean loss over the tokens not ignored: each token's loss is its block's id
        def __init__(self):
            super().__init__()
            self.labels = []

        def forward(self, input_ids, labels):
            self.labels.append(labels)
            kept = labels[:, 1:] != -100
            per_token = input_ids[:, 1:].double()
            return types.SimpleNamespace(loss=(per_token * kept).sum() / kept.sum())  # NaN when all ignored

    blocks = torch.arange(3).repeat_interleave(5).view(3, 5).int()  # block b is all b
    for rank, expected_sent, expected_rows in ((0, [0 * 4 + 2 * 4, 8], [[0, 2]]), (1, [1 * 4, 4], [[1, -100]])):
        accelerator, model = FakeAccelerator(rank, 2), Model()
        pretrain.evaluate(model, blocks, micro_batch=2, accelerator=accelerator)
        assert accelerator.sent == expected_sent
        assert [label[:, 0].tolist() for label in model.labels] == expected_rows
    accelerator, model = FakeAccelerator(1, 2, (6.0, 4.0)), Model()  # process 0 contributes 6.0 over 4 tokens
    ppl = pretrain.evaluate(model, blocks[:1], micro_batch=2, accelerator=accelerator)
    assert ppl == pytest.approx(math.exp(1.5)) and accelerator.sent == [0.0, 0.0]
    assert len(model.labels) == 1 and (model.labels[0] == -100).all()  # one forward, all of it ignored


def test_numba_compiles_before_the_timed_steps(tmp_path, corpus, monkeypatch):
    """numba's first call compiles for about 10 s: warmed up before the loop, outside train_seconds and tokens/s."""
    warmed = []
    monkeypatch.setattr(peft_sltrain.cpu_kernels, "warm_up", lambda dtypes: warmed.append(list(dtypes)) or dtypes)
    sltrain = run(tmp_path / "sltrain", corpus, "--method", "sltrain", "--max-steps", "2", "--warmup-steps", "1")
    full = run(tmp_path / "full", corpus, "--method", "full", "--max-steps", "2", "--warmup-steps", "1")
    assert warmed == [[torch.float32]]  # SLTrain only; bf16 autocast would warm the bf16 kernels
    assert sltrain["kernel_compile_seconds"] >= 0 and full["kernel_compile_seconds"] is None


# ------------------------------------------------------------------------------- from review AC (mutation testing)
def test_resume_refuses_each_changed_optimisation_setting(tmp_path, corpus):
    """Kills P27 (min_lr_ratio), P28 (grad_clip), P29 (global_batch) dropped from `trajectory_config`: each changes
    the loss curve of a resumed run, and only `seed`, `lr`, `eval_blocks` had a resume test."""
    extra = ["--method", "sltrain", "--save-every", "3"]
    run(tmp_path / "full", corpus, *extra)
    killed = killed_after(tmp_path / "full", tmp_path / "killed", 3)
    for flag, value, key in [
        ("--min-lr-ratio", "0.5", "min_lr_ratio"),
        ("--grad-clip", "1.0", "grad_clip"),
        ("--global-batch", "16", "global_batch"),
        ("--weight-decay", "0.1", "weight_decay"),
        ("--warmup-steps", "2", "warmup_steps"),
    ]:
        with pytest.raises(ValueError, match=rf"different config or method \({key}: saved "):
            run(killed, corpus, *extra, "--resume", flag, value)


def test_a_validation_loss_past_a_floats_range_is_a_divergence_not_a_crash():
    """Kills P42 (`mean >= 709` raised to 800): exp(750) overflows, and math.exp raises OverflowError, which `cli`
    does not turn into the DIVERGED exit status."""

    class Model(torch.nn.Module):
        def forward(self, **batch):
            return types.SimpleNamespace(loss=torch.tensor(750.0))

    with pytest.raises(FloatingPointError, match="Validation loss became 750.0 nats per token"):
        pretrain.evaluate(Model(), torch.zeros(2, 5, dtype=torch.int32), 2, FakeAccelerator())


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--lr", "0"], r"`--lr` must be positive, got 0.0"),  # P47: would train nothing, silently
        (["--micro-batch", "0"], r"`--micro-batch` must be positive, got 0"),  # P48: ZeroDivisionError otherwise
        (["--max-steps", "0"], r"`--max-steps` must be positive, got 0"),
        (["--seq-len", "0"], r"`--seq-len` must be positive, got 0"),
        (["--grad-clip", "-1"], r"`--grad-clip` must be 0 or more, got -1.0"),  # P51: clipping silently off
    ],
)
def test_more_bad_input_fails_before_training(tmp_path, corpus, extra, message):
    """The checks of `resolve` that the bad-input list does not reach (pasted, these rows can join its list)."""
    with pytest.raises(ValueError, match=message):
        run(tmp_path / "out", corpus, *extra)
    assert not any(tmp_path.iterdir())


def test_a_min_lr_ratio_of_one_is_a_constant_rate_after_warmup():
    """Kills P52 (`0 <= min_lr_ratio < 1`): the documented range is [0, 1], and 1 is a constant schedule."""
    args = pretrain.resolve(pretrain.parse_args(["--model", MICRO, "--out-dir", "x", "--min-lr-ratio", "1"]))
    factor = pretrain.lr_lambda(args, METHODS["sltrain"], pretrain.hyper_from_args(args))
    assert [factor(s) for s in range(1, 7)] == pytest.approx([1.0] * 6)


def test_validation_files_alone_are_refused_not_replaced_by_the_embedded_corpus(tmp_path, corpus):
    """Kills D13 (`if not train_files:` picks the embedded corpus): `--validation-files` without `--train-files`
    would train and validate on the embedded corpus, ignoring the file given."""
    with pytest.raises(ValueError, match="Give both `--train-files` and `--validation-files`"):
        data.local_corpus(None, [corpus[1]])


def test_to_blocks_drops_only_the_ragged_tail():
    """Kills D02 (one block fewer): every whole block of the text is used."""
    assert data.to_blocks(torch.arange(10), 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert data.to_blocks(torch.arange(9), 3).shape == (3, 3)


def test_a_corpus_of_exactly_one_global_batch_trains():
    """Kills D05 (`len(blocks) <= global_batch` refused): the message says "fewer than one global batch"."""
    sampler = data.BlockSampler(torch.arange(8).view(8, 1), micro_batch=2, grad_accum=2, world_size=2, seed=0)
    rows = [torch.cat(sampler.micro_batches(0, rank)).flatten().tolist() for rank in (0, 1)]
    assert sorted(rows[0] + rows[1]) == list(range(8))


@pytest.mark.parametrize("method, scale_key", [("galore", "scale"), ("fira", "alpha")])
def test_galore_and_fira_defaults_are_the_papers(method, scale_key):
    """Kills M17 (update_proj_gap default 200 -> 100) and M18 (scale default 0.25 -> 1.0): without --method-arg the
    projectors get GaLore's defaults; and kills M19: every trainable parameter (norms and embeddings included) is in
    exactly one parameter group."""
    hyper = Hyper(rank=4, max_steps=10)
    model = METHODS[method].build(micro_config(), hyper)
    optimizer = METHODS[method].make_optimizer(model, hyper)
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    ids = torch.ones(2, 8, dtype=torch.long)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    projectors = [state["projector"] for state in optimizer.state.values() if "projector" in state]
    assert len(projectors) == 14
    assert {(p.rank, p.update_proj_gap, getattr(p, scale_key)) for p in projectors} == {(4, 200, 0.25)}


def test_galore_renews_its_projector_every_500_steps_at_7b_width():
    """GaLore's 7B scripts renew the projector every 500 steps (200 up to 1B); `--method-arg` still decides."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from methods import _projected_groups

    config = micro_config()
    config.hidden_size, config.num_attention_heads = 4096, 32
    with init_empty_weights():  # no memory: only the modules and the config are read
        model = AutoModelForCausalLM.from_config(config)
    assert _projected_groups(model, Hyper(rank=4), "scale")[1]["update_proj_gap"] == 500
    given = Hyper(rank=4, extra={"update_proj_gap": 7})
    assert _projected_groups(model, given, "scale")[1]["update_proj_gap"] == 7


def test_lowrank_factors_start_as_nn_linears_kaiming_uniform():
    """Kills M04 (B's bound 1/sqrt(d_out) instead of 1/sqrt(r)): both factors are drawn as `nn.Linear` would draw
    an (r, d_in) and a (d_out, r) weight, the reference low-rank baseline's init."""
    from methods import LowRankLinear

    torch.manual_seed(0)
    layer = LowRankLinear(in_features=64, out_features=256, rank=4, scaling=1.0, bias=False)
    bound_a, bound_b = 1 / math.sqrt(64), 1 / math.sqrt(4)
    assert layer.A.abs().max() <= bound_a and layer.A.abs().max() > 0.9 * bound_a
    assert layer.B.abs().max() <= bound_b and layer.B.abs().max() > 0.9 * bound_b


def test_relora_restarts_right_after_every_relora_every_steps(tmp_path, corpus):
    """Kills P17 (`after_step` given `step` rather than the steps done, `step + 1`): each restart must come right
    after steps relora_every, 2 relora_every, ... (the jagged warmup assumes it), so a checkpoint saved at a restart
    step holds B = 0 (just merged and restarted) and A re-drawn; one step late, B holds that step's training."""
    run(tmp_path, corpus, "--method", "relora", "--method-arg", "relora_every=2", "--save-every", "2")
    for step in (2, 4):  # not 6: no restart at the end
        state = load_file(tmp_path / "checkpoints" / f"step_{step:06d}" / "model.safetensors")
        b = [v for k, v in state.items() if "lora_B" in k]
        assert len(b) == 14 and not any(v.any() for v in b), step
    final = load_file(tmp_path / "checkpoints" / "step_000006" / "model.safetensors")
    assert all(v.any() for k, v in final.items() if "lora_B" in k)


def test_gradients_are_synchronised_at_the_last_micro_batch_only(tmp_path, corpus, monkeypatch):
    """Kills P10 (`sync = i == 0`): under DDP the gradient all-reduce must run in the backward of the last
    micro-batch, every earlier one under `no_sync`; synced at the first, the later micro-batches' gradients stay
    per process and the replicas drift apart. The DDP test cannot see it: its 2 x 4 of 8 has no accumulation."""
    from accelerate import Accelerator

    events = []
    no_sync, backward = Accelerator.no_sync, Accelerator.backward
    monkeypatch.setattr(Accelerator, "no_sync", lambda self, model: events.append("no_sync") or no_sync(self, model))
    monkeypatch.setattr(
        Accelerator, "backward", lambda self, loss, **kw: events.append("backward") or backward(self, loss, **kw)
    )
    run(tmp_path, corpus, "--method", "sltrain", "--max-steps", "2", "--global-batch", "12", "--micro-batch", "4")
    assert events == ["no_sync", "backward", "no_sync", "backward", "backward"] * 2  # 3 micro-batches a step


def test_the_run_says_what_it_does_before_the_first_step(tmp_path, corpus, capsys):
    """The seconds before the progress bar (data, tokenizer, numba's kernels) are announced, and an --eval-blocks
    beyond the validation text says that all of it is scored."""
    run(tmp_path, corpus, "--method", "sltrain", "--max-steps", "2", "--warmup-steps", "0", "--eval-blocks", "100000")
    out = capsys.readouterr().out
    assert "pretrain.py: reading the data and training its tokenizer (cached by content), tokenising it" in out
    assert re.search(r"the validation text has \d+ sequences of 32 tokens, fewer than --eval-blocks 100,000: all", out)


def test_keep_last_deletes_older_checkpoints_only_after_a_newer_one_is_saved(tmp_path, corpus):
    """`--keep-last 2`: the two newest checkpoints stay (the resume point among them); a resume keeps pruning."""
    flags = ("--method", "full", "--max-steps", "6", "--save-every", "1", "--keep-last", "2")
    run(tmp_path, corpus, *flags)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000005", "step_000006"]
    killed = killed_after(tmp_path, tmp_path / "killed", 5)  # its step_000005 only
    run(killed, corpus, *flags, "--resume")
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step_000005", "step_000006"]
    with pytest.raises(ValueError, match="`--keep-last` must be 0 or more, got -1"):
        run(tmp_path / "bad", corpus, "--keep-last", "-1")
    with pytest.raises(ValueError, match="`--keep-last 2` keeps checkpoints; without `--save-every` none is saved"):
        run(tmp_path / "bad", corpus, "--keep-last", "2")
    assert not list(killed.glob("checkpoints/.*"))  # deleted through temporaries, none left


def test_a_resumed_runs_checkpoints_keep_the_whole_training_time(tmp_path, corpus):
    """Kills P81 (a checkpoint's train_seconds = this command's time only): a run resumed twice would report the
    time of its last command alone, and tokens/s for all its tokens over it."""
    extra = ["--method", "sltrain", "--save-every", "3"]
    run(tmp_path / "full", corpus, *extra)
    killed = killed_after(tmp_path / "full", tmp_path / "killed", 3)
    earlier = checkpointing.load_checkpoint(killed / "checkpoints" / "step_000003")[1]["train_seconds"]
    summary = run(killed, corpus, *extra, "--resume")
    state = checkpointing.load_checkpoint(killed / "checkpoints" / "step_000006")[1]
    assert 0 < earlier < state["train_seconds"] == pytest.approx(summary["train_seconds"])


def test_a_local_tokenizer_is_recorded_by_where_it_is(tmp_path, corpus, monkeypatch):
    """A local tokenizer is recorded resolved, so that the same directory named another way resumes; a copy elsewhere
    (whose merges or normaliser the vocabulary digest would not see) does not."""
    data.train_tokenizer(Path(corpus[0]).read_text(), 300).save(tmp_path / "tokenizer")
    shutil.copytree(tmp_path / "tokenizer", tmp_path / "copy")
    monkeypatch.chdir(tmp_path)
    extra = ["--method", "sltrain", "--save-every", "3"]
    run(tmp_path / "full", corpus, *extra, "--tokenizer", "tokenizer")
    assert json.loads((tmp_path / "full" / "run_config.json").read_text())["tokenizer"] == str(tmp_path / "tokenizer")
    killed = killed_after(tmp_path / "full", tmp_path / "killed", 3)
    with pytest.raises(
        ValueError, match=r"different config or method \(tokenizer: saved '.*tokenizer' vs now '.*copy'"
    ):
        run(killed, corpus, *extra, "--tokenizer", "copy", "--resume")
    run(killed, corpus, *extra, "--tokenizer", str(tmp_path / "full" / ".." / "tokenizer"), "--resume")
    assert [r["step"] for r in log_rows(killed) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    older = killed_after(tmp_path / "full", tmp_path / "older", 3)  # recorded as typed, before it was resolved
    config = json.loads((older / "run_config.json").read_text())
    (older / "run_config.json").write_text(json.dumps({**config, "tokenizer": "tokenizer"}))
    run(older, corpus, *extra, "--tokenizer", "tokenizer", "--resume")  # its own command resumes it


def test_a_prune_killed_mid_delete_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    """Pruning renames a checkpoint away before deleting it: a kill mid-delete leaves a temporary (which the next save
    or resume deletes), never a partial `step_N` that would count as complete."""
    for step in (1, 2, 3):
        (tmp_path / f"step_{step:06d}").mkdir()
        (tmp_path / f"step_{step:06d}" / "model.safetensors").write_text("weights")

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpointing.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.prune_checkpoints(tmp_path, 2)
    monkeypatch.undo()
    assert list(checkpointing._checkpoints(tmp_path)) == [2, 3]
    assert [p.name for p in checkpointing.remove_stale_temporaries(tmp_path)] == [f".step_000001.tmp-{os.getpid()}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002", "step_000003"]


def test_compute_batched_trains_as_the_dense_path_and_a_resume_keeps_it(tmp_path, corpus, monkeypatch):
    """`--compute batched` trains the model `--compute dense` trains (on CPU, fp32: the same losses to rounding),
    records the setting, and a resume under another setting is refused; a run recorded before the flag resumes as
    auto."""
    rebuilds = []
    rebuild = peft_sltrain.batched._BatchedRebuild.apply
    monkeypatch.setattr(peft_sltrain.batched._BatchedRebuild, "apply", lambda *a: rebuilds.append(1) or rebuild(*a))
    dense = run(tmp_path / "dense", corpus, "--compute", "dense", "--save-every", "3")
    assert not rebuilds
    batched = run(tmp_path / "batched", corpus, "--compute", "batched", "--save-every", "3")
    assert len(rebuilds) >= 6  # a rebuild per group and training pass (evaluation runs without grad: dense)
    losses = [r["loss"] for r in log_rows(tmp_path / "batched")]
    assert losses == pytest.approx([r["loss"] for r in log_rows(tmp_path / "dense")], rel=1e-5)
    assert batched["val_ppl"] == pytest.approx(dense["val_ppl"], rel=1e-5)
    config = json.loads((tmp_path / "batched" / "run_config.json").read_text())
    assert config["compute"] == "batched"
    adapter = json.loads((tmp_path / "batched" / "final" / "adapter_config.json").read_text())
    assert adapter["compute"] == "batched"
    killed = killed_after(tmp_path / "batched", tmp_path / "killed", 3)
    with pytest.raises(ValueError, match=r"different config or method \(compute: saved 'batched' vs now 'auto'\)"):
        run(killed, corpus, "--save-every", "3", "--resume")
    old = killed_after(tmp_path / "dense", tmp_path / "old", 3)
    config = json.loads((old / "run_config.json").read_text())
    config.pop("compute")
    (old / "run_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"compute: saved 'auto' vs now 'dense'"):
        run(old, corpus, "--compute", "dense", "--save-every", "3", "--resume")
