"""A tiny Llama-architecture model with designed weights, built locally for development and CI.

No model can be downloaded here, and the serving tests need a real one that vLLM loads like any
other: a byte-level BPE tokenizer (vocabulary 512) trained on a fixed text kept in this module,
with a Llama-3-style chat template, and a 2-layer Llama (hidden 256, 4 heads of 64: vLLM's CPU
attention rejects smaller heads). Every code path (tokenizer, chat template, prefill, decode,
streaming, LoRA) is the real one.

Its weights are not random noise, because tests that compare outputs of random weights compare
near-ties, and a near-tie falls either way depending on the CPU's arithmetic (AMX, AVX-512...).
They are built so that greedy decoding has a wide margin at every step:

- the base model is a "successor" model: the next token is a fixed function of the current one
  (`successor_map`), a cycle through the tokens that decode to printable ASCII. Embeddings are
  ±1 vectors and `lm_head` holds each token's predecessor's embedding, so the right logit beats
  the others by about 10 (measured by `tests/serving/test_testmodel.py`);
- each LoRA adapter forces one token of its own (`forced_token`), whatever the prompt: it reads a
  constant "carrier" feature (dimension 0 of every embedding, passed through the last layer's
  values) through `o_proj` and writes the forced token's direction into the residual stream
  eight times stronger than the current token's.

Every weight is a small integer times a power of two, drawn from integer random streams seeded by
name, so every value is exact in bfloat16 and no floating-point rounding (which differs between
CPUs) enters the files: the bytes are a function of this recipe and the pinned libraries alone
(a test pins their hash).

The model is written once to the cache (`$TRAMONTANE_CACHE/models/tiny-llama-<key>`, the key
hashing everything that determines its bytes) through a temporary folder renamed into place, so
a half-written model is never seen and concurrent builders don't clash. LoRA adapters for it
(in PEFT's file layout) go in `<model>-adapters/<name>`.

    python e2e/testmodel.py [--output DIR] [--adapter NAME ...]

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
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

FORMAT = 3  # bump when the way the model is built changes: it is part of the cache key
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
# The weights' design (see the module's docstring). Every value is exact in bfloat16.
CARRIER = 2.0  # dimension 0 of every embedding: the constant feature adapters read
NOISE_LEVELS = 31  # ordinary weights are integers in [-31, 31] ...
NOISE_UNIT = 2.0**-10  # ... times this: about the usual init's standard deviation of 0.02
LOGIT_UNIT = 2.0**-4  # lm_head's scale: the right logit is about 255/16 above zero
LORA_RANK = 8
LORA_ALPHA = 16
LORA_TARGETS = ("o_proj",)
FORCE_GAIN = 2.0  # the forced direction's weight in lora_B: (alpha / rank) x gain x carrier = 8
# The tokenizer's training text. Kept here, so that the vocabulary does not depend on any file
# of the machine (it used to be the interpreter's stdlib sources, which differ by build).
CORPUS = """\
The tramontane is a cold wind from the north. It comes down from the mountains to the sea, and
it blows for days. Farmers plant cypress trees in rows to break it; sailors wait in the harbour
until it is over. In Catalonia it is called tramuntana, in Italy tramontana: the wind from
beyond the mountains.

Une entreprise européenne garde ses données chez elle. Les modèles tournent dans ses propres
centres de calcul, dans les régions que sa politique de résidence autorise, et personne
d'autre ne peut les lire. Die Daten bleiben im Land; das Modell kommt zu den Daten, nicht
umgekehrt. I dati restano in Europa. Los datos se quedan en casa.

A platform team installs the operator with Helm. Each tenant gets a namespace, a quota of GPUs,
a network policy that denies by default, and keys for its applications. A tenant deploys a
model with one resource: the model's address, its revision, the engine's settings, the number
of accelerators per replica and how far it may scale. The operator renders a Ray service, the
scheduler places its pods in the allowed regions, and the engine answers requests for
completions and chat in the format every client already speaks.

def serve(request, model, adapters, max_tokens=16, temperature=0.0):
    if request.model not in adapters and request.model != model.name:
        raise NotFound(f"model {request.model!r} does not exist")
    prompt = tokenizer.apply_chat_template(request.messages, add_generation_prompt=True)
    for token in engine.generate(prompt, max_tokens=max_tokens, temperature=temperature):
        yield token.text

class ResidencyPolicy:
    regions: list[str] = ["eu-west-1", "eu-central-1", "eu-south-1"]
    model_sources: list[str] = ["s3://acme-eu-models/*", "pvc://models/*"]

    def allows(self, region: str, source: str) -> bool:
        return region in self.regions and any(match(source, p) for p in self.model_sources)

