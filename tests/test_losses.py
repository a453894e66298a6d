import math

import pytest
import torch

from coati.losses import LOSSES, get_loss, log_exp_loss, log_sig_loss


def test_log_sig_closed_form():
    c = torch.tensor([0.0, 1.0, -2.0])
    r = torch.tensor([0.0, 0.0, 1.0])
    expected = [math.log(2.0), math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(3.0))]
    assert log_sig_loss(c, r).item() == pytest.approx(sum(expected) / 3, abs=1e-6)


def test_margin_shifts_the_difference():
    c, r, m = torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([1.0])
    assert log_sig_loss(c, r, m).item() == pytest.approx(math.log(2.0), abs=1e-7)
    assert log_exp_loss(c, r, m).item() == pytest.approx(math.log(2.0), abs=1e-7)


@pytest.mark.parametrize("name", ["log_sig", "log_exp"])
def test_bradley_terry_losses_agree_and_stay_finite_for_huge_margins(name):
    fn = get_loss(name)
    diffs = torch.tensor([-1e4, -50.0, -1.0, 0.0, 1.0, 50.0, 1e4])
    c = diffs.clone().requires_grad_(True)
    r = torch.zeros_like(diffs)
    loss = fn(c, r, None)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(c.grad).all()
    # -logsigmoid(-1e4) = 1e4 exactly in fp32; mean over the 7 pairs in closed form:
    per_pair = [1e4, 50.0 + math.log1p(math.exp(-50.0)), math.log1p(math.e), math.log(2), math.log1p(math.exp(-1)),
                math.log1p(math.exp(-50.0)), 0.0]
    assert loss.item() == pytest.approx(sum(per_pair) / 7, rel=1e-6)
    # gradient d/dc of -logsigmoid(c)/7 = -sigmoid(-c)/7
    assert torch.allclose(c.grad, -torch.sigmoid(-diffs) / 7, atol=1e-7)


def test_bf16_inputs_are_computed_in_fp32():
    c = torch.tensor([3.0], dtype=torch.bfloat16)
    r = torch.tensor([1.0], dtype=torch.bfloat16)
    out = log_sig_loss(c, r)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(math.log1p(math.exp(-2.0)), abs=1e-7)


def test_unknown_loss_lists_choices():
    with pytest.raises(ValueError, match="log_sig"):
        get_loss("hinge")


# ---- InternLM2 recipe (arXiv 2403.17297, section 4.2.1): focal ranking loss, penalties, centering

from coati.config import LossArgs  # noqa: E402
from coati.losses import PENALTIES, build_loss, focal_loss, l2_penalty, log_barrier_penalty  # noqa: E402


@pytest.mark.parametrize("name", ["log_sig", "focal"])
def test_zero_scores_with_default_log_barrier_give_0_6287(name):
    fn = build_loss(LossArgs(loss_fn=name, penalty="log_barrier"))  # defaults: weight 0.02, bound 5
    z = torch.zeros(4)
    expected = math.log(2) - 0.02 * 2 * math.log(5)
    assert expected == pytest.approx(0.6287, abs=1e-4)
    assert fn(z, z, None).item() == pytest.approx(expected, abs=1e-6)


def test_focal_closed_form_and_gamma_zero_is_log_sig():
    d = torch.tensor([1.0, -0.5, 3.0])
    p = torch.sigmoid(d)
    manual = -((1 - 2 * (p - 0.5).clamp(min=0)) ** 2 * torch.log(p)).mean()
    assert focal_loss(d, torch.zeros(3)).item() == pytest.approx(manual.item(), abs=1e-6)
    # d = 1 by hand: P = 0.731059, weight = (1 - 2 * 0.231059)^2 = 0.289300, -log P = 0.313262
    assert focal_loss(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(0.289300 * 0.313262, abs=1e-5)
    r = torch.randn(16)
    c = torch.randn(16)
    assert focal_loss(c, r, gamma=0.0).item() == pytest.approx(log_sig_loss(c, r).item(), abs=1e-6)
    assert build_loss(LossArgs(loss_fn="focal", focal_gamma=0.0))(c, r, None).item() == pytest.approx(log_sig_loss(c, r).item(),
                                                                                     abs=1e-6)


def test_penalties_closed_form():
    s = torch.tensor([1.0, -2.0, 0.0, 4.0])
    assert l2_penalty(s).item() == pytest.approx((1 + 4 + 0 + 16) / 4)
    expected = -sum(math.log(5 + x) + math.log(5 - x) for x in [1.0, -2.0, 0.0, 4.0]) / 4
    assert log_barrier_penalty(s).item() == pytest.approx(expected, abs=1e-6)
    # outside the bound the scores are clamped to B - 1e-3: finite, and equal to the value at the clamp
    far = log_barrier_penalty(torch.tensor([50.0]))
    assert far.item() == pytest.approx(-(math.log(10 - 1e-3) + math.log(1e-3)), rel=1e-4)


def test_penalty_and_centering_are_added_with_their_weights():
    c, r = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    base = log_sig_loss(c, r).item()
    l2 = l2_penalty(torch.cat([c, r])).item()
    fn = build_loss(LossArgs(penalty="l2", penalty_weight=0.1, center_rewards_coefficient=0.01))
    centre = ((1.5 ** 2) + (1.0 ** 2)) / 2
    assert fn(c, r, None).item() == pytest.approx(base + 0.1 * l2 + 0.01 * centre, abs=1e-6)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("penalty", list(PENALTIES))
def test_every_combination_has_finite_gradients_up_to_1e4(name, penalty):
    fn = build_loss(LossArgs(loss_fn=name, penalty=penalty, center_rewards_coefficient=0.01))
    for scale in (1e-3, 1.0, 1e2, 1e4):
        c = torch.tensor([scale, -scale, 0.0], requires_grad=True)
        r = torch.tensor([-scale, scale, 0.0], requires_grad=True)
        loss = fn(c, r, torch.tensor([0.0, 1.0, -scale]))
        loss.backward()
        assert torch.isfinite(loss), (name, penalty, scale)
        assert torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all(), (name, penalty, scale)


def test_unknown_penalty_lists_choices():
    with pytest.raises(ValueError, match="log_barrier"):
        build_loss(LossArgs(penalty="l1"))
