"""Tuner configs: validation messages, dict round trips, unknown keys, the registry."""

from __future__ import annotations

import pytest

import lightning_peft as lp
from lightning_peft.config import available_tuners, config_from_dict, get_tuner_config


def test_unknown_field_names_the_closest_one() -> None:
    with pytest.raises(ValueError, match=r"'alhpa' \(did you mean 'alpha'\?\)[\s\S]*Valid fields"):
        config_from_dict({"method": "lora", "alhpa": 8})


def test_unknown_method_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"did you mean 'lora'.*Known methods"):
        get_tuner_config("lorra")


@pytest.mark.parametrize("method", available_tuners())
def test_every_registered_config_round_trips_through_a_dict(method: str) -> None:
    from tests.tuners.test_contract import default_config

    config = default_config(method)
    again = config_from_dict(config.to_dict())
    assert type(again) is type(config) and not config.diff(again)


def test_class_path_form_of_lightning_cli() -> None:
    config = config_from_dict({"class_path": "lightning_peft.LoRAConfig", "init_args": {"r": 4}})
    assert config == lp.LoRAConfig(r=4)
    with pytest.raises(ValueError, match="cannot import"):
        config_from_dict({"class_path": "lightning_peft.NoSuchConfig"})


def test_choices_and_positivity_name_field_and_values() -> None:
    with pytest.raises(ValueError, match=r"LoRAConfig\.init='xavier'.*'kaiming', 'gaussian'"):
        lp.LoRAConfig(init="xavier")
    with pytest.raises(ValueError, match=r"LoRAConfig\.alpha must be > 0"):
        lp.LoRAConfig(alpha=0)
    with pytest.raises(ValueError, match="empty list"):
        lp.LoRAConfig(target_modules=[])
    with pytest.raises(ValueError, match="non-negative block indices"):
        lp.LoRAConfig(layers=[-1])
