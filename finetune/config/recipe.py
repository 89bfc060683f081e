"""The recipe schema: TOML -> one typed, validated config, with ``--set a.b=c`` overrides.

Unknown keys, wrong types and bad values become a single-line :class:`~finetune.errors.UserError` that names the
file, the key path and what is expected. Only the assembly (:mod:`finetune.assembly`) reads a :class:`Recipe`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from finetune.config.data import AugmentConfig, DataConfig
from finetune.config.objectives import CalibrateConfig
from finetune.config.overrides import apply_overrides, parse_override, read_toml
from finetune.config.rules import check_augment_rules, check_calibration_rules, check_model_rules, check_task_rules
from finetune.config.schema import Section
from finetune.errors import UserError

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "Recipe",
    "apply_overrides",
    "load_recipe",
    "parse_override",
    "recipe_to_dict",
    "validate_recipe",
]


_Section = Section  # the base of every section (finetune/config/schema.py)


class ArchConfig(_Section):
    """Architecture of ``model.name = "mobilenetv2_standard" | "mobilenetv2_reduced"`` (see finetune/mobilenet.py)."""

    width: float = Field(1.0, gt=0.0, description="channel multiplier")
    blocks: list[list[float]] = Field([], description="[t, c, n, s] rows replacing the preset's block table")
    expansion: float | list[float] | None = Field(None, description="t for every row, or one per row")
    stem: int = Field(0, ge=0, description="stem channels (0 = the preset's)")
    head: int = Field(0, ge=0, description="final 1x1 conv channels (0 = the preset's)")
    output_stride: Literal[8, 16, 32] = Field(
        32, description="32, 16 or 8: the later stages dilate instead of striding"
    )
    bn_momentum: float = Field(0.1, gt=0.0, lt=1.0, description="PyTorch convention: Keras 0.99 is 0.01")
    bn_eps: float = Field(1e-5, gt=0.0, description="BatchNorm epsilon")
    act: str = Field("relu6", description="activation (timm name: relu6, relu, hard_swish...)")

    @field_validator("bn_momentum")
    @classmethod
    def _momentum(cls, v: float) -> float:
        if v > 0.5:
            raise ValueError(
                f"{v} is a Keras-style value; PyTorch's momentum is the weight of the new batch, so Keras {v} is "
                f"{1 - v:.3g} here"
            )
        return v

    @field_validator("blocks")
    @classmethod
    def _blocks(cls, rows: list[list[float]]) -> list[list[float]]:
        for row in rows:
            if len(row) != 4 or any(v <= 0 for v in row) or any(float(v) != int(v) for v in row[1:]):
                raise ValueError(f"each row is [t, c, n, s] with t > 0 and whole c, n, s >= 1; got {row}")
        return rows


class ModelConfig(_Section):
    """Backbone and head."""

    name: str = Field(
        "mobilenetv2_100",
        description=(
            "any timm model (mobilenetv2_035 ... mobilenetv2_140, efficientnet_lite0...), or "
            "mobilenetv2_standard / mobilenetv2_reduced (the paper's, shaped by model.arch)"
        ),
    )
    pretrained: bool = Field(
        False,
        description="timm's own hub download of ImageNet weights (needs internet; model.checkpoint is the offline way)",
    )
    checkpoint: str = Field(
        "",
        description=(
            "local weights: a safetensors or torch file (weights_only), a run directory (its best.pt) or a "
            "timm folder (model.safetensors)"
        ),
    )
    drop_rate: float = Field(0.2, ge=0.0, lt=1.0, description="dropout before the classifier")
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0, description="stochastic depth of residual blocks; 0 = off")
    head: Literal["linear", "mlp"] = Field("linear", description="linear (dropout = drop_rate) or a 2-layer MLP")
    head_hidden: int = Field(512, ge=1, description="hidden width of the mlp head")
    init: Literal["timm", "blog"] = Field(
        "timm",
        description='"timm", or "blog": He (fan-out) convs, normal(0, 0.01) linear, BN 1/0, before any weights load',
    )
    arch: ArchConfig = ArchConfig()

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.pretrained and self.checkpoint:
            raise ValueError("set either pretrained = true (timm hub) or checkpoint = path (local file), not both")
        return self


class LossConfig(_Section):
    """Multi-label loss."""

    name: Literal["bce", "focal", "asl", "ce"] = Field(
        "bce", description='multi-label: "bce", "focal" or "asl" (asymmetric loss); single-label: "ce"'
    )
    pos_weight: Literal["none", "auto"] | float | list[float] = Field(
        "none",
        description=(
            'BCE: "auto" = negatives/positives per class from the train labels (clipped to pos_weight_max), a '
            "number, or one per class"
        ),
    )
    pos_weight_max: float = Field(100.0, gt=0.0, description='the largest "auto" pos_weight')
    alpha: float = Field(0.25, description="focal alpha; < 0 disables the class-balance term")
    gamma: float = Field(2.0, ge=0.0, description="focal loss focusing (torchvision's sigmoid_focal_loss)")
    gamma_neg: float = Field(4.0, ge=0.0, description="asl: focusing for negatives")
    gamma_pos: float = Field(1.0, ge=0.0, description="asl: focusing for positives")
    clip: float = Field(0.05, ge=0.0, lt=1.0, description="asl: probability margin for negatives")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="ce: label smoothing")

    @model_validator(mode="after")
    def _check(self) -> LossConfig:
        if self.alpha > 1.0:
            raise ValueError("alpha must be <= 1 (or negative to disable)")
        if self.name != "bce" and self.pos_weight != "none":
            raise ValueError(f'pos_weight applies to name = "bce", not {self.name!r}')
        return self


class OptimConfig(_Section):
    """Optimizer and learning-rate schedule (linear warmup, then cosine decay)."""

    name: Literal["adamw", "sgd"] = Field(
        "adamw", description='"adamw" or "sgd" (momentum); norm and bias parameters get no weight decay'
    )
    lr: float = Field(
        1e-3,
        gt=0.0,
        description="peak learning rate (the classifier's; other groups scale it by layer_decay or lr_mult)",
    )
    weight_decay: float = Field(0.05, ge=0.0, description="decoupled (AdamW) or L2 (SGD) weight decay")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum")
    warmup_epochs: float = Field(
        1.0, ge=0.0, description="linear warmup length in epochs (fractions allowed), stepped per optimizer step"
    )
    warmup_factor: float = Field(0.01, gt=0.0, le=1.0, description="warmup starts at lr x warmup_factor")
    min_lr_factor: float = Field(0.0, ge=0.0, le=1.0, description="the cosine ends at lr x min_lr_factor")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="after warmup: cosine decay or constant")
    layer_decay: float = Field(1.0, gt=0.0, le=1.0, description="LR x decay**k for the k-th group below the top")
    l2sp: float = Field(0.0, ge=0.0, description="L2-SP: decay the backbone toward its starting weights (0 = off)")
    lr_mult: dict[str, float] = Field({}, description="layer-group selector -> LR multiplier")

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        if self.layer_decay != 1.0 and self.lr_mult:
            raise ValueError("set either layer_decay or lr_mult, not both")
        if any(v < 0 for v in self.lr_mult.values()):
            raise ValueError("lr_mult values must be >= 0")
        return self


class StageConfig(_Section):
    """One stage of a freezing schedule, optionally with its own optimization (LR, warmup, schedule, multipliers)."""

    epochs: int | None = Field(None, ge=1, description="left out on the last stage: the rest of train.epochs")
    train: list[str] = Field(min_length=1, description='groups that train: "classifier", "blocks.5:", "all"...')
    solver: Literal["", "lbfgs"] = Field("", description='"lbfgs": fit the classifier to its optimum, no epochs')
    lr: float | None = Field(None, gt=0.0, description="this stage's peak LR (default optim.lr)")
    warmup_epochs: float | None = Field(None, ge=0.0, description="default optim.warmup_epochs")
    schedule: Literal["cosine", "constant"] | None = Field(None, description="default optim.schedule")
    layer_decay: float | None = Field(None, gt=0.0, le=1.0, description="default optim.layer_decay")
    lr_mult: dict[str, float] | None = Field(None, description="default optim.lr_mult")

    @model_validator(mode="after")
    def _check(self) -> StageConfig:
        if self.solver:
            if self.train != ["classifier"]:
                raise ValueError('a solver stage fits the linear classifier: train = ["classifier"]')
            if self.epochs is not None or self.own_optim:
                raise ValueError("a solver stage takes no epochs and no optimizer settings (it is solved, not trained)")
        if self.layer_decay is not None and self.lr_mult:
            raise ValueError("set either layer_decay or lr_mult, not both")
        return self

    @property
    def own_optim(self) -> bool:
        """Whether this stage sets any optimization of its own."""
        keys = (self.lr, self.warmup_epochs, self.schedule, self.layer_decay, self.lr_mult)
        return any(v is not None for v in keys)


class FreezeConfig(_Section):
    """Layer-group freezing: a schedule of stages (or ``until``), and what happens to BatchNorm statistics."""

    bn: Literal["frozen", "all", "none"] = Field("frozen", description="whose BN running stats stay fixed")
    train_bn: bool = Field(False, description="BN affine parameters in frozen groups still train (fastai)")
    until: str = Field("", description="freeze every group up to and including this one for the whole run")
    stages: list[StageConfig] = []
    cache_features: bool = Field(False, description="head-only stages train on cached pooled features")
    cache_maps: bool = Field(
        False, description="stages over a frozen prefix train on its output maps, cached (head-only: pooled features)"
    )
    cache_augment: int = Field(0, ge=0, description="augmented feature passes to cache; 0 = one unaugmented pass")
    solver_c: list[float] = Field([0.01, 0.03, 0.1, 0.3, 1.0], min_length=1, description="the L2 C values tried")
    solver_max_iter: int = Field(500, ge=1, description="L-BFGS iterations per C (100 is scikit-learn's default)")
    solver_select: Literal["val", "kfold"] = Field("kfold", description="pick C on val mAP or by 5-fold on train")

    @model_validator(mode="after")
    def _check(self) -> FreezeConfig:
        if self.until and self.stages:
            raise ValueError("set either until or stages, not both")
        if any(s.solver for s in self.stages[1:]):
            raise ValueError("only the first stage may be a solver stage")
        if any(s.epochs is None and not s.solver for s in self.stages[:-1]):
            raise ValueError("only the last stage may leave out epochs (it then runs to the end)")
        if self.stages and self.stages[-1].solver:
            raise ValueError("a solver stage needs a trained stage after it")
        return self


class TrainConfig(_Section):
    """The training loop."""

    epochs: int = Field(10, ge=1, description="training epochs (every stage's together)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description=(
            '"auto" (bf16 on a GPU that has it or a CPU with AMX, else fp16 on CUDA, fp32 on CPU), or fp32, '
            "bf16, fp16 (CUDA, with a GradScaler)"
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description='"auto" (CUDA when present), "cpu" or "cuda"')
    grad_clip: float = Field(0.0, ge=0.0, description="max gradient norm; 0 = off")
    accum_steps: int = Field(1, ge=1, description="batches accumulated per optimizer step")
    channels_last: bool = Field(False, description="NHWC memory layout (faster convolutions on recent GPUs)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="0 to 2**32 - 1 (NumPy's seed range)")
    deterministic: bool = Field(
        False, description="deterministic algorithms (torch.use_deterministic_algorithms); slower on GPU"
    )
    threshold: float = Field(
        0.5, gt=0.0, lt=1.0, description="the fixed decision threshold calibration is measured against"
    )
    select: Literal["auto", "map", "macro_f1", "micro_f1", "top1", "loss"] = Field(
        "auto",
        description=(
            '"auto" (mAP; top-1 for single-label), map, macro_f1, micro_f1, top1 or loss: what picks best.pt on val'
        ),
    )
    patience: int = Field(0, ge=0, description="early stopping: epochs without a better val select metric; 0 = off")
    ema: float = Field(0.0, ge=0.0, lt=1.0, description="EMA decay of the weights (0 = off); evaluated and selected")
    sync_bn: bool = Field(False, description="under DDP: BatchNorm statistics over the global batch")
    compile: bool = Field(False, description="run the model through torch.compile (model.compile(), in place)")
    ema_warmup: bool = Field(True, description="EMA decay ramps up over the first steps (timm's ModelEmaV3 warmup)")
    tta: Literal["none", "hflip"] = Field("none", description="hflip: logits averaged with the mirrored image's")
    checkpoint_every: int = Field(0, ge=0, description="also checkpoint every N optimizer steps, mid-epoch; 0 = off")
    progress_every: float = Field(60.0, ge=0.0, description="output to a log (not a terminal): a line every N seconds")
    progress_steps: int = Field(0, ge=0, description="... and every N batches (0 = by time only)")


class LogConfig(_Section):
    """Where each epoch's metrics go besides ``metrics.jsonl`` (always written)."""

    to: list[Literal["jsonl", "csv", "tensorboard", "mlflow", "wandb"]] = Field(
        ["jsonl"], description="where each epoch's metrics go: jsonl (always), csv, tensorboard, mlflow, wandb"
    )


