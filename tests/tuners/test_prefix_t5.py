"""Prefix tuning on T5 (encoder-decoder).

Oracles: Hugging Face ``peft`` (decoder self-attention prefixes through ``past_key_values``, including
``generate``), T5's own ``compute_bias`` in the shifted frame for the prefix keys' position bias, and the
base T5 model reading a cross-attention cache pre-filled with ``[prefix; encoder keys]``.
"""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import AutoConfig, T5ForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

import lightning_peft as lp
from lightning_peft.export import export_peft, import_peft
from lightning_peft.export.prompt import peft_seq2seq_prefix_slots
from lightning_peft.tuners.prefix import PrefixTuningConfig
from lightning_peft.tuners.prefix_attention import prefix_position_bias
from tests.models import TINY_CONFIGS, VOCAB, perturb_trainable

peft = pytest.importorskip("peft")
# transformers < 5 computes T5 attention inline (no AttentionInterface): prefix tuning refuses T5 there.
T5_ROUTES = hasattr(sys.modules[T5ForConditionalGeneration.__module__], "ALL_ATTENTION_FUNCTIONS")
needs_routing = pytest.mark.skipif(not T5_ROUTES, reason="this transformers runs T5 attention inline")


def tiny_t5(layers: int = 3, seed: int = 0) -> T5ForConditionalGeneration:
    """Weights scaled up so that greedy generation varies (a prefix then shows in the tokens)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model("t5", vocab_size=VOCAB, **{**TINY_CONFIGS["t5"], "num_layers": layers})
    model = T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model


def inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding in the second row
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": torch.randint(2, VOCAB, (2, 5))}


def prefixed(layers: int = 3, n: int = 4, **kw) -> T5ForConditionalGeneration:
    model = tiny_t5(layers)
    lp.inject(model, PrefixTuningConfig(num_virtual_tokens=n, **kw))
    perturb_trainable(model, scale=0.5)
    return model


def peft_twin(ours: T5ForConditionalGeneration, layers: int, n: int = 4) -> torch.nn.Module:
    """peft's T5 with the table laid out so decoder layer i reads our layer i (slot 2i mod L)."""
    twin = peft.get_peft_model(
        tiny_t5(layers), peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=n)
    ).eval()
    table = ours.prompt_encoder.all_prefixes().detach()
    by_layer, slots = table.reshape(n, layers, -1), torch.zeros(n, layers, table.shape[1] // layers)
    for i, slot in enumerate(peft_seq2seq_prefix_slots(layers)):
        slots[:, slot] = by_layer[:, i]
    with torch.no_grad():
        twin.prompt_encoder["default"].embedding.weight.copy_(slots.reshape(table.shape))
    return twin


@needs_routing
def test_peft_slot_layout() -> None:
    assert peft_seq2seq_prefix_slots(3) == [0, 2, 1]
    assert peft_seq2seq_prefix_slots(4) == [0, 2, 0, 2]  # layers i and i + L/2 share a slot


@needs_routing
def test_decoder_prefix_equals_peft_logits_loss_and_generate() -> None:
    ours = prefixed(sites=["decoder_self"])
    theirs = peft_twin(ours, 3)
    batch = inputs()
    labels = batch["decoder_input_ids"]
    a = ours(**{k: v for k, v in batch.items() if k != "decoder_input_ids"}, labels=labels)
    b = theirs(**{k: v for k, v in batch.items() if k != "decoder_input_ids"}, labels=labels)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-5)
    base = tiny_t5(3)(**batch).logits
    assert (ours(**batch).logits - base).abs().max() > 0.1  # the prefix changes the decoder

    gen = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True)
    enc = {k: batch[k] for k in ("input_ids", "attention_mask")}
    ra, rb = ours.generate(**enc, **gen), theirs.generate(**enc, **gen)
    assert torch.equal(ra.sequences, rb.sequences)
    for x, y in zip(ra.scores, rb.scores, strict=True):  # every KV-cached step, not just the argmax
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@needs_routing
def test_even_layer_count_matches_peft_when_shared_slots_agree() -> None:
    ours = prefixed(layers=2, sites=["decoder_self"])
    with torch.no_grad():  # peft gives layers 0 and 1 of a 2-layer decoder the same slot
        table = ours.prompt_encoder.embedding.weight
        half = table.shape[1] // 2
        table[:, half:] = table[:, :half]
    theirs = peft_twin(ours, 2)
    batch = inputs()
    torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=1e-5, atol=1e-5)


@needs_routing
@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def testprefix_position_bias_is_t5s_bias_in_the_shifted_frame(stack: str) -> None:
    model = prefixed(sites=["encoder_self", "decoder_self"], n=5)
    layer = getattr(model, stack).block[1].layer[0].SelfAttention
    site = layer.__dict__["_lp_prefix"]
    owner = getattr(model, stack).block[0].layer[0].SelfAttention
    assert site.bias_owner is owner and site.causal == (stack == "decoder")
    tq, tk, n = 3, 7, 5  # decoder: 3 queries at the end of 7 cached keys; encoder: tq == tk
    tq = tk if stack == "encoder" else tq
    ours = prefix_position_bias(site, 2, tq, tk, torch.zeros(1))
    full = owner.compute_bias(tq, n + tk, past_seen_tokens=n + tk - tq)  # real tokens start at n
    torch.testing.assert_close(ours, full[..., :n])
    site.encoder.shift_positions = False
    assert torch.count_nonzero(prefix_position_bias(site, 2, tq, tk, torch.zeros(1))) == 0


