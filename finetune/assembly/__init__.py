"""The one assembly of a run: :func:`build_run` turns a recipe into :class:`RunParts`, each part built once.

Every command takes its parts from here: ``run`` and ``validate`` the training parts (:meth:`RunParts.training`),
``lr-find`` the model, policy, probe, loader and optimizer, ``groups`` and ``summary`` the bare model and its policy,
``eval``, ``calibrate`` and ``export`` the run's best weights (:func:`build_from_run`). Parts are built on first use
and kept, so a command builds exactly what it touches, in the same way every time; ``validate`` touches everything
``run`` builds before its first step, which is why it refuses exactly what ``run`` refuses.

The modules beside this one (``data``, ``training``, ``hooks``) are the only code that turns a recipe into objects;
below the assembly, components take plain arguments (commands may still print a recipe's values).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from torch import nn

from finetune import runfiles
from finetune.assembly import data, hooks, training
from finetune.assembly.data import ROLES, norm_stats, split_name
from finetune.assembly.training import StepPlan
from finetune.config import Recipe
from finetune.data.dataset import collate
from finetune.data.split import ClassMap, Split
from finetune.distributed import Dist, convert_sync_bn, gather
from finetune.errors import UserError
from finetune.eval.predict import EvalSettings, image_inputs
from finetune.eval.tasks import Task
from finetune.eval.thresholds import CalibrationSettings
from finetune.hooks.feature_cache import FeatureCache
from finetune.hooks.freezing import FreezePolicy, Stage
from finetune.hooks.probe import ProbeHook
from finetune.hooks.qat import QatHook
from finetune.models import LoadReport
from finetune.rundir.directory import RunDir
from finetune.train.fit import selected_weights
from finetune.train.loop import FitSettings, Hook, Loop
from finetune.train.qat import QuantSim

Weights = Literal["recipe", "none", "best"]

__all__ = ["ROLES", "RunParts", "build_from_run", "build_run", "norm_stats", "split_name"]


class RunParts:
    """A run's parts, each built from the recipe on first use and then kept; read-only once constructed.

    Args:
        recipe: The validated recipe (resolved on first use of :attr:`recipe`: ``normalize = "dataset"``, jitter).
        weights: ``recipe`` (the recipe's pretrained or checkpoint weights), ``none`` (the bare architecture: a
            resume, ``groups``, ``summary``) or ``best`` (the run's ``best.pt``; needs ``run``).
        roles: The splits to read.
        check_images: Check that every image file exists when reading the splits.
        classes: The run's classes (``classes.json``), which the splits must match.
        run: The run directory (``best`` weights; where a training run writes).
        distributed: Join the torchrun job the environment describes (``run``); one process otherwise.
        console: Where notes go (on rank 0; the other ranks of a torchrun job print nothing).
        extra_hooks: Hooks from Python, placed after the recipe's own and before the loggers.
    """

    def __init__(
        self,
        recipe: Recipe,
        *,
        weights: Weights = "recipe",
        roles: Sequence[str] = ROLES,
        check_images: bool = True,
        classes: ClassMap | None = None,
        run: RunDir | None = None,
        distributed: bool = False,
        console: Console | None = None,
        extra_hooks: Sequence[Hook] = (),
        scaled: bool = True,
    ) -> None:
        self.raw, self.weights, self.roles, self.check = recipe, weights, tuple(roles), check_images
        self.given_classes, self.run, self._console = classes, run, console or Console(stderr=True, quiet=True)
        self.distributed, self.scaled = distributed, scaled  # scaled: best.pt with probabilities.json folded in
        self.extra_hooks = tuple(extra_hooks)
        self._loaders: dict[tuple[str, bool, bool], torch.utils.data.DataLoader] = {}  # set last: read-only from here

    def __setattr__(self, name: str, value: Any) -> None:  # every part derives from the arguments, once
        if "_loaders" in self.__dict__:
            raise AttributeError(f"RunParts is read-only once built: build another with {name}={value!r}")
        super().__setattr__(name, value)

    @cached_property
    def console(self) -> Console:
        """Where notes go: the given console on rank 0 (or alone), a quiet one on the other ranks."""
        return self._console if self.dist.main else Console(quiet=True)

    # -- the machine and the data ------------------------------------------------------------------------------------

    @cached_property
    def device_precision(self) -> tuple[torch.device, str]:
        """``train.device`` and ``train.precision`` resolved for this machine."""
        return data.build_device(self.raw.train)

    @property
    def device(self) -> torch.device:
        """The device the run trains and predicts on."""
        return self.device_precision[0]

    @property
    def precision(self) -> str:
        """fp32, bf16 or fp16, resolved."""
        return self.device_precision[1]

    @cached_property
    def dist(self) -> Dist:
        """This process's place in the torchrun job (rank 0 of 1 without one)."""
        return data.build_dist(self.raw, self.device) if self.distributed else Dist()

    @cached_property
    def splits(self) -> dict[str, Split]:
        """The splits of :attr:`roles` (an empty test split left out)."""
        return data.build_splits(self.raw, self.roles, self.check, self.given_classes)

    @cached_property
    def recipe(self) -> Recipe:
        """The recipe with what depends on the data or the machine made explicit (what ``recipe.toml`` records).

        Resolving changes ``[data.augment]`` only, so the model and its groups are built from :attr:`raw`: a command
        that needs no data (``groups``, ``summary``, ``export``) neither computes dataset statistics nor checks the
        machine's device.
        """
        return self._resolved[0]

    @cached_property
    def _resolved(self) -> tuple[Recipe, str]:
        return data.build_resolved_recipe(self.raw, lambda: self.device, lambda: self.splits["train"])

    @property
    def note(self) -> str:
        """What resolving the recipe did (empty until :attr:`recipe` is read), for the caller to print."""
        return self.__dict__["_resolved"][1] if "_resolved" in self.__dict__ else ""

    @cached_property
    def classes(self) -> ClassMap:
        """The run's classes: the given ones, else the first split's."""
        if self.given_classes is not None:
            return self.given_classes
        if not self.splits:
            raise UserError("no split to read the classes from")
        return next(iter(self.splits.values())).classes

    @cached_property
    def task(self) -> Task:
        """Multi-label or single-label, from ``data.format``."""
        return data.build_task(self.raw)

    @cached_property
    def eval_settings(self) -> EvalSettings:
        """How batches run through the model when predicting."""
        return data.build_eval_settings(self.recipe, self.device, self.precision)

    @cached_property
    def fit_settings(self) -> FitSettings:
        """The trainer's settings."""
        return data.build_fit_settings(self.recipe, self.device, self.precision)

    @cached_property
    def calibration(self) -> CalibrationSettings:
        """How the run's thresholds are fitted (``calibrate.classes`` checked against the run's classes)."""
        return data.build_calibration(self.recipe, self.classes)

    def loader(
        self, role: str, augment: bool = False, shard: bool = False, shuffle: bool | None = None
    ) -> torch.utils.data.DataLoader:
        """The loader of one split, built once per kind.

        Args:
            role: train, val or test.
            augment: The training transform (else the evaluation one).
            shard: Under DDP, this rank's share.
            shuffle: Shuffled per epoch with the last partial batch dropped (training); default: ``augment``. The
                feature cache reads augmented images in order (``shuffle=False``).
        """
        shuffle = augment if shuffle is None else shuffle
        key = (role, augment, shard and self.dist.enabled, shuffle)
        if key not in self._loaders:
            r, d = self.recipe, (self.dist if key[2] else None)
            dataset = data.build_dataset(r.data, self.splits[role], augment, r.train.seed)
            self._loaders[key] = data.build_loader(r.data, dataset, shuffle, r.train.seed, d)
        return self._loaders[key]

    @property
    def image_size(self) -> int:
        """The side every prediction sees (``data.eval_size``, else ``data.image_size``): exports take it."""
        return self.raw.data.eval_size or self.raw.data.image_size

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Mean and std (0..1 scale) the inputs are normalised with."""
        return norm_stats(self.recipe.data)

    @property
    def tta(self) -> str:
        """``none`` or ``hflip``: what every prediction of the run averages over."""
        return self.raw.train.tta

    @property
    def fixed_threshold(self) -> float:
        """The fixed decision threshold calibration is compared with."""
        return self.raw.train.threshold

    @property
    def model_name(self) -> str:
        """The timm (or preset) architecture name."""
        return self.raw.model.name

    # -- the model and what trains it --------------------------------------------------------------------------------

    @cached_property
    def checkpoint(self) -> dict[str, Any]:
        """The run's ``best.pt`` (weights = ``best``)."""
        if self.run is None:
            raise ValueError("weights = 'best' needs the run directory")
        return self.run.checkpoint("best")

    @cached_property
    def model_and_report(self) -> tuple[nn.Module, LoadReport | None]:
        """The network with its new head, and what loading the recipe's weights did (None: nothing loaded)."""
        if self.weights == "recipe":
            return training.build_model(self.raw, len(self.classes))
        model = training.build_bare_model(self.raw, len(self.classes))
        if self.weights == "best":
            model.load_state_dict(selected_weights(self.checkpoint))
            if self.scaled and (self.run / runfiles.PROBABILITIES).is_file():
                training.fold_probabilities(model, self.run.read_json(runfiles.PROBABILITIES))
        return model, None

    @property
    def model(self) -> nn.Module:
        """The network (on the CPU until :meth:`place` moves it)."""
        return self.model_and_report[0]

    def place(self, for_training: bool = False) -> nn.Module:
        """Move the model to the device; for training also sync BN (DDP), channels-last and ``compile`` as asked."""
        t, model = self.recipe.train, self.model
        if for_training and t.sync_bn and self.dist.enabled:
            convert_sync_bn(model, self.device.type)
        model.to(self.device)
        if for_training and t.channels_last:
            model.to(memory_format=torch.channels_last)
        if for_training and t.compile:  # in place: the state_dict keys, the hooks and the policy stay as they are
            model.compile()
        return model

    def make_model(self) -> nn.Module:
        """A fresh model of the run's architecture (no weights loaded), on the device, as the run's is laid out.

        Its random initialisation draws from a forked RNG: building it leaves the run's random stream where it was, so
        a resumed run (which builds it after restoring the RNG) continues bitwise.
        """
        with torch.random.fork_rng(devices=[]):
            model = training.build_bare_model(self.raw, len(self.classes)).to(self.device)
        if self.recipe.quantize.aware:  # the EMA's copy is validated with the same rounding
            self.quant_sim.attach(model)
        return model.to(memory_format=torch.channels_last) if self.recipe.train.channels_last else model

    @cached_property
    def quant_sim(self) -> QuantSim:
        """Where quantization-aware training rounds the network (``quantize.aware``), traced on first use."""
        size = self.recipe.data.image_size
        example = torch.zeros(2, 3, size, size, device=next(self.model.parameters()).device)
        try:
            return QuantSim(self.model, example)
        except ValueError as err:
            raise UserError(f"quantize.aware: {self.raw.model.name}: {err}") from None

    def calibration_subset(self, count: int) -> torch.utils.data.DataLoader:
        """``count`` train images (at most all), unaugmented, a subset seeded by the run's seed, in file order.

        The INT8 exports calibrate on it, and quantization-aware training on the same images.
        """
        n = len(self.splits["train"].image_paths)
        pick = np.sort(np.random.default_rng(self.recipe.train.seed).permutation(n)[: min(count, n)]).tolist()
        subset = torch.utils.data.Subset(self.loader("train").dataset, pick)
        return torch.utils.data.DataLoader(subset, batch_size=16, collate_fn=collate, num_workers=0)

    def qat_batches(self) -> Iterator[torch.Tensor]:
        """The ``quantize.calibration_images`` calibration images (the exports' own), normalised, on the device."""
        for batch in self.calibration_subset(self.recipe.quantize.calibration_images):
            x = image_inputs(batch, self.eval_settings)
            if x is not None:
                yield x

    @cached_property
    def groups(self) -> list | None:
        """The model's layer groups (None for a model without them, when the recipe does not need them)."""
        return training.build_groups(self.raw, self.model)

    @cached_property
    def policy(self) -> FreezePolicy | None:
        """The freezing schedule and BN policy (None without layer groups)."""
        return training.build_policy(self.raw, self.model, self.groups)

    @property
    def stages(self) -> list[Stage] | None:
        """The trained stages (None without layer groups)."""
        return self.policy.stages if self.policy is not None else None

    @cached_property
    def epoch_size(self) -> int:
        """Images drawn per training epoch (the train split's, or the balanced sampler's fixed draw)."""
        return data.epoch_size(self.recipe.data, self.splits["train"].targets)

    @cached_property
    def plan(self) -> StepPlan:
        """Optimizer steps per epoch, in all and in warmup."""
        return training.plan_steps(self.recipe, self.epoch_size)

    @cached_property
    def head_params(self) -> list[str]:
        """The new head's parameter names."""
        return training.head_params(self.model, self.groups)

    @cached_property
    def optimizer_and_scheduler(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """The optimizer over every group (frozen ones included) and its per-step schedule."""
        return training.build_optimizer(self.recipe, self.model, self.plan, self.groups, self.stages, self.head_params)

    @cached_property
    def loss_fn(self) -> nn.Module:
        """The loss, on the device."""
        return training.build_loss(self.recipe, self.splits["train"]).to(self.device)

    @cached_property
    def feature_cache(self) -> FeatureCache | None:
        """Cached features for head-only stages (``freeze.cache_features``); extracted when first used."""
        source = lambda augment: self.loader("train", augment, shard=True, shuffle=False)  # noqa: E731
        return training.build_feature_cache(self.recipe, self.policy, source, self.dist)

    @cached_property
    def probe(self) -> ProbeHook | None:
        """The solver stage's hook (a linear probe on frozen features), when the first stage is one."""
        return hooks.build_probe(self.recipe, self.policy, lambda role: self.loader(role), self.feature_cache)

    def fit_probe(self) -> None:
        """Solve the probe into the model now (for a tool that looks at a later stage, like lr-find)."""
        if self.probe is not None:
            self.probe.fit(self.model, self.eval_settings, self.console)

    def trained_stage(self, stage: int) -> int:
        """The 0-based trained-stage index of ``[[freeze.stages]]`` entry ``stage`` (1-based, the probe counted)."""
        return training.build_trained_stage_index(self.raw, stage)

    def stage_multipliers(self, index: int) -> dict[str, float]:
        """LR multiplier per layer group in trained stage ``index`` (``{"all": 1.0}`` without groups)."""
        return training.build_stage_multipliers(self.raw, self.groups, index) if self.groups else {"all": 1.0}

    def stage_lr(self, index: int) -> float:
        """The peak LR of trained stage ``index``."""
        return training.build_stage_lr(self.raw, index)

    def stage_views(self) -> list[training.StageView]:
        """Every ``[[freeze.stages]]`` entry (the probe included) with each group's real peak LR in it."""
        if self.groups is None:
            raise UserError(f"model.name: {self.raw.model.name} has no layer groups; it trains as a whole")
        return training.stage_views(self.raw, self.groups, self.stages)

    def hooks(self, run_dir: Path) -> list[Hook]:
        """The loop's hooks in their checked order; loggers write under ``run_dir`` (once training starts)."""
        l2sp = training.l2sp_params(self.model, self.head_params)
        return hooks.build_hooks(
            self.recipe,
            run_dir,
            policy=self.policy,
            cache=self.feature_cache,
            probe=self.probe,
            l2sp_params=l2sp,
            make_model=self.make_model,
            qat=QatHook(lambda: self.quant_sim, self.qat_batches) if self.recipe.quantize.aware else None,
            extra=self.extra_hooks,
            d=self.dist,
        )

    def training(self, run_dir: Path) -> tuple[Loop, list[Hook]]:
        """Everything a run builds before its first step, in order: what ``run`` trains and ``validate`` checks.

        Nothing is written: the run directory is the caller's to create.
        """
        model = self.model
        if self.weights == "recipe" and self.model_and_report[1] is not None:
            self.console.print(escape(self.model_and_report[1].summary()))
        self.place(for_training=True)
        optimizer, scheduler = self.optimizer_and_scheduler
        loop = Loop(
            model=model,
            loss_fn=self.loss_fn,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16"),
            train_loader=self.loader("train", augment=True, shard=True),
            val_loader=self.loader("val", shard=True),
            settings=self.fit_settings,
            run_dir=run_dir,
            console=self.console,
            gather=(lambda out: gather(out, self.dist)) if self.dist.enabled else None,
            is_main=self.dist.main,
        )
        return loop, self.hooks(run_dir)


def build_run(recipe: Recipe, **options: Any) -> RunParts:
    """The parts of a run of ``recipe`` (see :class:`RunParts` for the options); nothing is built until used."""
    return RunParts(recipe, **options)


def build_from_run(
    run: RunDir,
    roles: Sequence[str] = (),
    overrides: list[str] | None = None,
    console: Console | None = None,
    scaled: bool = True,
    distributed: bool = False,
) -> RunParts:
    """The parts of a finished run: its recipe (with ``overrides``), classes, best weights and ``roles``' splits.

    ``scaled``: the run's probability scaling (``probabilities.json``) folded into the classifier, as every consumer
    of the run's model sees it; ``calibrate`` re-fits it on the raw model (``False``). ``distributed``: join the
    torchrun job (each rank then predicts its shard of a split).
    """
    recipe, classes = run.recipe(overrides), run.classes()
    options = {"roles": roles, "classes": classes, "run": run, "console": console, "scaled": scaled}
    return RunParts(recipe, weights="best", distributed=distributed, **options)
