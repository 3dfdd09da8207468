"""LM-BFF demonstrations: top-50% similarity filter, one per class, seeded; averaged over sets."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_peft.prompting.demonstrations import DemonstrationSampler, SentenceEmbedder

POOL = [
    {"slots": {"text": t}, "label": y, "index": i}
    for i, (t, y) in enumerate(
        [("a", 0), ("b", 0), ("c", 0), ("d", 0), ("e", 1), ("f", 1), ("g", 1), ("h", 1), ("i", 1)]
    )
]
VECTORS = {
    c: torch.nn.functional.normalize(torch.tensor([math.cos(k), math.sin(k)]), dim=0)
    for k, c in enumerate("abcdefghiq")
}


def fake_embed(texts: list[str]) -> torch.Tensor:
    return torch.stack([VECTORS[t] for t in texts])


def test_candidates_are_the_most_similar_half_of_each_class() -> None:
    sampler = DemonstrationSampler(POOL, ["bad", "good"], embed=fake_embed, top_fraction=0.5)
    query = {"slots": {"text": "q"}, "index": 99}
    sims = {ex["slots"]["text"]: float(VECTORS[ex["slots"]["text"]] @ VECTORS["q"]) for ex in POOL}
    for label, got in enumerate(sampler.candidates(query)):
        texts = [ex["slots"]["text"] for ex in POOL if ex["label"] == label]
        keep = math.ceil(len(texts) / 2)
        expected = sorted(texts, key=lambda t: -sims[t])[:keep]
        assert sorted(POOL[i]["slots"]["text"] for i in got) == sorted(expected)
    demos = sampler.sample(query, draw=3)
    assert sorted(w for _, w in demos) == ["bad", "good"]  # one per class
    assert demos == sampler.sample(query, draw=3)  # seeded
    draws = {tuple(d["text"] for d, _ in sampler.sample(query, draw=k)) for k in range(30)}
    assert len(draws) > 1
    for k in range(30):
        for slots, _ in sampler.sample(query, draw=k):
            assert slots["text"] in {POOL[i]["slots"]["text"] for c in sampler.candidates(query) for i in c}


def test_a_training_input_is_never_its_own_demonstration() -> None:
    sampler = DemonstrationSampler(POOL[:2] + POOL[4:6], ["bad", "good"], embed=None)
    for k in range(20):
        assert all(slots["text"] != "a" for slots, _ in sampler.sample(POOL[0], draw=k, exclude_self=True))


def test_bad_pools() -> None:
    with pytest.raises(ValueError, match="non-empty pool"):
        DemonstrationSampler([], ["bad", "good"])
    with pytest.raises(ValueError, match="no demonstration candidates"):
        DemonstrationSampler(POOL[:3], ["bad", "good"])


def test_minilm_ranks_paraphrases_first() -> None:
    embed = SentenceEmbedder("minilm")
    e = embed(["The battery died after an hour.", "Battery life is very short.", "The plot was dull."])
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2])


def test_classifier_averages_log_probs_over_demonstration_sets() -> None:
    from lightning_peft.tasks.prompt_classifier import PromptClassifier
    from lightning_peft.tasks.prompt_data import PromptData

    torch.manual_seed(0)
    bert = {
        "model_type": "bert",
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "vocab_size": 30522,
        "max_position_embeddings": 128,
    }
    model = PromptClassifier(
        template="{text} It was {mask}.",
        verbalizer={"negative": ["bad"], "positive": ["good"]},
        config=bert,
        tokenizer="minilm",
        demonstrations=3,
        demo_embedding=None,
    ).eval()
    data = PromptData(shots_per_class=4, batch_size=4)
    model.set_demonstration_pool(data.train_examples())
    batch = model.on_before_batch_transfer(next(iter(data.loader(data.examples("val")[:4]))), 0)
    assert len(batch["prompt_sets"]) == 3
    mask = model.tokenizer.mask_token_id
    plain = model.encode_examples([ex["slots"] for ex in data.examples("val")[:4]])["masks_1"]
    for prompt in batch["prompt_sets"]:  # the query first (mask where it is without demos), then demos
        ids = prompt["masks_1"]["input_ids"]
        assert ((ids == mask).sum(1) == 1).all()
        assert torch.equal(prompt["masks_1"]["target"], plain["target"])
        assert (prompt["masks_1"]["attention_mask"].sum(1) > plain["attention_mask"].sum(1)).all()
    with torch.no_grad():
        expected = torch.stack([model(p).log_softmax(-1) for p in batch["prompt_sets"]]).mean(0)
        assert torch.allclose(model.eval_scores(batch), expected)
        again = model.on_before_batch_transfer(next(iter(data.loader(data.examples("val")[:4]))), 0)
        assert all(
            torch.equal(a["masks_1"]["input_ids"], b["masks_1"]["input_ids"])
            for a, b in zip(batch["prompt_sets"], again["prompt_sets"], strict=True)
        )
