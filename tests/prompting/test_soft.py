"""Soft tokens: initialised from words, trained while the base stays frozen."""

from __future__ import annotations

import torch

from lightning_peft.prompting import PromptScorer, SoftTokens, Template, Verbalizer


def test_soft_tokens_init_from_words_and_train_alone(bert_tokenizer, tiny_bert_mlm) -> None:
    template = Template("{soft:it was} {text} {soft:2} {mask}.")
    scorer = PromptScorer(template, Verbalizer({"n": ["bad"], "p": ["good"]}), bert_tokenizer, "masked")
    emb = tiny_bert_mlm.get_input_embeddings()
    soft = SoftTokens(template, bert_tokenizer, emb, seed=0)
    init_ids = bert_tokenizer.encode("it was", add_special_tokens=False)
    assert torch.equal(soft.weight[:2].detach(), emb.weight[init_ids].detach())
    assert soft.num_tokens == 4

    for p in tiny_bert_mlm.parameters():
        p.requires_grad_(False)
    base = {k: v.clone() for k, v in tiny_bert_mlm.state_dict().items()}
    start = soft.weight.detach().clone()
    batch = scorer.collate([scorer.encode({"text": "fine"}), scorer.encode({"text": "awful"})], labels=[1, 0])
    tiny_bert_mlm.train()
    opt = torch.optim.SGD(soft.parameters(), lr=1.0)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(scorer(tiny_bert_mlm, batch, soft), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(soft.weight.detach(), start)
    assert all(torch.equal(v, tiny_bert_mlm.state_dict()[k]) for k, v in base.items())


def test_soft_tokens_change_the_embeddings_only_at_their_positions(bert_tokenizer, tiny_bert_mlm) -> None:
    template = Template("{text} {soft:3} {mask}.")
    soft = SoftTokens(template, bert_tokenizer, tiny_bert_mlm.get_input_embeddings(), seed=1)
    enc = template.encode({"text": "ok"}, bert_tokenizer, kind="masked")
    ids = torch.tensor([enc.input_ids])
    index = torch.tensor([enc.soft_index])
    embeds = tiny_bert_mlm.get_input_embeddings()(ids)
    out = soft(embeds, index)
    where = index[0] >= 0
    assert torch.equal(out[0, ~where], embeds[0, ~where])
    assert torch.equal(out[0, where], soft.weight)
