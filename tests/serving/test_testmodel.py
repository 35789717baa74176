"""The tiny test model: its bytes are a function of its recipe, and greedy decoding of it cannot
tie by accident on any CPU (the serving tests compare generated text against what it must say).

Built here with the real libraries (torch, transformers, tokenizers) into a temporary folder, not
taken from the cache, so these tests check the recipe itself. No engine: the forward passes are
transformers' own, in bfloat16 like vLLM's.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

import testmodel

# torch, transformers and tokenizers are only in the serving environment.
pytestmark = pytest.mark.serving

ADAPTERS = ("finance-reports", "contracts-legal")
# sha256 of the built folders (testmodel.folder_digest). They change only with
# the recipe or the pinned torch/transformers/tokenizers/safetensors: then bump testmodel.FORMAT
# and put the new digests here (`python e2e/testmodel.py --output DIR --digest
# --adapter finance-reports --adapter contracts-legal` prints them).
PINNED_DIGESTS = {
    "model": "c8e909dc4f25bb47f02155c452c6823a8ab308bbf3060741ffaef67e5b373eb8",
    "finance-reports": "518d839c3b9df89d86d26f94ffac9cbe7f0869a0d0bbfaacdbc5050493f1e4a5",
    "contracts-legal": "246655eb43fa11eca30609dd5960633d15c5b19726a16716cda34973b1d0fc21",
}
# Logits the winning token must lead by at every greedy step. bfloat16 rounding moves a logit of
# this model by well under 0.1, so a lead of 5 cannot flip on another CPU's arithmetic.
MIN_LEAD = 5.0


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    model = testmodel.ensure_model(tmp_path_factory.mktemp("recipe") / "tiny-llama")
    folders = {"model": model}
    for name in ADAPTERS:
        folders[name] = testmodel.ensure_adapter(model, name)
    return folders


def test_model_bytes_are_a_function_of_the_recipe(built: dict[str, Path]) -> None:
    digests = {name: testmodel.folder_digest(folder) for name, folder in built.items()}
    assert digests == PINNED_DIGESTS


def test_model_files_are_readable_by_the_engine_user(built: dict[str, Path]) -> None:
    # Pods run vLLM as uid 1000, not as the user who built the files.
    for folder in built.values():
        for path in [folder, *folder.rglob("*")]:
            assert path.stat().st_mode & stat.S_IROTH, path


def test_adapters_force_tokens_of_their_own(built: dict[str, Path]) -> None:
    tokenizer = testmodel.load_tokenizer(built["model"])
    forced = [testmodel.forced_token(tokenizer, name) for name in ADAPTERS]
    assert len(set(forced)) == len(forced)
    successor = testmodel.successor_map(tokenizer)
    assert all(successor[token] != token for token in range(len(tokenizer)))
    assert tokenizer.eos_token_id not in successor  # generations never stop by themselves


def _merged_model(built: dict[str, Path], adapter: str | None) -> Any:
    """The model in bfloat16, with the adapter's LoRA merged as PEFT and vLLM apply it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    safetensors = pytest.importorskip("safetensors.torch")
    model = transformers.LlamaForCausalLM.from_pretrained(built["model"], dtype=torch.bfloat16)
    if adapter is not None:
        tensors = safetensors.load_file(str(built[adapter] / "adapter_model.safetensors"))
        scale = testmodel.LORA_ALPHA / testmodel.LORA_RANK
        with torch.no_grad():
            for layer, block in enumerate(model.model.layers):
                prefix = f"base_model.model.model.layers.{layer}.self_attn.o_proj"
                delta = tensors[f"{prefix}.lora_B.weight"].float()
                delta = delta @ tensors[f"{prefix}.lora_A.weight"].float()
                block.self_attn.o_proj.weight += (scale * delta).to(torch.bfloat16)
    return model.eval()


@pytest.mark.parametrize("adapter", [None, *ADAPTERS])
def test_greedy_decoding_wins_every_step_by_a_wide_margin(
    built: dict[str, Path], adapter: str | None
) -> None:
    torch = pytest.importorskip("torch")
    tokenizer = testmodel.load_tokenizer(built["model"])
    model = _merged_model(built, adapter)
    prompts = [
        tokenizer(text)["input_ids"]
        for text in ("Quarterly revenue of", "The tramontane is a wind", "x", "Données: 42 €")
    ]
    prompts.append(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "Bonjour"}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
    )
    for prompt in prompts:
        ids = torch.tensor([prompt])
        leads = []
        with torch.no_grad():
            for _ in range(12):
                top = torch.topk(model(ids).logits[0, -1].float(), 2)
                leads.append(float(top.values[0] - top.values[1]))
                ids = torch.cat([ids, top.indices[:1].view(1, 1)], dim=1)
        generated = ids[0, len(prompt) :].tolist()
        assert generated == testmodel.greedy_continuation(tokenizer, prompt, 12, adapter)
        assert min(leads) >= MIN_LEAD, (tokenizer.decode(prompt), leads)
