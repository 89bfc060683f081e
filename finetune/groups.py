"""Layer groups of a timm EfficientNet-family model: ``stem``, ``blocks.0`` ... ``blocks.N``, ``head``, ``classifier``.

The grouping starts from timm's own ``model.group_matcher(coarse=True)`` (one group per stage of blocks). timm merges
``conv_head``/``bn2`` into the last stage's group and leaves the classifier unmatched, so those two are split out by
parameter-name prefix here: freezing "the head" and "the classifier" separately is the point of fine-tuning.

Selectors name groups in recipes: a group name, ``all``, or a slice of blocks (``blocks.3:``, ``blocks.0:4``,
``blocks.:2``; Python slice semantics over the block-stage index, negative indices allowed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from timm.models._manipulate import group_parameters
from torch import nn

from finetune.errors import UserError

# The attributes timm's EfficientNet class (MobileNetV2, EfficientNet, EfficientNet-Lite, MnasNet...) has.
_REQUIRED = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool", "classifier")
_SLICE = re.compile(r"^blocks\.(-?\d*):(-?\d*)$")


@dataclass
class LayerGroup:
    """One group: its name, position in forward order and the names of its parameters."""

    name: str
    index: int
    params: list[str] = field(default_factory=list)


def _group_name(param: str) -> str:
    if param.startswith(("conv_stem.", "bn1.")):
        return "stem"
    if param.startswith("blocks."):
        return "blocks." + param.split(".")[1]
    if param.startswith(("conv_head.", "bn2.")):
        return "head"
    return "classifier"


def check_groupable(model: nn.Module, name: str = "") -> None:
    """Raise a user error for a model without the EfficientNet layout this module groups."""
    if not hasattr(model, "group_matcher") or not all(hasattr(model, a) for a in _REQUIRED):
        label = name or type(model).__name__
        raise UserError(
            f"model.name: {label} has no stem/blocks/head/classifier layer groups; freezing stages and per-group "
            "learning rates support timm's EfficientNet family (mobilenetv2_*, efficientnet_*, efficientnet_lite*, "
            "mnasnet_*); remove [freeze] and optim.layer_decay/lr_mult to train it as a whole"
        )


def layer_groups(model: nn.Module, name: str = "") -> list[LayerGroup]:
    """The model's layer groups in forward order (stem, blocks.0..N, head, classifier)."""
    check_groupable(model, name)
    groups: dict[str, LayerGroup] = {}
    # timm's matcher gives the order (stem, stage 0..N, then what it could not match); split by prefix within it.
    for _, params in sorted(group_parameters(model, model.group_matcher(coarse=True)).items()):
        for param in params:
            gname = _group_name(param)
            groups.setdefault(gname, LayerGroup(gname, len(groups))).params.append(param)
    order = ["stem", *[f"blocks.{i}" for i in range(len(model.blocks))], "head", "classifier"]
    missing = [g for g in order if g not in groups]
    if missing:  # e.g. a block stage without parameters: never in timm's zoo, but say so rather than misgroup
        raise UserError(f"model.name: {name or type(model).__name__} has no parameters in group(s) {missing}")
    return [LayerGroup(g, i, groups[g].params) for i, g in enumerate(order)]


def resolve(selectors: list[str], groups: list[LayerGroup], key: str) -> list[str]:
    """Group names a list of selectors picks, in forward order.

    Args:
        selectors: Group names, ``all``, or block slices like ``blocks.3:``.
        groups: The model's groups.
        key: The recipe key the selectors came from, for error messages.

    Returns:
        The selected group names, in forward order, without repeats.
    """
    names = [g.name for g in groups]
    n_blocks = sum(g.name.startswith("blocks.") for g in groups)
    picked: set[str] = set()
    for sel in selectors:
        if sel == "all":
            picked.update(names)
        elif sel in names:
            picked.add(sel)
        elif m := _SLICE.match(sel):
            lo, hi = (int(x) if x else None for x in m.groups())
            chosen = [f"blocks.{i}" for i in range(n_blocks)[lo:hi]]
            if not chosen:
                raise UserError(f"{key}: {sel!r} selects no block; this model has blocks.0 to blocks.{n_blocks - 1}")
            picked.update(chosen)
        else:
            raise UserError(
                f"{key}: unknown layer group {sel!r}; expected all, stem, blocks.0 to blocks.{n_blocks - 1}, "
                "a slice like blocks.3: or blocks.0:4, head or classifier"
            )
    return [n for n in names if n in picked]


def group_of_param(groups: list[LayerGroup]) -> dict[str, str]:
    """Parameter name -> group name."""
    return {p: g.name for g in groups for p in g.params}


def group_modules(model: nn.Module, groups: list[LayerGroup]) -> dict[str, list[tuple[str, nn.Module]]]:
    """Group name -> the (name, module) pairs whose parameters all belong to it (BN layers are found here)."""
    owner = group_of_param(groups)
    out: dict[str, list[tuple[str, nn.Module]]] = {g.name: [] for g in groups}
    for mname, module in model.named_modules():
        own = [f"{mname}.{p}" if mname else p for p, _ in module.named_parameters(recurse=False)]
        if own:
            out[owner[own[0]]].append((mname, module))
    return out


def forward_fns(model: nn.Module, groups: list[LayerGroup]) -> list[nn.Module | object]:
    """One callable per group that, applied in order, equals ``model(x)`` (timm's forward_features + forward_head).

    Used to run a frozen prefix of the network under ``torch.no_grad()``.
    """
    check_groupable(model)
    fns: list = [lambda x: model.bn1(model.conv_stem(x))]
    fns += list(model.blocks)
    fns += [lambda x: model.bn2(model.conv_head(x)), model.forward_head]
    assert len(fns) == len(groups)
    return fns
