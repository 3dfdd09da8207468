"""`SFTData`: bad input, truncation warnings, collation, length-grouped resumable order, the bundled task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_peft.tasks import SFTData
from lightning_peft.tasks.chat_format import IGNORE_INDEX, encode_chat, read_chat_jsonl
from lightning_peft.tasks.sft_data import LengthGroupedSampler, SFTCollator
from lightning_peft.tasks.stdlib_docs import QUESTION, TRAIN_FILE, VAL_FILE
from tests.tasks.helpers import write_chat


def test_long_responses_are_truncated_with_a_count(tmp_path: Path) -> None:
    path = write_chat(tmp_path / "t.jsonl", [("q", "a" * 80), ("q", "short"), ("q", "b" * 90)])
    data = SFTData(str(path), tokenizer="bytes", max_length=40)
    with pytest.warns(UserWarning, match=r"2 of 3 conversations are longer than max_length=40 tokens"):
        data.setup("fit")
    whole = encode_chat(data.tokenizer, read_chat_jsonl(path)[1], max_length=10_000)
    assert len(whole.input_ids) < 40
    assert [len(e.input_ids) for e in data.datasets["train"]] == [40, len(whole.input_ids), 40]
    assert data.datasets["train"][1].input_ids == whole.input_ids


def test_conversations_left_without_a_response_token_are_dropped(tmp_path: Path) -> None:
    path = write_chat(tmp_path / "t.jsonl", [("x" * 60, "a"), ("q", "ok")])
    data = SFTData(str(path), tokenizer="bytes", max_length=40)
    with pytest.warns(UserWarning, match=r"1 of 2 .* \(1 of them kept no response token and were dropped\)"):
        data.setup("fit")
    assert len(data.datasets["train"]) == 1


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl has no examples"):
        SFTData(str(path), tokenizer="bytes").setup("fit")


def test_all_truncated_away_is_an_error(tmp_path: Path) -> None:
    path = write_chat(tmp_path / "t.jsonl", [("x" * 60, "a")])
    with pytest.raises(ValueError, match="no conversation keeps a response token"), pytest.warns(UserWarning):
        SFTData(str(path), tokenizer="bytes", max_length=30).setup("fit")


def test_tokenizer_without_chat_template_is_refused() -> None:
    with pytest.raises(ValueError, match="no chat template; pass chat_template="):
        SFTData(tokenizer="bytes", chat_template="")


def test_collator_pads_right_for_loss_and_left_for_generation(chat_files: tuple[Path, Path]) -> None:
    data = SFTData(str(chat_files[0]), tokenizer="bytes")
    data.setup("fit")
    short, long = data.datasets["train"][8], data.datasets["train"][4]  # "iota0" vs "omega0"
    assert len(short.input_ids) < len(long.input_ids) and len(short.prompt_ids) < len(long.prompt_ids)
    batch = SFTCollator(pad_token_id=256)([short, long])
    n = len(short.input_ids)
    assert batch["input_ids"].shape == (2, len(long.input_ids))
    assert batch["input_ids"][0, :n].tolist() == short.input_ids
    assert (batch["input_ids"][0, n:] == 256).all() and (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(long.input_ids) - n)
    p = len(short.prompt_ids)
    assert batch["prompt_ids"][0, -p:].tolist() == short.prompt_ids
    assert batch["prompt_mask"][0].sum() == p and batch["prompt_mask"][0, -1] == 1
    assert batch["references"] == [short.reference, long.reference]


def test_length_grouped_order_is_a_seeded_permutation_with_less_padding() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (203,), generator=g).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3, group=10)
    order = list(sampler)
    assert sorted(order) == list(range(203))
    assert order == list(sampler)  # same epoch, same order
    sampler.epoch = 1
    assert list(sampler) != order

    def padding(idx: list[int]) -> int:
        batches = [idx[i : i + 8] for i in range(0, len(idx), 8)]
        return sum(max(lengths[j] for j in b) * len(b) - sum(lengths[j] for j in b) for b in batches)

    shuffled = torch.randperm(203, generator=torch.Generator().manual_seed(3)).tolist()
    assert padding(order) < padding(shuffled) / 3
    sampler.epoch, sampler.skip = 0, 16  # resuming after two batches skips exactly them
    assert list(sampler) == order[16:]


def test_bundled_task_splits_share_no_function_and_no_docstring() -> None:
    train, val = read_chat_jsonl(TRAIN_FILE), read_chat_jsonl(VAL_FILE)
    assert len(train) > 500 and len(val) > 80
    answers = [{c[-1]["content"] for c in split} for split in (train, val)]
    docs = [{c[0]["content"] for c in split} for split in (train, val)]
    assert not answers[0] & answers[1] and not docs[0] & docs[1]
    for conversation in train + val:
        question, answer = conversation[0]["content"], conversation[-1]["content"]
        assert question.startswith(QUESTION)
        assert answer.rsplit(".", 1)[-1].lower() not in question.lower().split()  # the docstring hides it


def test_bundled_task_is_real_stdlib_api() -> None:
    """Every answer resolves to a function of this interpreter's standard library whose docstring is used."""
    import importlib
    import inspect

    checked = 0
    for conversation in read_chat_jsonl(VAL_FILE):
        module_name, name = conversation[-1]["content"].rsplit(".", 1)
        try:
            obj = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError):
            continue  # another Python version may lack it
        docstring = conversation[0]["content"].split("\n\n", 1)[1]
        assert callable(obj)
        assert docstring in " ".join((inspect.getdoc(obj) or "").split()), conversation[-1]["content"]
        checked += 1
    assert checked > 50


def test_bundled_task_is_the_default() -> None:
    data = SFTData(tokenizer="bytes", max_length=512)
    assert data.paths == {"train": str(TRAIN_FILE), "val": str(VAL_FILE)}
    line = json.loads(TRAIN_FILE.read_text().splitlines()[0])
    assert line["messages"][1]["role"] == "assistant"
