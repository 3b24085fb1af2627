"""Tests of ``andes model tiny``: the directory loads in transformers and vLLM, every id decodes,
text round-trips through the tokenizer, and a seed pins every byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from andes.cli import main
from andes.tiny_model import build_tiny_model

VOCAB_SIZE = 2048

SAMPLES = [
    "",
    "Hello, world!",
    "  two leading spaces, a tab\tand a newline\n",
    "Crème brûlée, Größe, ¿qué tal? Ça coûte 3,50 €.",
    "今天天气很好。おはようございます。안녕하세요",
    "Emoji: 🎉🍕 👨‍👩‍👧‍👦 🇫🇷 ☕️",
    "def f(x):\n    return {'a': [1, 2.5, -3e9]}  # ok\r\n",
    "<s>special tokens as text</s><pad><unk>",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(model_dir)


def test_tokenizer_covers_the_model_vocabulary(model_dir: Path, tokenizer: Any) -> None:
    config = LlamaConfig.from_pretrained(model_dir)
    assert len(tokenizer) == config.vocab_size == VOCAB_SIZE
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<s>", "</s>", "<pad>", "<unk>")
    assert "random weights" in (model_dir / "README.md").read_text().lower()


@pytest.mark.parametrize("text", SAMPLES)
def test_text_round_trips(tokenizer: Any, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_any_text_round_trips(tokenizer: Any, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_every_id_decodes(tokenizer: Any) -> None:
    for token_id in range(VOCAB_SIZE):
        assert isinstance(tokenizer.decode([token_id]), str)
    assert tokenizer.decode(list(range(VOCAB_SIZE)))


def test_chat_template(tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|system|>\nBe brief.\n<|user|>\nHi!\n<|assistant|>\n"


def test_a_small_corpus_is_padded_to_the_vocabulary_size(tmp_path: Path) -> None:
    # The corpus yields fewer than 4096 merges: the rest of the ids are <extra_N> tokens.
    big = build_tiny_model(tmp_path / "big", vocab_size=4096)
    tokenizer = AutoTokenizer.from_pretrained(big)
    assert len(tokenizer) == LlamaConfig.from_pretrained(big).vocab_size == 4096
    assert tokenizer.decode([4095]).startswith("<extra_")


def test_transformers_generates(model_dir: Path, tokenizer: Any) -> None:
    model = LlamaForCausalLM.from_pretrained(model_dir)
    prompt = tokenizer("The kettle clicked off", return_tensors="pt")
    output = model.generate(**prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    new_tokens = output[0, prompt["input_ids"].shape[1]:].tolist()
    assert len(new_tokens) == 8
    assert all(0 <= token < VOCAB_SIZE for token in new_tokens)


def test_seed_pins_every_byte(model_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (again / name).read_bytes() == (model_dir / name).read_bytes(), name
    other = build_tiny_model(tmp_path / "other", seed=1)
    for name, same in (("model.safetensors", False), ("tokenizer.json", True)):
        assert ((other / name).read_bytes() == (model_dir / name).read_bytes()) is same, name


def test_cli_refuses_a_non_empty_directory_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["model", "tiny", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    assert main(["model", "tiny", "--out", str(out), "--force", "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert (out / "notes.txt").read_text() == "keep me"
    assert (out / "model.safetensors").is_file()


def test_cli_rejects_a_vocabulary_smaller_than_the_byte_alphabet(tmp_path: Path) -> None:
    assert main(["model", "tiny", "--out", str(tmp_path / "m"), "--vocab-size", "100"]) == 2
    assert not (tmp_path / "m").exists()


VLLM_SCRIPT = textwrap.dedent("""
    import json, sys
    from vllm import EngineArgs, LLMEngine, SamplingParams

    engine = LLMEngine.from_engine_args(EngineArgs(
        model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=512,
        max_num_seqs=8, max_num_batched_tokens=512, seed=0))
    (prompt,) = engine.renderer.render_cmpl([{"prompt_token_ids": [1, 2, 3, 4]}])
    engine.add_request("r0", prompt, SamplingParams(max_tokens=8, temperature=0.0,
                                                    ignore_eos=True))
    finished = []
    while engine.has_unfinished_requests():
        finished.extend(out for out in engine.step() if out.finished)
    completion = finished[0].outputs[0]
    print(json.dumps({"token_ids": list(completion.token_ids), "text": completion.text}))
""")


def test_vllm_loads_and_generates(model_dir: Path) -> None:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
           "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", VLLM_SCRIPT, str(model_dir)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    completion = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(completion["token_ids"]) == 8
    assert all(0 <= token < VOCAB_SIZE for token in completion["token_ids"])


def test_gateway_counts_and_renders_with_the_model_tokenizer(tiny_model: str) -> None:
    """``python -m gateway --tokenizer DIR``: exact prompt counts, the model's chat template."""
    from transformers import AutoTokenizer

    from gateway.chat import ChatMessage
    from gateway.tokens import ModelTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    counter = ModelTokenizer(tiny_model)
    text = "Bonjour, ça va? 你好 🙂 and a longer English sentence for good measure."
    assert counter.count(text) == len(tokenizer.encode(text))
    assert counter.count("ignored", [5, 6, 7]) == 3
    messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi!")]
    assert counter.render(messages) == tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        tokenize=False, add_generation_prompt=True)
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        ModelTokenizer("/nonexistent/model")


def test_the_small_shape_is_a_bigger_model_with_the_same_tokenizer(
        model_dir: Path, tmp_path: Path) -> None:
    small = build_tiny_model(tmp_path / "small", seed=0, shape="small")
    config, tiny_config = LlamaConfig.from_pretrained(small), LlamaConfig.from_pretrained(model_dir)
    shape = (config.num_hidden_layers, config.hidden_size, config.num_attention_heads)
    assert shape == (4, 512, 16)
    assert config.vocab_size == tiny_config.vocab_size
    assert (small / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    assert "--shape small" in (small / "README.md").read_text()
    with pytest.raises(ValueError, match="shape must be one of tiny, small"):
        build_tiny_model(tmp_path / "huge", shape="huge")