class OutputConfig(_Section):
    """Where the run directory goes: ``<dir>/<name>``."""

    dir: str = Field("runs", description="the folder runs are written in")
    name: str = Field("", max_length=255, description="the run directory's name (a file system allows 255 bytes)")
    html: bool = Field(True, description="write report.html after training (finetune report writes it any time)")


class QuantizeConfig(_Section):
    """Quantization-aware training: the INT8 exports' rounding simulated while the network trains."""

    aware: bool = Field(
        False,
        description=(
            "train with fake quantization (int8 weights with BN folded, uint8 activations, as the INT8 exports "
            'round them); needs freeze.bn = "all". finetune qat RUN does it to a finished run'
        ),
    )
    calibration_images: int = Field(300, ge=1, description="train images that set the activation ranges first")


class Recipe(_Section):
    """A whole recipe."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    freeze: FreezeConfig = FreezeConfig()
    train: TrainConfig = TrainConfig()
    calibrate: CalibrateConfig = CalibrateConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    log: LogConfig = LogConfig()
    output: OutputConfig = OutputConfig()


def _section_of(ann: Any) -> tuple[type[BaseModel] | None, bool]:
    """The section model an annotation holds, and whether it is a list of them (``[[freeze.stages]]``)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann, False
    args = getattr(ann, "__args__", ())
    is_list = getattr(ann, "__origin__", None) is list and args
    if is_list and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0], True
    return None, False


