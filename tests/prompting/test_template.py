"""Template parsing, rendering against the tokenizer's own encoding of the full text, and truncation."""

from __future__ import annotations

import pytest

from lightning_peft.prompting import Template


def test_renders_like_the_tokenizer_on_the_full_text(bert_tokenizer) -> None:
    t = Template("{text} It was {mask}.")
    enc = t.encode({"text": "A lovely film!"}, bert_tokenizer, kind="masked", num_masks=2)
    expected = bert_tokenizer("A lovely film! It was [MASK] [MASK].")["input_ids"]
    assert enc.input_ids == expected
    assert enc.input_ids[enc.target : enc.target + 2] == [bert_tokenizer.mask_token_id] * 2
    assert enc.soft_index == [-1] * len(expected)


def test_two_slots_and_bpe_spaces(bpe_tokenizer) -> None:
    t = Template("{premise} Question: {hypothesis}? Answer: {answer}")
    ex = {"premise": "The plot was dull.", "hypothesis": "It was good"}
    enc = t.encode(ex, bpe_tokenizer, kind="causal")
    full = "The plot was dull. Question: It was good? Answer:"
    assert enc.input_ids == bpe_tokenizer(full, add_special_tokens=False)["input_ids"]
    assert enc.target == len(enc.input_ids)  # the answer continues the prompt
    assert enc.answer_space


def test_truncation_cuts_shortenable_slots_from_the_right_longest_first(bert_tokenizer) -> None:
    t = Template("{premise} ? {mask} , {hypothesis}")
    premise = "one two three four five six seven eight"
    hypothesis = "alpha beta gamma"
    enc = t.encode(
        {"premise": premise, "hypothesis": hypothesis}, bert_tokenizer, kind="masked", max_length=12
    )
    assert len(enc.input_ids) == 12
    text = bert_tokenizer.decode(enc.input_ids)
    # 12 - [CLS] [SEP] - "?" "[MASK]" "," = 7 slot tokens: the longer premise is cut from its right end first
    assert text == "[CLS] one two three four? [MASK], alpha beta gamma [SEP]"
    assert bert_tokenizer.mask_token_id in enc.input_ids


def test_fixed_slots_are_never_cut_and_too_long_is_an_error(bert_tokenizer) -> None:
    t = Template("{premise} ? {mask} , {hypothesis}", fixed=["hypothesis"])
    enc = t.encode(
        {"premise": "a b c d e", "hypothesis": "x y z w"}, bert_tokenizer, kind="masked", max_length=10
    )
    assert bert_tokenizer.decode(enc.input_ids) == "[CLS] a? [MASK], x y z w [SEP]"
    with pytest.raises(ValueError, match="raise max_length"):
        t.encode({"premise": "a", "hypothesis": "x y z w v u"}, bert_tokenizer, kind="masked", max_length=8)


def test_soft_tokens_are_placed_and_indexed(bert_tokenizer) -> None:
    t = Template("{soft:2} {text} {soft:it was} {mask}.")
    enc = t.encode({"text": "fine"}, bert_tokenizer, kind="masked")
    assert t.soft_counts(bert_tokenizer) == [2, 2]
    assert enc.soft_index == [-1, 0, 1, -1, 2, 3, -1, -1, -1]
    assert enc.input_ids[4:6] == bert_tokenizer.encode("it was", add_special_tokens=False)


@pytest.mark.parametrize(
    ("pattern", "match"),
    [
        ("{text} It was good.", "exactly one"),
        ("{text} {mask} {answer}", "exactly one"),
        ("{text} It was {answer}.", "must end the pattern"),
        ("{text} It was {my slot} {mask}", "not a slot name"),
        ("{text} It was {mask}. }", "unbalanced brace"),
        ("{soft:0} {mask}", "count >= 1"),
    ],
)
def test_bad_patterns(pattern: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Template(pattern)


def test_unknown_slot_and_wrong_model_kind(bert_tokenizer, bpe_tokenizer) -> None:
    with pytest.raises(KeyError, match="needs slot 'review'"):
        Template("{review} It was {mask}.").encode({"text": "x"}, bert_tokenizer, kind="masked")
    with pytest.raises(ValueError, match="only a masked LM can fill"):
        Template("{text} It was {mask}.").encode({"text": "x"}, bpe_tokenizer, kind="causal")
    with pytest.raises(ValueError, match="a masked LM cannot"):
        Template("{text} It was {answer}").encode({"text": "x"}, bert_tokenizer, kind="masked")
    with pytest.raises(ValueError, match="fixed="):
        Template("{text} {mask}", fixed=["premise"])


def test_demonstrations_follow_a_masked_query_and_precede_a_causal_one(bert_tokenizer, bpe_tokenizer) -> None:
    t = Template("{text} It was {mask}.")
    enc = t.encode(
        {"text": "ok"}, bert_tokenizer, kind="masked", demonstrations=[({"text": "bad"}, "terrible")]
    )
    assert enc.input_ids == bert_tokenizer("ok It was [MASK]. bad It was terrible.")["input_ids"]
    c = Template("{text} It was {answer}")
    enc = c.encode(
        {"text": "ok"}, bpe_tokenizer, kind="causal", demonstrations=[({"text": "bad"}, "terrible")]
    )
    expected = bpe_tokenizer("bad It was terrible ok It was", add_special_tokens=False)["input_ids"]
    assert enc.input_ids == expected and enc.target == len(expected)
