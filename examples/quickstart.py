"""SLTrain in one short script: pretrain a tiny LLaMA from scratch, fine-tune a tiny RoBERTa, save, reload, merge.

    python examples/quickstart.py

Everything is built from configs in code, so it runs offline on a CPU: about 30 s the first time (numba compiling its
kernels, once per machine), a few seconds after.
"""

# ruff: noqa: E402  (the imports below come after silencing what they would log)
import logging
import tempfile
import warnings

# noise from dependencies, not about SLTrain, silenced before they are imported: bitsandbytes (where installed) logs
# on some CPUs that an optional kernel package is missing, and PEFT 0.21 reads a property Transformers 5 deprecates
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

import torch
from accelerate import init_empty_weights
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, RobertaConfig, RobertaForSequenceClassification

import peft_sltrain  # registers the SLTRAIN method with PEFT

torch.manual_seed(0)
ids = torch.randint(0, 256, (4, 32))

# 1. Pretraining from scratch: W = (alpha / r) B A + S, no dense weight is ever allocated for the targeted layers.
llama_config = LlamaConfig(
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=256,
    tie_word_embeddings=False,
)
with init_empty_weights():
    base = AutoModelForCausalLM.from_config(llama_config)
config = peft_sltrain.SLTrainConfig(r=32, sparsity=0.03, alpha=8, from_scratch=True)
print("planned:", peft_sltrain.count_parameters(base, config))
model = get_peft_model(base, config)
model.print_trainable_parameters()
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
for _ in range(20):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
print(f"from scratch: loss of the 20th step {loss.item():.3f}")

with tempfile.TemporaryDirectory() as directory:
    model.eval().save_pretrained(directory)  # safetensors: factors, supports, embeddings, norms, head
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_config(llama_config), directory).eval()
    print("reload bit-identical:", torch.equal(reloaded(ids).logits, model(ids).logits))
    dense = model.merge_and_unload()  # a plain LlamaForCausalLM with nn.Linear weights
    print("merged q_proj is a plain nn.Linear:", type(dense.model.layers[0].self_attn.q_proj) is torch.nn.Linear)

# 2. Fine-tuning: frozen W0 plus a trainable B A + S delta; the classifier head is trained and saved too.
roberta = RobertaForSequenceClassification(
    RobertaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256, num_labels=2
    )
)
model = get_peft_model(roberta, peft_sltrain.SLTrainConfig(r=8, sparsity=0.03, alpha=16, task_type="SEQ_CLS"))
model.print_trainable_parameters()
labels = torch.tensor([0, 1, 0, 1])
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
for _ in range(20):
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
print(f"fine-tuning: loss of the 20th step {loss.item():.3f}")
adapter_logits = model.eval()(input_ids=ids).logits
merged = model.merge_and_unload()  # a plain RobertaForSequenceClassification: W0 + delta in each nn.Linear
print(
    type(merged).__name__,
    "predicts as the adapter:",
    torch.allclose(merged(input_ids=ids).logits, adapter_logits, atol=1e-5),
)
