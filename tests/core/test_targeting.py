"""Targeting rules and the errors a user sees for bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_peft as lp
from lightning_peft.targeting import block_index, find_modules
from tests.models import tiny_model


def test_suffix_list_regex_and_exact_names(bert: nn.Module) -> None:
    suffix = find_modules(bert, ["query", "value"])
    assert len(suffix) == 4 and all(n.endswith(("query", "value")) for n in suffix)
    regex = find_modules(bert, r"encoder\.layer\.1\.attention\.self\.(query|key)")
    assert regex == ["encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.key"]
    assert find_modules(bert, ["encoder.layer.0.output.dense"]) == ["encoder.layer.0.output.dense"]


def test_all_linear_skips_the_output_head() -> None:
    model = nn.ModuleDict({"backbone": tiny_model("bert"), "classifier": nn.Linear(32, 2)})
    names = find_modules(model, "all-linear")
    assert names and not any(n.startswith("classifier") for n in names)
    assert all(isinstance(model.get_submodule(n), nn.Linear) for n in names)


def test_exclude_and_layers(bert: nn.Module) -> None:
    names = find_modules(bert, ["query", "value"], exclude=["value"], layers=[1])
    assert names == ["encoder.layer.1.attention.self.query"]
    assert block_index("encoder.layer.11.attention.self.query") == 11


def test_unknown_target_lists_close_names(bert: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"(?s)\['qurey'\] matched no module.*'query'"):
        lp.inject(bert, lp.LoRAConfig(target_modules=["qurey"]))


def test_one_bad_entry_in_a_list_is_an_error(bert: nn.Module) -> None:
    with pytest.raises(ValueError, match="valeu"):
        lp.inject(bert, lp.LoRAConfig(target_modules=["query", "valeu"]))


def test_layer_index_without_matches(bert: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"block\(s\) \[7\]"):
        lp.inject(bert, lp.LoRAConfig(target_modules=["query"], layers=[7]))


def test_unsupported_target_type_names_leaf_layers(bert: nn.Module) -> None:
    with pytest.raises(TypeError, match=r"(?s)Bert\w*SelfAttention.*attention\.self\.query"):
        lp.inject(bert, lp.LoRAConfig(target_modules=["attention.self"]))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: lp.LoRAConfig(r=0), r"LoRAConfig\.r must be > 0"),
        (lambda: lp.LoRAConfig(r=-2), r"LoRAConfig\.r must be > 0"),
        (lambda: lp.LoRAConfig(dropout=1.5), r"dropout must be in \[0, 1\)"),
        (lambda: lp.BottleneckConfig(style="housby"), r"(?s)style='housby'.*did you mean 'houlsby'"),
        (lambda: lp.BottleneckConfig(reduction_factor=0), "reduction_factor must be > 0"),
        (lambda: lp.BitFitConfig(biases="weights"), "biases='weights' is not valid"),
        (lambda: lp.LoRAConfig(target_modules=[]), "target_modules is an empty list"),
        (lambda: lp.config_from_dict({"method": "lorra"}), "did you mean 'lora'"),
        (
            lambda: lp.config_from_dict({"method": "lora", "alhpa": 4}),
            r"(?s)unknown field.*did you mean 'alpha'",
        ),
    ],
)
def test_invalid_configs(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_injecting_twice_is_refused(bert: nn.Module) -> None:
    lp.inject(bert, lp.LoRAConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match="already has a 'lora' tuner"):
        lp.inject(bert, lp.BottleneckConfig())
    lp.unload(bert)
    lp.inject(bert, lp.BottleneckConfig())  # after unload a new tuner is fine


def test_loading_adapters_into_a_model_without_a_tuner(bert: nn.Module) -> None:
    other = tiny_model("bert")
    lp.inject(other, lp.LoRAConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match="has no tuner injected"):
        lp.load_trainable_state_dict(bert, lp.trainable_state_dict(other))


def test_loading_adapters_of_another_config(bert: nn.Module) -> None:
    other = tiny_model("bert")
    lp.inject(other, lp.LoRAConfig(r=4, target_modules=["query"]))
    lp.inject(bert, lp.LoRAConfig(r=4, target_modules=["query", "value"]))
    with pytest.raises(ValueError, match="missing from the saved weights"):
        lp.load_trainable_state_dict(bert, lp.trainable_state_dict(other))
    lp.load_trainable_state_dict(bert, lp.trainable_state_dict(other), strict=False)
    shape = {k: torch.zeros(3, 3) for k in lp.trainable_state_dict(bert)}
    with pytest.raises(ValueError, match="shape mismatch"):
        lp.load_trainable_state_dict(bert, shape)


def test_automatic_placement_outside_known_families() -> None:
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(ValueError, match="pass target_modules"):
        lp.inject(mlp, lp.BottleneckConfig())
    lp.inject(mlp, lp.BottleneckConfig(target_modules=["0"], bottleneck_size=2))
    assert lp.param_summary(mlp).trainable == 2 * 2 * 8 + 2 + 8
