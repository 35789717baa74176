"""A tiny Llama-architecture model with random weights, built locally for development and CI.

No model can be downloaded here, and the serving tests need a real one that vLLM loads like any
other: a byte-level BPE tokenizer (vocabulary 512) trained on Python's own stdlib sources, with a
Llama-3-style chat template, and a 2-layer Llama (hidden 256, 4 heads of 64: vLLM's CPU attention
rejects smaller heads) whose weights come from a fixed seed. Its outputs are noise, but every
code path (tokenizer, chat template, prefill, decode, streaming, LoRA) is the real one.

The model is written once to the cache (`$TRAMONTANE_CACHE/models/tiny-llama-<key>`, the key
hashing everything that determines its bytes) through a temporary folder renamed into place, so
a half-written model is never seen and concurrent builders don't clash. LoRA adapters for it
(random, non-zero, on q_proj/v_proj, in PEFT's file layout) go in `<model>-adapters/<name>`.

    python -m tramontane.serving.testmodel [--output DIR] [--adapter NAME ...]

prints the model's folder (then `NAME=PATH` per adapter). The engine's libraries (torch,
transformers, tokenizers, safetensors) are only in the serving environment
(requirements/serving.lock), so they are imported when a model is built, not with this module.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

FORMAT = 2  # bump when the way the model is built changes: it is part of the cache key
SEED = 20261128
VOCAB_SIZE = 512
BOS, EOS, PAD = "<|begin_of_text|>", "<|eot_id|>", "<|pad|>"
HEADER_START, HEADER_END, END_OF_TEXT = (
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|end_of_text|>",
)
SPECIAL_TOKENS = [BOS, END_OF_TEXT, EOS, HEADER_START, HEADER_END, PAD]
# Llama 3's chat format. OpenAI-style content parts are joined so that both content forms work.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
LLAMA = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,  # head_dim 64
    "num_key_value_heads": 2,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}
LORA_RANK = 8
LORA_ALPHA = 16
LORA_TARGETS = ("q_proj", "v_proj")
# Top-level stdlib modules the tokenizer is trained on (sorted, so the corpus is reproducible).
CORPUS_MAX_BYTES = 4_000_000


def _lib(name: str) -> Any:
    """Import an engine library lazily (absent from the operator's dev environment)."""
    return importlib.import_module(name)


def cache_root() -> Path:
    base = os.environ.get("TRAMONTANE_CACHE") or str(Path.home() / ".cache" / "tramontane")
    return Path(base) / "models"


def _corpus_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        size = path.stat().st_size
        if total + size > CORPUS_MAX_BYTES:
            break
        files.append(path)
        total += size
    return files


def _corpus(files: list[Path]) -> Iterator[str]:
    for path in files:
        yield path.read_text(encoding="utf-8", errors="replace")


def version_key() -> str:
    """Hash of what determines the model's bytes: this recipe and the libraries that run it."""
    recipe = {
        "format": FORMAT,
        "seed": SEED,
        "vocab": VOCAB_SIZE,
        "special": SPECIAL_TOKENS,
        "template": CHAT_TEMPLATE,
        "llama": LLAMA,
        "python": platform.python_version(),  # the stdlib corpus
        "libs": {name: metadata.version(name) for name in ("torch", "transformers", "tokenizers")},
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def default_model_dir() -> Path:
    return cache_root() / f"tiny-llama-{version_key()}"


def _build_atomically(final: Path, build: Callable[[Path], None]) -> Path:
    """Build into a temporary sibling folder, then rename it into place (reusing a finished one)."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():  # not a concurrent builder that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_tokenizer(out: Path) -> Any:
    tk = _lib("tokenizers")
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(_corpus_files()), trainer)
    fast = _lib("transformers").PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=LLAMA["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def _write_model(out: Path) -> None:
    torch, transformers = _lib("torch"), _lib("transformers")
    tokenizer = _write_tokenizer(out)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **LLAMA,
    )
    torch.manual_seed(SEED)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)


def ensure_model(output: Path | None = None) -> Path:
    """The tiny model's folder: built on first use, then reused."""
    return _build_atomically(output or default_model_dir(), _write_model)


def ensure_adapter(model_dir: Path, name: str, output: Path | None = None) -> Path:
    """A LoRA adapter (PEFT layout) for the tiny model, with random non-zero weights.

    Both LoRA matrices are random (PEFT starts B at zero), so the adapter really changes the
    outputs; each name gets its own seed.
    """
    final = output or model_dir.parent / f"{model_dir.name}-adapters" / name

    def build(out: Path) -> None:
        torch = _lib("torch")
        config = json.loads((model_dir / "config.json").read_text())
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        head_dim = config.get("head_dim") or hidden // heads
        out_features = {
            "q_proj": heads * head_dim,
            "v_proj": config["num_key_value_heads"] * head_dim,
        }
        generator = torch.Generator().manual_seed(
            int.from_bytes(hashlib.sha256(f"{SEED}:{name}".encode()).digest()[:4], "big")
        )
        tensors: dict[str, Any] = {}
        for layer in range(config["num_hidden_layers"]):
            for target in LORA_TARGETS:
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
                tensors[f"{prefix}.lora_A.weight"] = (
                    torch.randn(LORA_RANK, hidden, generator=generator) * 0.02
                ).contiguous()
                tensors[f"{prefix}.lora_B.weight"] = (
                    torch.randn(out_features[target], LORA_RANK, generator=generator) * 0.02
                ).contiguous()
        _lib("safetensors.torch").save_file(
            tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"}
        )
        adapter_config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": str(model_dir),
            "r": LORA_RANK,
            "lora_alpha": LORA_ALPHA,
            "lora_dropout": 0.0,
            "target_modules": list(LORA_TARGETS),
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "modules_to_save": None,
            "use_rslora": False,
            "use_dora": False,
        }
        (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")

    return _build_atomically(final, build)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tramontane.serving.testmodel",
        description="Build (once) the tiny test model and print its folder.",
    )
    parser.add_argument("--output", type=Path, help="model folder (default: in the cache)")
    parser.add_argument(
        "--adapter", action="append", default=[], metavar="NAME", help="also build this adapter"
    )
    args = parser.parse_args(argv)
    model_dir = ensure_model(args.output)
    print(model_dir)
    for name in args.adapter:
        print(f"{name}={ensure_adapter(model_dir, name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
