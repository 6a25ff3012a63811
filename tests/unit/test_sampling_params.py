"""SamplingParams validation and normalisation (no torch)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from qalora_runtime.sampling_params import MAX_LOGPROBS, SamplingParams


def test_defaults_are_valid_and_not_greedy() -> None:
    p = SamplingParams()
    assert p.n == 1 and p.max_tokens == 16 and p.top_k == -1
    assert not p.greedy
    assert p.stop == () and p.stop_token_ids == ()


def test_greedy_is_temperature_zero() -> None:
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.0).greedy
    assert not SamplingParams(temperature=0.5).greedy


def test_tiny_temperature_is_raised_not_rejected() -> None:
    assert SamplingParams(temperature=1e-6).temperature == pytest.approx(1e-2)


def test_normalisations() -> None:
    p = SamplingParams(top_k=0, stop="###", stop_token_ids=[2, 7], logit_bias={"5": 1.5, 9: -100})
    assert p.top_k == -1
    assert p.stop == ("###",) and p.stop_strings == ("###",)
    assert p.stop_token_ids == (2, 7) and p.stop_token_id_set == frozenset({2, 7})
    assert p.logit_bias == {5: 1.5, 9: -100.0}
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


def test_frozen_and_replace_revalidates() -> None:
    p = SamplingParams(max_tokens=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.max_tokens = 6  # type: ignore[misc]
    assert p.replace(max_tokens=8).max_tokens == 8
    with pytest.raises(ValueError, match="max_tokens"):
        p.replace(max_tokens=0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 0}, "n"),
        ({"n": True}, "n"),
        ({"n": 1.0}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"min_p": -0.01}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": 2.01}, "presence_penalty"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"logit_bias": {1: 101}}, "logit_bias"),
        ({"logit_bias": {-1: 1}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
        ({"seed": 1.5}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"stop_token_ids": [-1]}, "stop token"),
        ({"stop_token_ids": "12"}, "stop_token_ids"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"skip_special_tokens": "yes"}, "skip_special_tokens"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_p": 1.0, "top_k": 1, "min_p": 1.0},
        {"presence_penalty": -2, "frequency_penalty": 2, "repetition_penalty": 5.0},
        {"logprobs": 0},
        {"logprobs": MAX_LOGPROBS},
        {"max_tokens": None, "min_tokens": 100},
        {"min_tokens": 4, "max_tokens": 4},
        {"seed": 0},
        {"seed": -(2**63)},
        {"n": 4, "temperature": 0.8, "seed": 1},
    ],
)
def test_boundary_values_are_accepted(kwargs: dict) -> None:
    SamplingParams(**kwargs)
