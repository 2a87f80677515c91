"""PromptTrainer's private Trainer overrides are the listed ones and still match transformers."""

import inspect

import pytest
from transformers import Seq2SeqTrainer, Trainer

from chatglm_ptuning.trainer import PRIVATE_TRAINER_OVERRIDES, PRIVATE_TRAINER_USES, PromptTrainer

LISTED = {name for name, _ in PRIVATE_TRAINER_OVERRIDES}


def _parameter_names(function) -> list[str]:  # noqa: ANN001
    return list(inspect.signature(function).parameters)


def test_every_listed_override_has_a_reason_and_is_defined_by_prompt_trainer():
    assert len(LISTED) == len(PRIVATE_TRAINER_OVERRIDES)
    for name, reason in PRIVATE_TRAINER_OVERRIDES:
        assert reason.strip(), name
        assert name in vars(PromptTrainer), f"{name} is listed but PromptTrainer no longer overrides it"


@pytest.mark.parametrize("name", sorted(LISTED))
def test_listed_override_exists_in_transformers_with_the_same_parameters(name):
    assert hasattr(Seq2SeqTrainer, name), f"transformers' Trainer has no {name} any more"
    ours = _parameter_names(vars(PromptTrainer)[name])
    theirs = _parameter_names(getattr(Seq2SeqTrainer, name))
    assert ours == theirs, f"{name}: PromptTrainer expects {ours}, transformers has {theirs}"


def test_no_unlisted_private_override():
    shadowing = {
        name for name in vars(PromptTrainer)
        if name.startswith("_") and not name.startswith("__") and hasattr(Seq2SeqTrainer, name)
    }
    assert shadowing == LISTED, f"unlisted: {sorted(shadowing - LISTED)}; listed but not overridden: {sorted(LISTED - shadowing)}"


def test_public_overrides_keep_transformers_parameters():
    for name, member in vars(PromptTrainer).items():
        if name.startswith("_") or not callable(member) or not hasattr(Seq2SeqTrainer, name):
            continue
        assert _parameter_names(member) == _parameter_names(getattr(Seq2SeqTrainer, name)), name


@pytest.mark.parametrize("name", [name for name, _ in PRIVATE_TRAINER_USES])
def test_private_members_used_still_exist(name):
    if hasattr(Seq2SeqTrainer, name):
        return
    # an instance attribute the training loop sets
    source = inspect.getsource(Trainer)
    assert f"self.{name} =" in source, f"transformers' Trainer no longer sets {name}"
