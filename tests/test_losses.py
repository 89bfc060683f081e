import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from finetune.errors import UserError
from finetune.losses import FocalLoss, auto_pos_weight, create_loss


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 2.0), (0.5, 0.0), (-1.0, 1.5), (0.9, 3.0)])
def test_focal_matches_torchvision(alpha: float, gamma: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 9, generator=g) * 4
    targets = (torch.rand(64, 9, generator=g) < 0.2).float()
    ours = FocalLoss(alpha, gamma)(logits, targets)
    ref = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="mean")
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


def test_focal_gamma0_alpha_off_is_bce() -> None:
    logits, targets = torch.randn(10, 3), (torch.rand(10, 3) > 0.5).float()
    torch.testing.assert_close(FocalLoss(-1, 0)(logits, targets), F.binary_cross_entropy_with_logits(logits, targets))


def test_bce_pos_weight_against_formula() -> None:
    logits, targets = torch.randn(32, 4), (torch.rand(32, 4) > 0.7).float()
    w = [1.0, 2.0, 5.0, 0.5]
    loss = create_loss("bce", 4, w)(logits, targets)
    p = torch.sigmoid(logits.double())
    ref = -(torch.tensor(w, dtype=torch.double) * targets * torch.log(p) + (1 - targets) * torch.log(1 - p)).mean()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


def test_auto_pos_weight() -> None:
    targets = np.zeros((100, 3), np.float32)
    targets[:10, 0] = 1  # 10 positives, 90 negatives -> 9
    targets[:, 1] = 1  # all positive -> clipped up to 1
    # class 2 has no positive -> 1
    np.testing.assert_allclose(auto_pos_weight(targets).numpy(), [9.0, 1.0, 1.0])
    targets[:1, 2] = 1  # 1 vs 99 -> clipped to max
    assert auto_pos_weight(targets, max_weight=50)[2] == 50


def test_pos_weight_list_must_match_classes() -> None:
    with pytest.raises(UserError, match="loss.pos_weight: 2 values for 3 classes"):
        create_loss("bce", 3, [1.0, 2.0])


def test_losses_stay_finite_on_fp16_logits_cast_to_fp32() -> None:
    # What the trainer does: logits from an fp16 autocast region, loss computed on .float() of them.
    logits = torch.tensor([[-30.0, 30.0, 0.0]], dtype=torch.float16)
    targets = torch.tensor([[1.0, 0.0, 1.0]])
    for loss in (FocalLoss(), create_loss("bce", 3)):
        assert torch.isfinite(loss(logits.float(), targets))


@pytest.mark.parametrize(("gamma_neg", "gamma_pos", "clip"), [(4.0, 1.0, 0.05), (2.0, 0.0, 0.0), (0.0, 0.0, 0.1)])
def test_asl_matches_timm(gamma_neg: float, gamma_pos: float, clip: float) -> None:
    from timm.loss import AsymmetricLossMultiLabel

    torch.manual_seed(0)
    logits = torch.randn(16, 7) * 3
    targets = (torch.rand(16, 7) < 0.3).float()
    ours = create_loss("asl", 7, gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip)(logits, targets)
    ref = AsymmetricLossMultiLabel(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, reduction="sum")
    assert ours.item() == pytest.approx(ref(logits, targets).item() / logits.numel(), rel=1e-5)
    if gamma_neg == gamma_pos == clip == 0:
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
        assert ours.item() == pytest.approx(bce.item(), rel=1e-4)
