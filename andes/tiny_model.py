"""A tiny random Llama model that the real vLLM engine loads in seconds on a CPU, built offline.

The vLLM backend needs a model to run its real paths (prefill, decode, the KV cache, preemption)
in tests and demos on machines with no GPU and no network. What the tokens say does not matter
there, so the weights are random; what matters is that the directory is a standard Hugging Face
checkpoint, that every id the model can emit decodes to text, and that a seed pins every byte,
so two machines building the same seed serve the same model.

The tokenizer is a byte-level BPE trained on ``andes/data/tiny_corpus.txt``, so any UTF-8 text
encodes and decodes back unchanged. torch, transformers and tokenizers are imported on use: the
rest of ``andes`` runs without them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

CORPUS = Path(__file__).resolve().parent / "data" / "tiny_corpus.txt"

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)
"""In id order: unk, bos and eos take Llama's ids 0, 1 and 2."""

BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""Plain-text roles, so chat requests render without a template of the caller's own."""

MAX_POSITIONS = 4096


@dataclass(frozen=True)
class ModelShape:
    """The architecture's sizes (heads of 32: the smallest the CPU attention backend takes)."""

    layers: int
    hidden_size: int
    heads: int
    intermediate_size: int


SHAPES = {
    "tiny": ModelShape(layers=2, hidden_size=128, heads=4, intermediate_size=352),
    "small": ModelShape(layers=4, hidden_size=512, heads=16, intermediate_size=1408),
}
"""``tiny`` (0.8 M parameters) runs the tests in seconds; ``small`` (about 15 M) makes each
step cost compute rather than framework overhead, as a real model's does on its accelerator
(the overhead benchmark runs both)."""


def build_tiny_model(
    out_dir: Path, *, seed: int = 0, vocab_size: int = 2048, shape: str = "tiny"
) -> Path:
    """Write the model, its tokenizer and a README into ``out_dir`` (files of the same name are
    replaced) and return ``out_dir``. The same seed and vocab_size give the same bytes."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes and "
            f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size}"
        )
    # Everything is built here; a stray download would make the result depend on the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")
    tokenizer = _fast_tokenizer(_train_tokenizer(vocab_size))
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    _save_model(out_dir, tokenizer, seed=seed, shape=SHAPES[shape])
    (out_dir / "README.md").write_text(_readme(seed=seed, vocab_size=vocab_size, shape=shape))
    return out_dir


def _train_tokenizer(vocab_size: int) -> Tokenizer:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(CORPUS)], trainer)
    # The corpus rarely yields vocab_size tokens, and a random model emits every id it has:
    # the rest become plain-text tokens so that each decodes to something visible.
    trained = tokenizer.get_vocab_size(with_added_tokens=True)
    tokenizer.add_tokens(
        [AddedToken(f"<extra_{i}>", special=False) for i in range(vocab_size - trained)]
    )
    return tokenizer


def _fast_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call, unused-ignore]
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        # Cleaning up spaces (" ." -> ".") would break decode(encode(text)) == text.
        clean_up_tokenization_spaces=False,
        model_max_length=MAX_POSITIONS,
        chat_template=CHAT_TEMPLATE,
    )


def _save_model(
    out_dir: Path, tokenizer: PreTrainedTokenizerFast, *, seed: int, shape: ModelShape
) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    # A private RNG stream: the seed alone decides the weights, and the caller's RNG is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call, unused-ignore]
    model.save_pretrained(out_dir)
    # safetensors writes its file owner-only (0600); the worker image runs as another user.
    (out_dir / "model.safetensors").chmod(0o644)


def _readme(*, seed: int, vocab_size: int, shape: str) -> str:
    sizes = SHAPES[shape]
    return (
        "# Tiny random Llama (Andes Serve)\n\n"
        f"Random weights (seed {seed}): the text it generates is meaningless. It exists to run "
        "a real engine (vLLM, transformers) quickly on a CPU, offline.\n\n"
        f"- shape {shape}: {sizes.layers} layers, hidden size {sizes.hidden_size}, "
        f"{sizes.heads} attention heads, "
        f"float32, {MAX_POSITIONS} positions\n"
        f"- vocabulary {vocab_size}: byte-level BPE trained on the Andes Serve tiny corpus, "
        "padded with `<extra_N>` tokens\n\n"
        f"Rebuild: `andes model tiny --out DIR --seed {seed} --vocab-size {vocab_size} "
        f"--shape {shape}`\n"
    )
