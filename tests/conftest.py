"""Tiny models built from configs in code (no hub), and a stand-in for the Hub's API, shared by the tests."""

from __future__ import annotations

import os
import shutil
import types
from pathlib import Path

# before torch loads, inherited by subprocesses: libgomp spin-waiting made tiny tests up to 100x slower on 2 busy cores
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch
import transformers

import peft_sltrain  # noqa: F401  (registers SLTrain with PEFT)

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def tiny_llama_config(**overrides) -> transformers.LlamaConfig:
    kwargs = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return transformers.LlamaConfig(**kwargs)


def tiny_roberta_config(**overrides) -> transformers.RobertaConfig:
    kwargs = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=103,
        max_position_embeddings=40,
        num_labels=3,
    )
    kwargs.update(overrides)
    return transformers.RobertaConfig(**kwargs)


# torch.compile on CPU builds C++ with the compiler inductor is configured with (`$CXX`, else g++)
needs_cxx = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="torch.compile on CPU needs a C++ compiler"
)


def tiny_llama(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def tiny_roberta(seed: int = 0, **overrides) -> transformers.RobertaForSequenceClassification:
    torch.manual_seed(seed)
    return transformers.RobertaForSequenceClassification(tiny_roberta_config(**overrides)).eval()


@torch.no_grad()
def perturb_trainable(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    """Move every trainable parameter off its init, so that zero-initialised adapters do something."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.add_(scale * torch.randn(param.shape, generator=generator).to(param.device, param.dtype))


def train_losses(model: torch.nn.Module, input_ids: torch.Tensor, steps: int, lr: float = 1e-2) -> list[float]:
    """The losses of `steps` AdamW steps of causal-LM training on one fixed batch (its trainable parameters only)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def sltrain_factors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every SLTrain factor (`sltrain_A`, `sltrain_B`, `sltrain_values`) of `model`, by name."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if ".sltrain_" in name}


def assert_factors_trained(model: torch.nn.Module, before: dict[str, torch.Tensor], input_ids: torch.Tensor) -> None:
    """Every SLTrain factor of `model` moved from `before` (`sltrain_factors` before training) by more than AdamW's
    weight decay could move it alone (at `train_losses`' lr, 0.01% of a value per step; the factors start below 0.2),
    and gets a nonzero gradient from the loss on `input_ids` now (at init, `B = 0` gives `A` none). A loss that drops
    tells neither: embeddings and head alone can fit one fixed batch."""
    assert before
    params = {name: p for name, p in model.named_parameters() if name in before}
    assert params.keys() == before.keys()
    for name, param in params.items():
        assert (param.detach() - before[name]).abs().max() > 1e-3, name
    model.zero_grad()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    for name, param in params.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    model.zero_grad()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))


class FakeHfApi:
    """Stands in for `huggingface_hub.HfApi` (`run_glue.py` and `pretrain.py` uploads): records calls instead of making
    them."""

    calls: list = []
    private = message = None  # the last `create_repo`'s and `upload_folder`'s
    existing: dict = {}  # repository id -> whether it is private, for the repositories that exist
    me: dict = {"name": "alice"}  # what `whoami` says

    def __init__(self, token=None, endpoint=None):
        self.token, self.endpoint = token, "https://fake.hub"

    def whoami(self):
        self.calls.append(("whoami", self.token))
        return self.me

    def repo_exists(self, repo_id):
        return repo_id in self.existing

    def repo_info(self, repo_id):
        return types.SimpleNamespace(private=self.existing[repo_id])

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id))
        FakeHfApi.private = private
        return f"https://fake.hub/{repo_id}"

    def upload_folder(
        self, folder_path, repo_id, allow_patterns, ignore_patterns, commit_message, delete_patterns=None
    ):
        from huggingface_hub.utils import filter_repo_objects

        files = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
        uploaded = sorted(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        self.calls.append(("upload_folder", repo_id, uploaded))
        FakeHfApi.message = commit_message


class FailingHfApi(FakeHfApi):
    """A Hub whose uploads fail midway."""

    def upload_folder(self, **kwargs):
        raise ConnectionError("reset by peer")
