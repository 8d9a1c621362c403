"""CUDA checks; skipped cleanly where no GPU is available (CI never has one)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from test_functional import NAMES, clone_inputs, grads, make_inputs

from peft_sltrain import SLTrainConfig
from peft_sltrain.cost import factored_supported
from peft_sltrain.functional import sltrain_linear

from conftest import perturb_trainable, tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["dense", "factored"])
def test_cuda_matches_cpu_fp32(dtype, path):
    cpu = make_inputs(dtype=torch.float32, d_in=256, d_out=192, r=16, nnz=1500)
    cuda = {k: (v.detach().to("cuda", dtype if v.is_floating_point() else v.dtype).requires_grad_(v.requires_grad)
                if torch.is_tensor(v) else v) for k, v in clone_inputs(cpu).items()}  # fmt: skip
    if path == "factored" and not factored_supported(torch.device("cuda"), dtype):
        pytest.skip(f"no CUDA sparse kernels for {dtype}")
    y_cpu = sltrain_linear(**cpu, scaling=0.5, path="dense")
    y_gpu = sltrain_linear(**cuda, scaling=0.5, path=path)
    tol = 1e-4 if dtype == torch.float32 else 0.02
    torch.testing.assert_close(y_gpu.float().cpu(), y_cpu, rtol=tol, atol=tol * y_cpu.abs().max().item())
    for g_gpu, g_cpu in zip(grads(y_gpu, [cuda[n] for n in NAMES]), grads(y_cpu, [cpu[n] for n in NAMES])):
        torch.testing.assert_close(g_gpu.float().cpu(), g_cpu, rtol=tol, atol=tol * g_cpu.abs().max().item())


def test_wrapped_model_trains_on_cuda_in_bf16(input_ids):
    model = get_peft_model(tiny_llama(), SLTrainConfig(r=4, sparsity=0.05, from_scratch=True)).cuda()
    perturb_trainable(model)
    ids = input_ids.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_glue_merged_export_with_the_model_on_cuda(tmp_path):
    """scripts/run_glue.py checks its merged export with the model where the Trainer left it, on CUDA."""
    import random

    pytest.importorskip("datasets")  # the `glue` extra (absent from some GPU images)
    from datasets import Dataset
    from test_glue import glue_tasks, run_glue, save_tiny_roberta, sentence
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    model_dir = save_tiny_roberta(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    config = SLTrainConfig(r=4, sparsity=0.05, alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = get_peft_model(base, config).cuda()
    perturb_trainable(model)
    rng = random.Random(0)
    rows = Dataset.from_list([{"sentence": sentence(rng), "label": i % 2} for i in range(12)])
    dataset = run_glue.prepare_split(rows, glue_tasks.TASKS["sst2"], tokenizer, 24, "rows", None)
    collator = DataCollatorWithPadding(tokenizer)  # its batches are on the CPU

    logits = run_glue.predict_logits(model, dataset, collator, batch_size=5)
    assert logits.device.type == "cpu" and logits.shape == (12, 2)
    merge_to = run_glue.ModelArguments(merge_to=str(tmp_path / "merged"))
    check = run_glue.export_merged(model, tokenizer, dataset, collator, merge_to)  # reloads the merged model
    assert check["predictions_equal"] is True and check["max_abs_logit_diff"] <= 1e-4


def test_model_built_under_the_cuda_default_device_draws_the_cpu_support():
    """Under `torch.device("cuda")` the seeded support is still drawn on the CPU (a CPU generator cannot drive a CUDA
    draw), so a model built there gets the same supports as one built on the CPU, each kept on the layer's device."""
    config = dict(r=4, sparsity=0.05, from_scratch=True)
    on_cpu = get_peft_model(tiny_llama(), SLTrainConfig(**config))
    with torch.device("cuda"):
        on_cuda = get_peft_model(tiny_llama(), SLTrainConfig(**config))
    cpu_supports = {n: b for n, b in on_cpu.named_buffers() if "sltrain_indices" in n}
    cuda_supports = {n: b for n, b in on_cuda.named_buffers() if "sltrain_indices" in n}
    assert cpu_supports and cpu_supports.keys() == cuda_supports.keys()
    for name, support in cuda_supports.items():
        assert support.device.type == "cuda" and torch.equal(support.cpu(), cpu_supports[name]), name


@pytest.mark.parametrize("compute", ["batched", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_matches_the_dense_path_on_cuda(input_ids, dtype, compute):
    """`compute="batched"` on CUDA (fp32, and bf16 autocast as GPU training runs) against the dense path; `"auto"`
    takes it there."""
    dense = get_peft_model(tiny_llama(num_hidden_layers=3), SLTrainConfig(r=4, sparsity=0.05, from_scratch=True))
    dense.set_compute("dense")
    perturb_trainable(dense)
    batched = copy.deepcopy(dense)
    batched.set_compute(compute)
    ids = input_ids.cuda()
    results = []
    for model in (dense.cuda().train(), batched.cuda().train()):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert any("_sltrain_slot" in m.__dict__ for m in batched.modules())
    (loss_dense, grads_dense), (loss_batched, grads_batched) = results
    tol = 1e-5 if dtype == torch.float32 else 0.02
    torch.testing.assert_close(loss_batched, loss_dense, rtol=tol, atol=0)
    for name, g in grads_dense.items():
        assert g is not None and grads_batched[name] is not None, name
        scale = g.abs().max().item()
        torch.testing.assert_close(grads_batched[name], g, rtol=tol, atol=tol * scale, msg=name)
