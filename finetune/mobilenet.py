"""Configurable MobileNetV2 through timm's EfficientNet builder, with the seed paper's "standard" and "reduced" tables.

Built as a timm ``EfficientNet`` from a block table (one ``(t, c, n, s)`` row per stage: expansion, output channels,
repeats, stride of the first block), so layer groups, freezing and checkpoints work as for timm's own
``mobilenetv2_*``. A row with ``t = 1`` is timm's depthwise-separable block (no expansion conv), as in Sandler et
al.'s first stage.

The paper ("MobileNetV2: same but better", ../shared/seeds) has two tables. Where its own numbers disagree, the
block table is followed:

- **standard** (224 input): stem 32/2, then (1,16,1,1), (6,24,2,2), (6,32,4,2), (6,64,4,2), (6,96,3,1),
  (6,160,3,2), (6,320,1,1), head 1x1 conv to 1280. The table lists a downsample block plus 3 identity blocks at
  32 channels (4 blocks; Sandler et al. have 3), so 18 blocks, while the text says 17; it also prints a
  "global avg pool ... 256" row after the 1280-channel head, which no layer implements, and 4,278,048 parameters,
  which this table does not give (that count is checked and reported, not matched).
- **reduced** (32x32 input, down to 8x8): stem 32/2, then (6,64,4,1), (6,96,3,2), (6,160,3,1), head 1x1 conv to 256.

BN momentum is PyTorch's (the weight of the new batch): the paper's Keras momentum 0.99 is 0.01 here; its epsilon is
1e-3.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from timm.layers import get_act_layer
from timm.models._efficientnet_builder import decode_arch_def, round_channels
from timm.models.efficientnet import EfficientNet
from torch import nn

Row = tuple[float, int, int, int]

PRESETS: dict[str, dict[str, Any]] = {
    "standard": {
        "blocks": [
            (1, 16, 1, 1),
            (6, 24, 2, 2),
            (6, 32, 4, 2),
            (6, 64, 4, 2),
            (6, 96, 3, 1),
            (6, 160, 3, 2),
            (6, 320, 1, 1),
        ],
        "stem": 32,
        "head": 1280,
        "input_size": 224,
    },
    "reduced": {
        "blocks": [(6, 64, 4, 1), (6, 96, 3, 2), (6, 160, 3, 1)],
        "stem": 32,
        "head": 256,
        "input_size": 32,
    },
}
MODEL_NAMES = {"mobilenetv2_standard": "standard", "mobilenetv2_reduced": "reduced"}


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def arch_def(blocks: list[Row], expansion: float | list[float] | None = None) -> list[list[str]]:
    """Block strings in timm's notation; ``expansion`` overrides every row's ``t`` (one value or one per row)."""
    if isinstance(expansion, list) and len(expansion) != len(blocks):
        raise ValueError(f"expansion has {len(expansion)} values for {len(blocks)} block rows")
    out = []
    for i, (t, c, n, s) in enumerate(blocks):
        if expansion is not None:
            t = expansion[i] if isinstance(expansion, list) else expansion
        if t == 1:
            out.append([f"ds_r{n}_k3_s{s}_c{c}"])
        else:
            out.append([f"ir_r{n}_k3_s{s}_e{_fmt(t)}_c{c}"])
    return out


def mobilenetv2(
    num_classes: int = 1000,
    preset: str = "standard",
    width: float = 1.0,
    blocks: list[Row] | None = None,
    expansion: float | list[float] | None = None,
    stem: int | None = None,
    head: int | None = None,
    output_stride: int = 32,
    bn_momentum: float = 0.1,
    bn_eps: float = 1e-5,
    act: str = "relu6",
    drop_rate: float = 0.0,
    in_chans: int = 3,
    drop_path_rate: float = 0.0,
) -> EfficientNet:
    """A MobileNetV2 from a preset and overrides.

    Args:
        num_classes: Classifier outputs.
        preset: ``standard`` or ``reduced`` (the paper's tables).
        width: Channel multiplier (channels rounded to multiples of 8, as timm does).
        blocks: ``(t, c, n, s)`` rows replacing the preset's.
        expansion: One ``t`` for every row, or one per row.
        stem: Stem channels (before ``width``).
        head: Channels of the final 1x1 conv (kept at least this wide when ``width > 1``, as in timm).
        output_stride: 32, 16 or 8; below 32 the last strides become dilations (the blog's dilated variant).
        bn_momentum: PyTorch BN momentum (Keras 0.99 = 0.01 here).
        bn_eps: BN epsilon.
        act: Activation name known to timm (``relu6``, ``relu``, ``silu``, ``hard_swish``...).
        drop_rate: Dropout before the classifier.
        in_chans: Input channels.
        drop_path_rate: Stochastic depth of the residual blocks (timm's rate, growing linearly with depth).

    Returns:
        A timm ``EfficientNet``.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, not {preset!r}")
    p = PRESETS[preset]
    rows = [tuple(r) for r in (blocks or p["blocks"])]
    round_fn = partial(round_channels, multiplier=width)
    head_ch = head or p["head"]
    return EfficientNet(
        block_args=decode_arch_def(arch_def(rows, expansion)),
        num_classes=num_classes,
        num_features=max(head_ch, round_fn(head_ch)),
        in_chans=in_chans,
        stem_size=stem or p["stem"],
        output_stride=output_stride,
        act_layer=get_act_layer(act),
        norm_layer=partial(nn.BatchNorm2d, momentum=bn_momentum, eps=bn_eps),
        round_chs_fn=round_fn,
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
    )