@needs_routing
def test_cross_attention_prefix_equals_a_prefilled_cross_cache() -> None:
    n = 3
    ours = prefixed(sites=["cross"], n=n).double()  # float64: the two paths sum in different orders
    batch = inputs()
    out = ours(**batch).logits

    base = tiny_t5(3).double()
    enc = base.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    for i, block in enumerate(base.decoder.block):
        attn = block.layer[1].EncDecAttention
        k = attn.k(enc).view(2, -1, attn.n_heads, attn.key_value_proj_dim).transpose(1, 2)
        v = attn.v(enc).view(2, -1, attn.n_heads, attn.key_value_proj_dim).transpose(1, 2)
        pk, pv = ours.prompt_encoder.layer_kv(i).detach()
        cache.cross_attention_cache.update(
            torch.cat([pk.expand(2, -1, -1, -1), k], 2), torch.cat([pv.expand(2, -1, -1, -1), v], 2), i
        )
        cache.is_updated[i] = True
    # The cached keys are read instead of projecting encoder states: pad those (and the mask) by n rows.
    padded = torch.cat([enc.new_zeros(2, n, enc.shape[-1]), enc], dim=1)
    mask = torch.cat([torch.ones(2, n, dtype=torch.long), batch["attention_mask"]], dim=1)
    reference = base(
        encoder_outputs=(padded,),
        attention_mask=mask,
        decoder_input_ids=batch["decoder_input_ids"],
        past_key_values=cache,
        use_cache=True,
    ).logits
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-10)


@needs_routing
def test_all_sites_by_default_and_kv_cache_generation_equals_recompute() -> None:
    model = prefixed().double()  # float64: cached and full recompute sum in different orders
    sites = sorted(m.__dict__["_lp_prefix"].index for m in model.modules() if "_lp_prefix" in m.__dict__)
    assert sites == list(range(9))  # 3 encoder self + 3 decoder self + 3 cross
    enc = {k: v for k, v in inputs().items() if k != "decoder_input_ids"}
    gen = dict(max_new_tokens=5, do_sample=False)
    cached = model.generate(**enc, **gen, use_cache=True)
    assert torch.equal(cached, model.generate(**enc, **gen, use_cache=False))
    steps = model.generate(**enc, **gen, output_logits=True, return_dict_in_generate=True).logits
    full = model(**enc, decoder_input_ids=cached[:, :-1]).logits[:, -1]
    torch.testing.assert_close(steps[-1], full.float(), rtol=1e-6, atol=1e-6)  # generate returns fp32


@needs_routing
def test_disabled_prefix_gives_the_base_model() -> None:
    model, base = prefixed().double(), tiny_t5(3).double()  # float64: the paths sum in different orders
    batch = inputs()
    with lp.disable_adapters(model):
        torch.testing.assert_close(model(**batch).logits, base(**batch).logits, rtol=1e-10, atol=1e-10)
    assert (model(**batch).logits - base(**batch).logits).abs().max() > 0.1


@needs_routing
def test_peft_export_and_import_round_trip(tmp_path) -> None:
    ours = prefixed(sites=["decoder_self"])
    batch = inputs()
    export_peft(ours, tmp_path / "odd")
    loaded = peft.PeftModel.from_pretrained(tiny_t5(3), tmp_path / "odd").eval()
    torch.testing.assert_close(ours(**batch).logits, loaded(**batch).logits, rtol=1e-5, atol=1e-5)

    theirs = peft_twin(ours, 3)
    theirs.save_pretrained(tmp_path / "from_peft")
    back = tiny_t5(3)
    import_peft(back, tmp_path / "from_peft")
    torch.testing.assert_close(back(**batch).logits, ours(**batch).logits, rtol=1e-5, atol=1e-5)

    even = prefixed(layers=2, sites=["decoder_self"])
    with pytest.raises(ValueError, match=r"layers 0 and 1 the same prefix"):
        export_peft(even, tmp_path / "even")
    with pytest.raises(ValueError, match=r"decoder's self-attention only.*sites=\[\"decoder_self\"\]"):
        export_peft(prefixed(), tmp_path / "all")


@needs_routing
def test_bad_sites_are_refused() -> None:
    with pytest.raises(ValueError, match=r"sites='cross' is not valid|non-empty list"):
        PrefixTuningConfig(sites="cross")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'decoder' is not valid \(did you mean 'decoder_self'"):
        PrefixTuningConfig(sites=["decoder"])
    with pytest.raises(ValueError, match="twice"):
        PrefixTuningConfig(sites=["cross", "cross"])
    with pytest.raises(ValueError, match="applies to encoder-decoder models"):
        from tests.models import tiny_model

        lp.inject(tiny_model("bert"), PrefixTuningConfig(sites=["cross"]))


@pytest.mark.skipif(T5_ROUTES, reason="this transformers routes T5 attention through AttentionInterface")
def test_old_transformers_refuse_t5_clearly() -> None:  # pragma: no cover - run by make test-compat
    with pytest.raises(ValueError, match="does not run through AttentionInterface"):
        lp.inject(tiny_t5(2), PrefixTuningConfig())
