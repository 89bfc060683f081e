"""Class-activation maps with pytorch-grad-cam (the ``finetune[inspect]`` extra), on a run's own model.

The target layer is chosen per architecture, not by name: the last module, in execution order, whose output is a
spatial map (``[n, c, h, w]`` with ``h * w > 1``). In timm's MobileNetV2 / EfficientNet family that is the head's
``bn2`` (the 1x1 ``conv_head`` with its BatchNorm and activation), the layer pytorch-grad-cam's own examples use for
MobileNetV2 (``model.features[-1]``); in a plain CNN it is the last convolution's activation. The pooled layer after
it is 1x1 and carries no location, so it is never chosen.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from finetune.errors import UserError

INSTALL = "pip install 'finetune[inspect]'"


def cam_missing() -> str | None:
    """Why CAMs cannot be drawn here (the extra is not installed), or None."""
    try:
        import pytorch_grad_cam  # noqa: F401
    except ImportError:
        return f"class-activation maps need pytorch-grad-cam: {INSTALL}"
    return None


@torch.no_grad()
def target_layer(model: nn.Module, image_size: int, channels: int = 3) -> tuple[str, nn.Module]:
    """The last module whose output on a ``image_size`` input is a spatial map: its name and the module.

    Raises:
        UserError: The model has no such layer (every output is flat).
    """
    order: list[tuple[str, nn.Module]] = []
    names = {m: n for n, m in model.named_modules()}

    def record(module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-1] * output.shape[-2] > 1:
            order.append((names[module], module))

    handles = [m.register_forward_hook(record) for m in model.modules() if m is not model]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, channels, image_size, image_size, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not order:
        raise UserError(f"{type(model).__name__}: no layer with a spatial output to draw class-activation maps from")
    return order[-1]


def activation_maps(model: nn.Module, inputs: torch.Tensor, classes: list[int], layer: nn.Module) -> np.ndarray:
    """Grad-CAM of each image for its class: ``[n, h, w]`` in 0..1 at the input's resolution.

    Args:
        model: The network, returning logits (the gradient is taken of the class's logit).
        inputs: Normalised images ``[n, 3, h, w]`` on the model's device.
        classes: One class index per image.
        layer: The target layer (see :func:`target_layer`).
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    was_training = model.training
    # The input requires grad (BaseCAM's compute_input_gradient, which GradCAM does not pass on): a run whose last
    # stage left the backbone, or every layer, frozen still has a gradient path from the logit to the target layer.
    x = inputs.detach().float().requires_grad_(True)
    with GradCAM(model=model, target_layers=[layer]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])
    model.train(was_training)
    return np.asarray(maps, dtype=np.float32)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """A CAM over its image: ``image`` ``[h, w, 3]`` uint8, ``heat`` ``[h, w]`` in 0..1; uint8 out (jet colours)."""
    from matplotlib import colormaps

    colour = colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
    return np.clip((1 - alpha) * image.astype(np.float32) + alpha * colour, 0, 255).astype(np.uint8)
