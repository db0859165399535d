import math

import pytest
import torch

from spin_core.loss import reward_metrics, reward_sums, sft_loss, spin_loss


def test_spin_loss_matches_worked_numbers():
    # Pair 1: policy raised log p(y) by 2 and lowered log p(y') by 3 against the opponent.
    # Pair 2: the reverse: policy prefers the generated response.
    policy_real = torch.tensor([-10.0, -20.0])
    policy_generated = torch.tensor([-15.0, -4.0])
    opponent_real = torch.tensor([-12.0, -18.0])
    opponent_generated = torch.tensor([-12.0, -6.0])

    loss, real_reward, generated_reward = spin_loss(
        policy_real, policy_generated, opponent_real, opponent_generated, beta=0.1
    )

    # real rewards 0.1*(2) = 0.2 and 0.1*(-2) = -0.2; generated rewards -0.3 and 0.2
    assert real_reward.tolist() == pytest.approx([0.2, -0.2])
    assert generated_reward.tolist() == pytest.approx([-0.3, 0.2])
    # margins 0.5 and -0.4: loss = mean(log(1+e^-0.5), log(1+e^0.4))
    expected = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(0.4))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_beta_scales_the_margin_inside_the_logistic():
    args = [torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])]
    # margin = beta * (1 - (-1)) = 2 beta
    for beta in (0.1, 1.0, 5.0):
        loss, _, _ = spin_loss(*args, beta=beta)
        assert loss.item() == pytest.approx(math.log1p(math.exp(-2 * beta)), abs=1e-6)


def test_policy_equal_to_opponent_gives_log2_and_zero_rewards():
    logps = torch.tensor([-5.0, -7.0, -1.0])
    loss, real_reward, generated_reward = spin_loss(logps, logps * 2, logps, logps * 2, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert real_reward.abs().max().item() == 0
    assert generated_reward.abs().max().item() == 0


def test_gradient_pushes_real_up_and_generated_down():
    policy_real = torch.tensor([-4.0], requires_grad=True)
    policy_generated = torch.tensor([-4.0], requires_grad=True)
    loss, _, _ = spin_loss(
        policy_real, policy_generated, torch.tensor([-4.0]), torch.tensor([-4.0]), beta=1.0
    )
    loss.backward()
    assert policy_real.grad.item() == pytest.approx(-0.5)
    assert policy_generated.grad.item() == pytest.approx(0.5)


def test_nonpositive_beta_is_refused():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="beta"):
        spin_loss(x, x, x, x, beta=0.0)


def test_sft_loss_is_token_averaged_nll():
    assert sft_loss(torch.tensor([-6.0, -2.0]), torch.tensor([3, 1])).item() == pytest.approx(2.0)


def test_sft_anchor_adds_exactly_alpha_times_the_per_token_nll():
    """Worked numbers: real log-probs −6 (3 tokens) and −2 (1 token): NLL = 8/4 = 2 nats/token."""
    from spin_core.loss import spin_sft_loss

    args = (
        torch.tensor([-6.0, -2.0]),  # policy real
        torch.tensor([-5.0, -3.0]),  # policy generated
        torch.tensor([-6.5, -2.5]),  # opponent real
        torch.tensor([-4.0, -3.0]),  # opponent generated
        torch.tensor([3, 1]),  # real token counts
    )
    paper, _, _ = spin_loss(*args[:4], beta=0.1)
    # margins: 0.1·(0.5 + 1.0) = 0.15 and 0.1·(0.5 − 0) = 0.05
    expected = (math.log1p(math.exp(-0.15)) + math.log1p(math.exp(-0.05))) / 2
    assert paper.item() == pytest.approx(expected, abs=1e-6)
    anchored, nll, _, _ = spin_sft_loss(*args, beta=0.1, sft_weight=0.5)
    assert nll.item() == pytest.approx(2.0)
    assert anchored.item() == pytest.approx(expected + 0.5 * 2.0, abs=1e-6)
    plain, _, _, _ = spin_sft_loss(*args, beta=0.1, sft_weight=0.0)
    assert torch.equal(plain, paper)  # α = 0 is the paper's loss bit for bit
    with pytest.raises(ValueError, match="sft_weight"):
        spin_sft_loss(*args, beta=0.1, sft_weight=-1.0)


def test_reward_metrics_count_ties_as_neither_won_nor_lost_and_add_up_across_batches():
    """One rule for training's steps (torch, summed over micro-batches and ranks) and the
    held-out evaluation (NumPy): margin and accuracy over the pairs that differ."""
    import numpy as np

    real = np.array([1.0, 0.5, 0.0, -1.0])
    generated = np.array([0.0, 1.0, 0.0, -2.0])
    tie = np.array([False, False, True, False])  # the third pair: y' = y
    whole = reward_metrics(reward_sums(real, generated, tie))
    assert whole == {
        "real_reward": 0.125,
        "generated_reward": -0.25,
        "margin": pytest.approx((1.0 - 0.5 + 1.0) / 3),
        "reward_accuracy": pytest.approx(2 / 3),
        "ties": 0.25,
    }
    halves = [
        reward_sums(torch.tensor(real[s]), torch.tensor(generated[s]), torch.tensor(tie[s]))
        for s in (slice(0, 2), slice(2, 4))
    ]
    summed = {key: halves[0][key] + halves[1][key] for key in halves[0]}
    assert reward_metrics(summed) == pytest.approx(whole)
    all_ties = reward_metrics(reward_sums(real, real, np.ones(4, dtype=bool)))
    assert (all_ties["reward_accuracy"], all_ties["margin"], all_ties["ties"]) == (None, 0.0, 1.0)
