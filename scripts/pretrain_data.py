"""Text corpora, tokenizers and deterministic batches for `pretrain.py`.

A corpus is split into non-overlapping blocks of `seq_len` tokens. Training visits the blocks in a fresh seeded
permutation every epoch, so the batch of step `t` depends only on `(seed, t)`: resuming at step `t` needs no saved
iterator state, and `world_size` processes each take a slice of the same global batch that one process would see.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
EMBEDDED_CORPUS = REPO / "data" / "austen"  # Jane Austen's novels, see data/austen/README.md


def read_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of a `.txt` or `.txt.gz` file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"Data file {str(path)!r} " + ("is a directory, not a file." if path.is_dir() else "does not exist.")
        )
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            return handle.read()
    except (OSError, EOFError, UnicodeDecodeError) as error:  # a damaged or truncated gzip, not UTF-8 text
        raise ValueError(f"Data file {str(path)!r} cannot be read as UTF-8 text: {error}") from None


def local_corpus(train_files: list[str] | None, validation_files: list[str] | None) -> tuple[str, str]:
    """(train text, validation text) from local files; the embedded corpus when no files are given."""
    if not train_files and not validation_files:
        train_files = [str(EMBEDDED_CORPUS / "train.txt.gz")]
        validation_files = [str(EMBEDDED_CORPUS / "validation.txt.gz")]
    if not train_files or not validation_files:
        raise ValueError("Give both `--train-files` and `--validation-files` (held-out text), or neither.")
    for path in validation_files:
        same = [t for t in train_files if Path(t).is_file() and Path(path).is_file() and Path(t).samefile(path)]
        if same:
            raise ValueError(f"`--validation-files` {path!r} is also a training file ({same[0]!r}): hold text out.")
    return read_texts(train_files, "--train-files"), read_texts(validation_files, "--validation-files")


def read_texts(paths: list[str], flag: str) -> str:
    """The texts of the files `flag` names, joined by newlines; refused if they hold none."""
    text = "\n".join(read_text(path) for path in paths)
    if not text.strip():
        raise ValueError(f"`{flag}` holds no text.")
    return text


def stream_hf_dataset(name: str, config: str | None, split: str, text_column: str = "text") -> Iterator[str]:
    """Texts of a Hugging Face dataset, streamed (e.g. `allenai/c4`, config `en`, as the paper uses). A document
    whose text is not a string (a null) stops the run with its position, rather than deep inside the tokenizer."""
    from datasets import load_dataset

    where = f"`--dataset` {name!r} (`--dataset-config` {config!r}, split {split!r})"
    try:
        examples = iter(load_dataset(name, config, split=split, streaming=True))
        first = next(examples, None)  # opened now, not at the first training step: errors come before any output
    except (OSError, ValueError) as error:  # offline, no such dataset, config or split (OSError, ValueError)
        raise ValueError(f"{where} cannot be opened: {' '.join(str(error).split())}") from None
    if first is None or text_column not in first:
        found = "no examples" if first is None else f"examples with the columns {sorted(first)}"
        raise ValueError(f"{where} needs a {text_column!r} column; it has {found}.")

    def texts() -> Iterator[str]:
        for i, example in enumerate(itertools.chain([first], examples)):
            text = example[text_column]
            if not isinstance(text, str):
                raise ValueError(f"{where}: document {i} has a {type(text).__name__} {text_column!r}, not text.")
            yield text

    return texts()


class Tokenizer:
    """The few things training needs from a tokenizer: encode text, vocabulary size, save next to checkpoints."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer  # a transformers PreTrainedTokenizerFast

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def eos_token_id(self) -> int:
        return self.hf.eos_token_id

    def encode(self, texts: Iterable[str]) -> list[list[int]]:
        return self.hf(list(texts), add_special_tokens=False)["input_ids"]

    def save(self, directory: str | os.PathLike) -> None:
        self.hf.save_pretrained(directory)


def train_tokenizer(text: str, vocab_size: int, cache_dir: str | os.PathLike | None = None) -> Tokenizer:
    """A byte-level BPE tokenizer trained on `text` (cached by content hash and vocabulary size)."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"`--vocab-size` must be at least 300 (256 bytes plus merges), got {vocab_size}.")
    key = hashlib.sha256(f"{vocab_size}\0{text}".encode()).hexdigest()[:16]
    cached = Path(cache_dir) / f"tokenizer-{key}.json" if cache_dir else None
    raw = None
    if cached is not None and cached.is_file():
        try:
            raw = RawTokenizer.from_file(str(cached))
        except Exception:  # an unreadable entry (a write cut short): trained again and replaced
            raw = None
    if raw is None:
        raw = RawTokenizer(models.BPE())
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        raw.train_from_iterator(_paragraphs(text), trainer=trainer)
        if cached is not None:  # written under a temporary name, then renamed: a reader sees all of it or nothing
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")
            raw.save(str(tmp))
            os.replace(tmp, cached)
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return Tokenizer(hf)


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """A hub tokenizer (e.g. `t5-base`, the paper's) or a saved tokenizer directory."""
    from transformers import AutoTokenizer

    import model_card

    if model_card.no_such_folder(name_or_path):
        raise ValueError(f"`--tokenizer` {name_or_path!r}: no such folder (nor a Hub id, 'name' or 'namespace/name').")
    try:
        tokenizer = Tokenizer(AutoTokenizer.from_pretrained(name_or_path))
    except (OSError, ValueError) as error:  # no such directory, and the Hub unreachable or without that name
        raise ValueError(f"`--tokenizer` {name_or_path!r} cannot be loaded: {' '.join(str(error).split())}") from None
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"`--tokenizer` {name_or_path!r} has no end-of-sequence token, which the model's config, streamed "
            "documents and `sample.py` use."
        )
    return tokenizer


