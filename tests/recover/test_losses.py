"""Recovery losses against hand-computed values, and the student -> teacher layer mapping."""

from __future__ import annotations

import math

import pytest
import torch

from vlmprune.config import parse_losses
from vlmprune.errors import VlmpruneError
from vlmprune.planning.plan import PruningPlan
from vlmprune.recover.losses import hidden_mse, layer_map, logit_kd, next_token, sft_loss


def test_sft_is_cross_entropy_per_answer_token():
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, 1.0]],
                           [[math.log(4.0), 0.0], [0.0, 0.0]]])  # [B=2, K=2, V=2]
    targets = torch.tensor([[1, -100], [0, 1]])
    # p(1) = 3/4; p(0) = 4/5; p(1) = 1/2; three tokens, not two rows
    expected = -(math.log(3 / 4) + math.log(4 / 5) + math.log(1 / 2)) / 3
    assert sft_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_logit_kd_is_kl_of_softened_distributions_times_t_squared():
    teacher = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])  # [1, 2, 2]
    student = torch.tensor([[[0.0, 2.0], [9.0, -9.0]]])
    mask = torch.tensor([[True, False]])  # the second position is padding: it must not count
    t = 2.0
    p = [math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1)]  # softmax([2, 0] / 2)
    q = [p[1], p[0]]  # softmax([0, 2] / 2)
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert logit_kd(student, teacher, mask, t).item() == pytest.approx(kl * t * t, rel=1e-6)
    assert logit_kd(student, teacher, mask, 1.0).item() == pytest.approx(
        sum(a * math.log(a / b) for a, b in zip(torch.softmax(teacher[0, 0], -1).tolist(),
                                                 torch.softmax(student[0, 0], -1).tolist())), rel=1e-6)


def test_kd_normalises_per_selected_token_not_per_batch():
    student = torch.zeros(2, 3, 4)
    teacher = torch.zeros(2, 3, 4)
    teacher[0, 0, 0] = 10.0  # one differing token of three selected
    mask = torch.tensor([[True, True, False], [True, False, False]])
    one = logit_kd(student[:1, :1], teacher[:1, :1], mask[:1, :1], 2.0)
    assert logit_kd(student, teacher, mask, 2.0).item() == pytest.approx(one.item() / 3, rel=1e-6)


def test_hidden_mse_masks_padding_and_prompt_and_normalises_per_token():
    s = torch.zeros(2, 3, 2)
    t = torch.zeros(2, 3, 2)
    t[0, 0] = torch.tensor([1.0, 3.0])  # student outputs zeros: relative error 1 (a prompt token)
    t[0, 1] = torch.tensor([2.0, 0.0])
    # error (1 + 0) / 2 = 0.5 over teacher square (4 + 0) / 2 = 2: 0.25 (an answer token)
    s[0, 1] = torch.tensor([1.0, 0.0])
    t[0, 2] = torch.tensor([100.0, 100.0])
    s[0, 2] = torch.tensor([110.0, 90.0])  # a massive activation: error 100 / 10000 = 0.01
    t[1, 2] = torch.tensor([100.0, 100.0])  # padding: never counts
    real = torch.tensor([[True, True, True], [True, True, False]])
    answer = torch.tensor([[False, True, False], [False, True, False]])
    assert hidden_mse([s], [t], real).item() == pytest.approx((1 + 0.25 + 0.01) / 5, rel=1e-5)
    assert hidden_mse([s], [t], answer).item() == pytest.approx(0.25 / 2, rel=1e-5)
    # layers count equally: the mean of the per-layer losses
    assert hidden_mse([s, s], [t, s], real).item() == pytest.approx((1 + 0.25 + 0.01) / 5 / 2, rel=1e-5)


def test_losses_are_exactly_zero_for_identical_inputs():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert logit_kd(x, x.clone(), mask, 2.0).item() == 0.0
    assert hidden_mse([x], [x.clone()], mask).item() == 0.0


def test_nothing_selected_gives_zero_not_nan():
    x = torch.randn(1, 2, 3, requires_grad=True)
    none = torch.zeros(1, 2, dtype=torch.bool)
    for loss in (logit_kd(x, x + 1, none), hidden_mse([x], [x + 1], none), sft_loss(x, torch.full((1, 2), -100))):
        assert loss.item() == 0.0
        loss.backward()  # still part of the graph


def test_next_token_moves_masks_left():
    mask = torch.tensor([[False, False, True, True, False]])
    assert next_token(mask).tolist() == [[False, True, True, False, False]]


def test_layer_map_after_dropping_layers_1_and_3_of_6():
    plan = PruningPlan(drop_layers=[1, 3])
    assert layer_map(4, 6, plan, "all") == [(0, 0), (1, 2), (2, 4), (3, 5)]
    assert layer_map(4, 6, plan, "last") == [(3, 5)]
    assert layer_map(4, 6, plan, "2,1") == [(1, 2), (2, 4)]
    assert layer_map(4, 4, None, "all") == [(0, 0), (1, 1), (2, 2), (3, 3)]  # width-only: identity
    assert layer_map(4, 4, PruningPlan(layers={0: {"mlp_channels": [0]}}), "last") == [(3, 3)]


@pytest.mark.parametrize("args, match", [
    ((4, 6, None, "all"), "no pruning_plan.json"),
    ((4, 6, None, "last"), "no pruning_plan.json"),
    ((3, 6, PruningPlan(drop_layers=[1, 3]), "all"), "not the model this student was pruned from"),
    ((4, 6, PruningPlan(drop_layers=[1, 3]), "0,4"), "layers 0..3"),
    ((4, 6, PruningPlan(drop_layers=[1, 3]), "first"), "all, last or"),
])
def test_layer_map_errors(args, match):
    with pytest.raises(VlmpruneError, match=match):
        layer_map(*args)


def test_parse_losses():
    assert parse_losses("sft=0.5, logits=0.5") == {"sft": 0.5, "logits": 0.5}
    assert parse_losses({"sft": 1, "hidden": 0}) == {"sft": 1.0}
    for bad, match in (("kd=1", "unknown loss"), ("sft", "NAME=WEIGHT"), ("sft=x", "not a number"),
                       ("sft=-1", "finite numbers >= 0"), ("sft=inf", "finite numbers >= 0"),
                       ("sft=nan", "finite numbers >= 0"), ("sft=1,sft=2", "names 'sft' twice"), ("sft=0", "no loss")):
        with pytest.raises(VlmpruneError, match=match):
            parse_losses(bad)
