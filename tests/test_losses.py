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


@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_agree_and_stay_finite_for_huge_margins(name):
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