def _paragraphs(text: str, lines_per_chunk: int = 200) -> Iterator[str]:
    lines = text.splitlines(keepends=True)
    for start in range(0, len(lines), lines_per_chunk):
        yield "".join(lines[start : start + lines_per_chunk])


def tokenize_text(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D int32 token tensor."""
    ids = [token for chunk in tokenizer.encode(_paragraphs(text)) for token in chunk]
    return torch.tensor(ids, dtype=torch.int32)


def tokenize_documents(tokenizer: Tokenizer, texts: Iterable[str]) -> torch.Tensor:
    """Documents as one 1-D int32 token tensor, each followed by EOS: packed as `StreamingBlocks` packs training text,
    so that validation text looks like training text."""
    ids = [token for document in tokenizer.encode(texts) for token in [*document, tokenizer.eos_token_id]]
    return torch.tensor(ids, dtype=torch.int32)


def to_blocks(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(n_blocks, seq_len) non-overlapping blocks; the ragged tail is dropped."""
    n_blocks = tokens.numel() // seq_len
    return tokens[: n_blocks * seq_len].view(n_blocks, seq_len)


class BlockSampler:
    """Global batch `t` = blocks `[t * G, (t + 1) * G)` of the concatenated per-epoch permutations.

    `G = micro_batch * grad_accum * world_size`. Rank `k` of `world_size` takes a contiguous slice of `micro_batch *
    grad_accum` blocks, cut into `grad_accum` micro-batches, so the union over ranks is always the same global batch.
    """

    def __init__(self, blocks: torch.Tensor, micro_batch: int, grad_accum: int, world_size: int, seed: int):
        self.blocks, self.seed = blocks, seed
        self.micro_batch, self.grad_accum, self.world_size = micro_batch, grad_accum, world_size
        self.global_batch = micro_batch * grad_accum * world_size
        if len(blocks) < self.global_batch:
            raise ValueError(
                f"The training corpus has {len(blocks)} blocks of {blocks.shape[1]} tokens, fewer than one global "
                f"batch ({self.global_batch} blocks); use more text, a shorter `--seq-len` or a smaller batch."
            )
        self._epoch, self._order = -1, None

    def _block_index(self, sample: int) -> int:
        epoch, offset = divmod(sample, len(self.blocks))
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.blocks), generator=generator)
        return int(self._order[offset])

    def micro_batches(self, step: int, rank: int) -> list[torch.Tensor]:
        """The `grad_accum` (micro_batch, seq_len) int64 batches of `rank` at optimizer step `step`."""
        per_rank = self.micro_batch * self.grad_accum
        start = step * self.global_batch + rank * per_rank
        rows = torch.stack([self.blocks[self._block_index(i)] for i in range(start, start + per_rank)]).long()
        return list(rows.split(self.micro_batch))

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / len(self.blocks)


class StreamingBlocks:
    """Blocks of a streamed dataset, packed in order (documents joined by EOS); for corpora too big to tokenize
    up front. `micro_batches(step, rank)` must be called with consecutive steps; resuming skips consumed blocks."""

    def __init__(
        self,
        texts: Iterator[str],
        tokenizer: Tokenizer,
        seq_len: int,
        micro_batch: int,
        grad_accum: int,
        world_size: int,
        start_step: int = 0,
    ):
        self.texts, self.tokenizer, self.seq_len = texts, tokenizer, seq_len
        self.micro_batch, self.grad_accum, self.world_size = micro_batch, grad_accum, world_size
        self.global_batch = micro_batch * grad_accum * world_size
        self._buffer: list[int] = []
        self._next_step = 0
        for _ in range(start_step):
            self._global_batch()

    def _next_block(self) -> list[int]:
        while len(self._buffer) < self.seq_len:
            try:
                text = next(self.texts)
            except StopIteration:
                raise ValueError("The streamed dataset ran out of text before training finished.") from None
            self._buffer.extend(self.tokenizer.encode([text])[0] + [self.tokenizer.eos_token_id])
        block, self._buffer = self._buffer[: self.seq_len], self._buffer[self.seq_len :]
        return block

    def _global_batch(self) -> torch.Tensor:
        self._next_step += 1
        return torch.tensor([self._next_block() for _ in range(self.global_batch)], dtype=torch.long)

    def micro_batches(self, step: int, rank: int) -> list[torch.Tensor]:
        if step != self._next_step:
            raise RuntimeError(f"StreamingBlocks is sequential: expected step {self._next_step}, got {step}.")
        per_rank = self.micro_batch * self.grad_accum
        rows = self._global_batch()[rank * per_rank : (rank + 1) * per_rank]
        return list(rows.split(self.micro_batch))

    def epoch_of(self, step: int) -> float:
        return float("nan")