def _walk(loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], type[BaseModel] | None]:
    """Keep the recipe keys of a pydantic error location (dropping union-member tags like ``literal['x']``).

    Returns:
        The cleaned location and the section model that holds its last key (None past a plain value).
    """
    keep: list[Any] = []
    model: type[BaseModel] | None = Recipe
    holder: type[BaseModel] | None = Recipe
    pending_list: type[BaseModel] | None = None
    for part in loc:
        if isinstance(part, int):
            keep.append(part)
            model, pending_list = pending_list, None
            continue
        fields = model.model_fields if model else {}
        if part in fields:
            keep.append(part)
            holder = model
            sub, is_list = _section_of(fields[part].annotation)
            model, pending_list = (None, sub) if is_list else (sub, None)
        elif model is not None:  # an unknown key in a section: keep it so the message can name it
            keep.append(part)
            holder, model = model, None
        elif not keep:
            keep.append(part)
    return tuple(keep), holder


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys the schema accepts in the section that holds ``loc``."""
    _, holder = _walk(loc)
    return sorted(holder.model_fields) if holder else []


def _format_error(source: str, err: ValidationError) -> str:
    """One line for the first problem pydantic found."""
    errors = err.errors()
    first = errors[0]
    loc = _walk(first["loc"])[0]  # without pydantic's union-member tags (literal['x'], float...)
    key = ".".join(str(p) for p in loc) or "(recipe)"
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc)
        msg = "unknown key" + (f"; expected one of: {', '.join(allowed)}" if allowed else "")
    else:
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] not in ("value_error", "missing"):
            msg += f" (got {first['input']!r})"
    more = len({_walk(e["loc"])[0] for e in errors}) - 1
    return f"{source}: {key}: {msg}" + (f" (and {more} more problem{'s' * (more > 1)})" if more else "")


def validate_recipe(raw: dict[str, Any], source: str) -> Recipe:
    """Validate a raw dict into a :class:`Recipe`, turning pydantic errors into one-line user errors."""
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise UserError(_format_error(source, err)) from None
    d = recipe.data
    check_task_rules(d.format, recipe.loss.name, recipe.train.select, source, d.task)
    check_model_rules(recipe.model.name, recipe.model.arch != ArchConfig(), source)
    check_calibration_rules(d.format, recipe.calibrate, source, d.task)
    check_augment_rules(d.format, d.task, d.augment, source)
    if recipe.quantize.aware and recipe.freeze.bn != "all":
        raise UserError(
            f"{source}: quantize.aware: BatchNorm is folded into the convolutions as the INT8 file folds it, which "
            'needs fixed statistics: set freeze.bn = "all"'
        )
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe; the run name defaults to the recipe's file name.

    Args:
        path: A TOML recipe.
        overrides: ``section.key=value`` strings, applied in order.

    Returns:
        The validated recipe.
    """
    try:
        raw = apply_overrides(read_toml(path), overrides or [])
        recipe = validate_recipe(raw, str(path))
    except RecursionError:  # tables or arrays nested thousands deep: no recipe is
        raise UserError(f"{path}: nested too deeply to be a recipe (tables or arrays inside one another)") from None
    if not recipe.output.name:
        recipe.output.name = Path(path).stem
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """A plain, TOML-serialisable dict of a recipe (tuples become lists)."""
    return recipe.model_dump(mode="json", exclude_none=True)  # TOML has no null: a left-out key
