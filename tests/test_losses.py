"""DPO/IPO/SFT losses against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fspo.train.losses import implicit_reward_accuracy, preference_loss, sft_loss

# Two pairs: (policy chosen, policy rejected, ref chosen, ref rejected)
PC = torch.tensor([-10.0, -8.0])
PR = torch.tensor([-12.0, -7.0])
RC = torch.tensor([-11.0, -8.0])
RR = torch.tensor([-11.0, -8.0])
# h = (pc - rc) - (pr - rr) = [1 - (-1), 0 - 1] = [2, -1]


def test_dpo_matches_hand_computation() -> None:
    out = preference_loss("dpo", PC, PR, RC, RR, beta=0.5)
    expected = [-math.log(1 / (1 + math.exp(-0.5 * 2))), -math.log(1 / (1 + math.exp(-0.5 * -1)))]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert out.loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.5, 0.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.5, 0.5])
    assert out.margins.tolist() == pytest.approx([1.0, -0.5])
    assert out.accuracy.item() == pytest.approx(0.5)


def test_dpo_label_smoothing() -> None:
    out = preference_loss("dpo", PC, PR, RC, RR, beta=1.0, label_smoothing=0.1)
    h = 2.0
    expected = -0.9 * math.log(1 / (1 + math.exp(-h))) - 0.1 * math.log(1 / (1 + math.exp(h)))
    assert out.losses[0].item() == pytest.approx(expected, rel=1e-6)


def test_ipo_matches_hand_computation() -> None:
    out = preference_loss("ipo", PC, PR, RC, RR, beta=0.1)  # target margin 1/(2*0.1) = 5
    assert out.losses.tolist() == pytest.approx([(2 - 5) ** 2, (-1 - 5) ** 2])
    assert out.loss.item() == pytest.approx((9 + 36) / 2)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, 0.0])


def test_ipo_minimum_at_target_margin() -> None:
    beta = 0.01
    pc = torch.tensor([50.0], requires_grad=True)
    out = preference_loss("ipo", pc, torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(0.0)
    assert pc.grad.item() == pytest.approx(0.0)


def test_rewards_are_detached_and_loss_has_grad() -> None:
    pc = PC.clone().requires_grad_()
    out = preference_loss("ipo", pc, PR, RC, RR, beta=0.1)
    assert out.loss.requires_grad and not out.chosen_rewards.requires_grad
    out.loss.backward()
    # d/dpc mean((h-5)^2) = (h-5) for each of the 2 pairs (2*(h-5)/2)
    assert pc.grad.tolist() == pytest.approx([2 - 5, -1 - 5])


def test_dispatch_rejects_unknown_loss() -> None:
    with pytest.raises(ValueError, match="unknown loss"):
        preference_loss("kto", PC, PR, RC, RR, beta=0.1)  # type: ignore[arg-type]


def test_sft_loss_pools_tokens() -> None:
    assert sft_loss(torch.tensor([-6.0, -2.0]), torch.tensor([3, 1])).item() == pytest.approx(2.0)


def test_implicit_reward_accuracy() -> None:
    assert implicit_reward_accuracy(PC, PR, RC, RR).item() == pytest.approx(0.5)