Quarterly revenue rose by twelve percent; costs were flat; the board approved the budget for the
next year. The contract is governed by the laws of the member state where the supplier has its
registered office, and any dispute shall be brought before its courts. Numbers: 0 1 2 3 4 5 6 7 8
9 10 16 32 64 128 256 512 1024 2048 4096 8192; dates: 2026-12-01, 2027-01-15; ratios: 3/4, 99.9%.
"""


def _lib(name: str) -> Any:
    """Import an engine library lazily (absent from the operator's dev environment)."""
    return importlib.import_module(name)


def cache_root() -> Path:
    base = os.environ.get("TRAMONTANE_CACHE") or str(Path.home() / ".cache" / "tramontane")
    return Path(base) / "models"


def _seed(label: str) -> int:
    """A seed per weight: a weight's values do not depend on the order weights are drawn in."""
    return int.from_bytes(hashlib.sha256(f"{SEED}:{label}".encode()).digest()[:8], "big")


def _rank(label: str) -> bytes:
    return hashlib.sha256(f"{SEED}:{label}".encode()).digest()


def version_key() -> str:
    """Hash of what determines the model's bytes: this recipe and the libraries that run it."""
    recipe = {
        "format": FORMAT,
        "seed": SEED,
        "vocab": VOCAB_SIZE,
        "special": SPECIAL_TOKENS,
        "template": CHAT_TEMPLATE,
        "llama": LLAMA,
        "design": [CARRIER, NOISE_LEVELS, NOISE_UNIT, LOGIT_UNIT],
        "corpus": hashlib.sha256(CORPUS.encode()).hexdigest(),
        "libs": {
            name: metadata.version(name)
            for name in ("torch", "transformers", "tokenizers", "safetensors")
        },
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
        # Readable by every user (pods run the engine as uid 1000): mkdtemp makes the folder
        # private, and some writers make their files private too.
        for path in tmp.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        tmp.chmod(0o755)
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
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    fast = _lib("transformers").PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=LLAMA["max_position_embeddings"],
        # Decoding a sequence gives exactly its tokens' texts joined (what vLLM streams).
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def _printable_tokens(tokenizer: Any) -> list[int]:
    """Token ids that decode, on their own, to printable ASCII with at least one visible char."""
    special = set(tokenizer.all_special_ids)
    printable = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if token_id not in special and text.isascii() and text.isprintable() and text.strip():
            printable.append(token_id)
    return printable


def _cycle(tokenizer: Any) -> list[int]:
    """The printable tokens in the order the base model walks through them."""
    return sorted(_printable_tokens(tokenizer), key=lambda token: _rank(f"cycle:{token}"))


def successor_map(tokenizer: Any) -> list[int]:
    """The base model's greedy next token for each token id.

    Printable tokens follow each other in one cycle (no token follows itself); every other
    token (bytes of multi-byte characters, control bytes, special tokens) leads into the cycle.
    So greedy output is always printable text, and never ends on its own.
    """
    cycle = _cycle(tokenizer)
    following = {token: cycle[(i + 1) % len(cycle)] for i, token in enumerate(cycle)}
    return [
        following.get(token, cycle[int.from_bytes(_rank(f"entry:{token}")[:4], "big") % len(cycle)])
        for token in range(len(tokenizer))
    ]


def forced_token(tokenizer: Any, adapter: str) -> int:
    """The token the adapter of that name makes the model emit at every step."""
    cycle = _cycle(tokenizer)
    return cycle[int.from_bytes(_rank(f"adapter:{adapter}")[:4], "big") % len(cycle)]


def greedy_continuation(
    tokenizer: Any, prompt_ids: Sequence[int], max_tokens: int, adapter: str | None = None
) -> list[int]:
    """What greedy decoding generates after `prompt_ids`: what the served model must answer."""
    if adapter is not None:
        return [forced_token(tokenizer, adapter)] * max_tokens
    successor = successor_map(tokenizer)
    tokens = [successor[prompt_ids[-1]]]
    while len(tokens) < max_tokens:
        tokens.append(successor[tokens[-1]])
    return tokens


def _noise(torch: Any, shape: tuple[int, ...], label: str) -> Any:
    """Small weights: integers in [-NOISE_LEVELS, NOISE_LEVELS] times NOISE_UNIT (exact)."""
    generator = torch.Generator().manual_seed(_seed(label))
    levels = torch.randint(-NOISE_LEVELS, NOISE_LEVELS + 1, shape, generator=generator)
    return levels.to(torch.float32) * NOISE_UNIT


def _embeddings(torch: Any, vocab: int, hidden: int) -> Any:
    generator = torch.Generator().manual_seed(_seed("embed_tokens"))
    signs = torch.randint(0, 2, (vocab, hidden), generator=generator).to(torch.float32) * 2 - 1
    signs[:, 0] = CARRIER
    return signs


def _weights(torch: Any, config: Any, successor: list[int]) -> dict[str, Any]:
    """The base model's state dict (Hugging Face Llama names), float32 values exact in bf16."""
    hidden, inter = config.hidden_size, config.intermediate_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim, vocab = hidden // heads, config.vocab_size
    last = config.num_hidden_layers - 1
    embed = _embeddings(torch, vocab, hidden)
    weights = {"model.embed_tokens.weight": embed}
    shapes = {
        "self_attn.q_proj": (heads * head_dim, hidden),
        "self_attn.k_proj": (kv_heads * head_dim, hidden),
        "self_attn.v_proj": (kv_heads * head_dim, hidden),
        "self_attn.o_proj": (hidden, heads * head_dim),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        for module, shape in shapes.items():
            weights[f"{prefix}.{module}.weight"] = _noise(torch, shape, f"{prefix}.{module}")
        weights[f"{prefix}.input_layernorm.weight"] = torch.ones(hidden)
        weights[f"{prefix}.post_attention_layernorm.weight"] = torch.ones(hidden)
    # The carrier through the last layer: value 0 of kv head 0 copies it, so the attention output
    # of the query heads that share that kv head holds it at their dimension 0, whatever the
    # attention weights. The base o_proj ignores it there; an adapter's o_proj reads it.
    v_proj = weights[f"model.layers.{last}.self_attn.v_proj.weight"]
    v_proj[0] = 0.0
    v_proj[0, 0] = 1.0
    o_proj = weights[f"model.layers.{last}.self_attn.o_proj.weight"]
    for head in _carrier_heads(heads, kv_heads):
        o_proj[:, head * head_dim] = 0.0
    norm = torch.ones(hidden)
    norm[0] = 0.0  # the carrier is no evidence for any token
    weights["model.norm.weight"] = norm
    # Row j of lm_head is the sum of the embeddings of the tokens j follows, so the current
    # token's embedding scores its successor about 255 (x LOGIT_UNIT) and the others about 0±16.
    lm_head = _noise(torch, (vocab, hidden), "lm_head")
    followers = sorted(set(successor))
    lm_head[followers] = 0.0
    for token, follower in enumerate(successor):
        lm_head[follower, 1:] += embed[token, 1:] * LOGIT_UNIT
    weights["lm_head.weight"] = lm_head
    return weights


def _carrier_heads(heads: int, kv_heads: int) -> range:
    """The query heads that read kv head 0 (grouped-query attention)."""
    return range(heads // kv_heads)


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
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(_weights(torch, config, successor_map(tokenizer)), strict=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)


def ensure_model(output: Path | None = None) -> Path:
    """The tiny model's folder: built on first use, then reused."""
    return _build_atomically(output or default_model_dir(), _write_model)


def load_tokenizer(model_dir: Path) -> Any:
    return _lib("transformers").AutoTokenizer.from_pretrained(model_dir)


def ensure_adapter(model_dir: Path, name: str, output: Path | None = None) -> Path:
    """A LoRA adapter (PEFT layout) for the tiny model that makes it emit `forced_token(name)`.

    lora_A of the last layer's o_proj reads the carrier at the attention output's dimension 0;
    lora_B writes the embedding of the forced token's predecessor in the cycle, which lm_head
    maps to the forced token. Other layers' matrices are zero.
    """
    final = output or model_dir.parent / f"{model_dir.name}-adapters" / name

    def build(out: Path) -> None:
        torch = _lib("torch")
        config = json.loads((model_dir / "config.json").read_text())
        hidden, layers = config["hidden_size"], config["num_hidden_layers"]
        tokenizer = load_tokenizer(model_dir)
        cycle = _cycle(tokenizer)
        forced = forced_token(tokenizer, name)
        predecessor = cycle[cycle.index(forced) - 1]
        direction = _embeddings(torch, len(tokenizer), hidden)[predecessor]
        direction[0] = 0.0
        tensors: dict[str, Any] = {}
        for layer in range(layers):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.o_proj"
            lora_a = torch.zeros(LORA_RANK, hidden)
            lora_b = torch.zeros(hidden, LORA_RANK)
            if layer == layers - 1:
                lora_a[0, 0] = 1.0
                lora_b[:, 0] = direction * FORCE_GAIN
            tensors[f"{prefix}.lora_A.weight"] = lora_a.to(torch.bfloat16).contiguous()
            tensors[f"{prefix}.lora_B.weight"] = lora_b.to(torch.bfloat16).contiguous()
        _lib("safetensors.torch").save_file(
            tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"}
        )
        adapter_config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            # A name, not the base model's path: the bytes stay the same wherever it is built.
            "base_model_name_or_path": "tramontane/tiny-llama",
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


def folder_digest(folder: Path) -> str:
    """SHA-256 over a folder's files (relative names and bytes), in name order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python e2e/testmodel.py",
        description="Build (once) the tiny test model and print its folder.",
    )
    parser.add_argument("--output", type=Path, help="model folder (default: in the cache)")
    parser.add_argument(
        "--adapter", action="append", default=[], metavar="NAME", help="also build this adapter"
    )
    parser.add_argument(
        "--digest", action="store_true", help="print each folder's SHA-256 (folder_digest) too"
    )
    args = parser.parse_args(argv)
    model_dir = ensure_model(args.output)
    print(f"{model_dir} {folder_digest(model_dir)}" if args.digest else model_dir)
    for name in args.adapter:
        adapter = ensure_adapter(model_dir, name)
        print(f"{name}={adapter} {folder_digest(adapter)}" if args.digest else f"{name}={adapter}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
