"""The digest that shows a distillation's frozen teacher never moved
(``pipeline.train.distill_teacher.weights_digest``): the driver's param, each checkpoint's meta."""

from __future__ import annotations

import torch

from pipeline.train.distill_teacher import weights_digest


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"blocks.0.weight": torch.randn(4, 3), "norm.bias": torch.zeros(3)}


def test_equal_weights_give_one_digest_whatever_the_key_order():
    state = _state()
    reordered = dict(reversed(list(state.items())))
    assert weights_digest(state) == weights_digest(reordered)
    assert len(weights_digest(state)) == 64


def test_any_change_of_value_name_dtype_or_shape_changes_it():
    base = weights_digest(_state())
    moved = _state()
    moved["blocks.0.weight"][1, 2] += 1e-6  # one optimiser step's worth
    renamed = {("x." + k): v for k, v in _state().items()}
    halved = {k: v.to(torch.bfloat16) for k, v in _state().items()}
    retyped = {k: v.view(torch.int32) for k, v in _state().items()}  # the same bytes
    reshaped = {k: v.reshape(-1) for k, v in _state().items()}  # the same bytes
    digests = {weights_digest(s) for s in (moved, renamed, halved, retyped, reshaped)}
    assert base not in digests and len(digests) == 5
