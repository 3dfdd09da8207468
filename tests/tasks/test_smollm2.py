"""The real SmolLM2-135M-Instruct (bundled GGUF, converted once per machine): LoRA against HF peft, merged
export against the live adapter, and prefix tuning's KV-cache generation against full recompute.

Each test is one or two forward/backward passes or a 10-token greedy generation on a short chat prompt.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lightning_peft as lp
from lightning_peft.export import export_merged

pytestmark = pytest.mark.slow
peft = pytest.importorskip("peft")

QUESTION = [{"role": "user", "content": "Which Python function returns the base name of a path?"}]


@pytest.fixture(scope="module")
def base(smollm2_path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(smollm2_path).eval()


@pytest.fixture(scope="module")
def prompt(smollm2_path: Path) -> dict[str, torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    return tok.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def _perturb_lora(model: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _greedy(model: torch.nn.Module, prompt: dict[str, torch.Tensor], **kw: object) -> torch.Tensor:
    return model.generate(**prompt, max_new_tokens=10, do_sample=False, pad_token_id=2, **kw)


def test_lora_equals_peft_forward_and_backward(
    base: torch.nn.Module, prompt: dict[str, torch.Tensor]
) -> None:
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
    )
    _perturb_lora(theirs)
    ours = copy.deepcopy(base)
    lp.inject(ours, lp.LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    state = {
        k.removeprefix("base_model.model.").replace(".default", ""): v
        for k, v in theirs.state_dict().items()
        if "lora_" in k
    }
    lp.load_trainable_state_dict(ours, state)
    assert lp.param_summary(ours).trainable == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    ids = prompt["input_ids"]
    out_theirs = theirs(input_ids=ids, labels=ids)
    out_ours = ours(input_ids=ids, labels=ids)
    assert not torch.allclose(out_theirs.logits, base(input_ids=ids).logits, atol=1e-3)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=1e-4, atol=1e-4)
    out_theirs.loss.backward()
    out_ours.loss.backward()
    grads_theirs = {
        k.removeprefix("base_model.model.").replace(".default", ""): p.grad
        for k, p in theirs.named_parameters()
        if p.requires_grad
    }
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads_theirs[name], rtol=1e-3, atol=1e-6, msg=name)


def test_merged_export_generates_the_adapters_tokens(
    tmp_path: Path, base: torch.nn.Module, prompt: dict[str, torch.Tensor]
) -> None:
    model = copy.deepcopy(base)
    lp.inject(model, lp.LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    _perturb_lora(model, seed=1, scale=0.2)
    model.eval()
    adapted = _greedy(model, prompt)
    assert not torch.equal(adapted, _greedy(base, prompt))  # the adapter changes the answer
    export_merged(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(_greedy(merged, prompt), adapted)


def test_prefix_kv_cache_generation_equals_full_recompute(
    base: torch.nn.Module, prompt: dict[str, torch.Tensor]
) -> None:
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    lp.inject(model, lp.PrefixTuningConfig(num_virtual_tokens=8))
    model.eval()
    cached = _greedy(model, prompt, use_cache=True)
    full = _greedy(model, prompt, use_cache=False)
    assert torch.equal(cached, full)
    assert not torch.equal(cached, _greedy(base, prompt))  # the prefix is really in the attention
