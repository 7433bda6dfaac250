"""Training: the one epoch loop, the procedures it runs, and the train-or-load-from-cache entry point.

Every trainer of the harness runs ``run_epochs``: standard and adversarial training (``train``), and the
plug-ins' own stages (ACL pre-training and fine-tuning); each supplies a per-batch loss, the batches, an
optimizer (``build_optimizer`` for a ``Recipe``), a schedule (``build_scheduler``, ``PerStepLR``) and
per-epoch callbacks (modes, validation, model selection). Whoever wants to watch training (a tracker)
passes ``on_epoch`` to ``get_or_train``: every epoch of every stage that builds the checkpoint reports to it.

A **training procedure** (``TrainingProcedure``) decides what a classifier is trained on: its ``loss`` per
batch, its ``spec()`` (enters the checkpoint key), and the hooks ``prepare``/``parameters``/``fit`` whose
defaults are the standard loop. The procedure lives here, next to the loop it plugs into, so that the loop
and its default ``fit`` need no upward import; ``robustbench_lab.core.defense_base`` re-exports it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from contextvars import ContextVar
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from robustbench_lab.core import data as data_mod
from robustbench_lab.core.cache import CheckpointCache, content_key
from robustbench_lab.core.model import predict
from robustbench_lab.core.progress import is_interactive
from robustbench_lab.core.recipe import Recipe

log = logging.getLogger(__name__)

TRAIN_CODE_VERSION = 1   # bump when training code changes trained weights, to invalidate old cache entries
TRAIN_ACCURACY_POINTS = 1000   # the fixed training sample whose clean accuracy ``train`` records per epoch

EpochCallback = Callable[[dict[str, Any]], None]
# A context variable rather than a parameter: a procedure's ``fit`` (ACL's two stages, a predictor fitted in
# ``prepare``) runs several loops whose signatures should not all carry an observer they do not use.
_OBSERVER: ContextVar[EpochCallback | None] = ContextVar("epoch_observer", default=None)


@contextlib.contextmanager
def observing_epochs(callback: EpochCallback | None) -> Iterator[None]:
    """Within the block, every ``run_epochs`` without its own ``on_epoch`` reports to ``callback`` (None:
    to nobody, e.g. a nested ``get_or_train`` of another checkpoint)."""
    token = _OBSERVER.set(callback)
    try:
        yield
    finally:
        _OBSERVER.reset(token)


def epoch_records(history: Mapping[str, Any], stage: str) -> list[dict[str, Any]]:
    """A ``run_epochs`` history as one record per epoch: ``stage`` and every per-epoch column's value."""
    n = len(history.get("epoch") or [])
    cols = [k for k, v in history.items() if isinstance(v, list) and len(v) == n]
    return [{"stage": stage, **{k: history[k][i] for k in cols}} for i in range(n)]


# ------------------------------------------------------------------------------------ the procedure
class TrainingProcedure:
    """Base of every training procedure: what ``train`` and ``get_or_train`` call, with the defaults of
    standard training. Subclasses implement ``loss`` and ``spec`` and override the hooks they need.

    Call order in ``get_or_train``: ``fit(...)``; the default ``fit`` is ``train``, which calls
    ``prepare(model, splits, device)`` once, adds ``parameters()`` to the optimizer, then ``loss`` per batch.
    """

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
        """Scalar training loss for a batch ``x`` (B, C, H, W) in [0, 1] with labels ``y`` (B,); ``generator``
        (on the batch's device) is the only randomness a procedure may use (e.g. an attack's start)."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """Everything about this procedure that changes the trained weights (enters the checkpoint key)."""
        raise NotImplementedError

    def prepare(self, model: nn.Module, splits: data_mod.Splits | None, device: torch.device) -> None:
        """Build per-training state before the first batch (e.g. neural guidance fits its targets and sizes
        its head). Default: nothing."""

    def parameters(self) -> list[nn.Parameter]:
        """Extra trainable tensors that share the model's optimizer and schedule but are not part of the model
        (nor of its checkpoint), e.g. neural guidance's head. Read after ``prepare``. Default: none."""
        return []

    def fit(self, model: nn.Module, splits: data_mod.Splits, recipe: Recipe, device: torch.device, seed: int, *,
            cache: CheckpointCache | None = None, spec: Mapping[str, Any] | None = None,
            progress: bool = False) -> dict[str, Any]:
        """Train ``model`` in place and return its history (per epoch at least ``seconds``). ``cache`` and
        ``spec`` (the run's checkpoint spec) let a procedure with stages cache an intermediate model (ACL's
        encoder). Default: the standard loop, ``train``."""
        return train(model, splits, recipe, device, seed, self, progress)


class StandardTraining(TrainingProcedure):
    """Plain cross-entropy training."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = float(label_smoothing)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return F.cross_entropy(model(x), y, label_smoothing=self.label_smoothing)

    def spec(self) -> dict[str, Any]:
        return {"procedure": "standard", "label_smoothing": self.label_smoothing}


# ------------------------------------------------------------------------- optimizers and schedules
def build_optimizer(params: Iterable[torch.Tensor], recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimizer (SGD with optional Nesterov momentum, or Adam) over ``params``."""
    params = list(params)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                               nesterov=recipe.nesterov and recipe.momentum > 0, weight_decay=recipe.weight_decay)
    return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


def build_scheduler(opt: torch.optim.Optimizer, recipe: Recipe, total: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The recipe's learning-rate schedule over ``total`` optimizer steps (stepped after every step)."""
    if recipe.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=max(total, 1),
                                                   pct_start=recipe.warmup_frac, anneal_strategy="cos",
                                                   div_factor=10.0, final_div_factor=100.0)
    if recipe.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
    if recipe.schedule == "step":
        ms = [int(m * total) for m in recipe.milestones]
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=ms, gamma=0.1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


class PerStepLR:
    """Sets every parameter group's learning rate to ``lr_at(k)`` before optimizer step k (1-based): a
    schedule given as a formula of the step (ACL's warm-up cosine) without LambdaLR's ``base_lr * factor``
    rounding. Stepped like a torch scheduler, after every optimizer step."""

    def __init__(self, opt: torch.optim.Optimizer, lr_at: Callable[[int], float]) -> None:
        self.opt, self.lr_at, self.next_step = opt, lr_at, 1
        self._apply()

    def _apply(self) -> None:
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.next_step)

    def step(self) -> None:
        self.next_step += 1
        self._apply()


# ---------------------------------------------------------------------------------------- the loop
def run_epochs(step_loss: Callable[..., torch.Tensor], batches: Callable[[int], Iterable[Sequence[torch.Tensor]]],
               opt: torch.optim.Optimizer, epochs: int, *, steps_per_epoch: int | None = None,
               scheduler: Any = None, on_epoch_start: Callable[[int], None] | None = None,
               on_epoch_end: Callable[[int, float], Mapping[str, Any]] | None = None,
               columns: Sequence[str] = (), desc: str = "train", progress: bool = False,
               on_epoch: EpochCallback | None = None) -> dict[str, Any]:
    """The training loop: for every epoch, ``on_epoch_start(epoch)`` (set modes), then for every batch of
    ``batches(epoch)`` (a tuple of tensors on the training device; its first has the batch dimension)
    ``loss = step_loss(*batch)``, zero grad, backward, ``opt.step()``, ``scheduler.step()``; then
    ``on_epoch_end(epoch, mean_loss)`` returns the epoch's other values (validation, model selection).

    Returns the history, one entry per epoch: ``epoch`` (1-based), ``train_loss`` (the epoch's mean loss,
    weighted by batch size), every key of ``columns`` (filled from ``on_epoch_end``), and ``seconds`` since
    the start. ``steps_per_epoch`` only sizes the progress bar. After each epoch ``on_epoch`` (default: the
    observer of ``observing_epochs``) gets that epoch's record (``epoch_records``, stage ``desc``).
    """
    observer = on_epoch if on_epoch is not None else _OBSERVER.get()
    hist: dict[str, Any] = {"epoch": [], "train_loss": [], **{c: [] for c in columns}, "seconds": []}
    t0 = time.time()
    for epoch in range(epochs):
        if on_epoch_start is not None:
            on_epoch_start(epoch)
        total, n = 0.0, 0
        bar = tqdm(batches(epoch), total=steps_per_epoch, desc=f"{desc} {epoch + 1}/{epochs}",
                   disable=not (progress and is_interactive(sys.stderr)), leave=False, mininterval=2.0)
        for batch in bar:
            loss = step_loss(*batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
            b = batch[0].shape[0]
            total += float(loss.detach()) * b
            n += b
            bar.set_postfix(loss=f"{total / n:.3f}", refresh=False)
        mean = total / max(n, 1)
        extra = dict(on_epoch_end(epoch, mean) or {}) if on_epoch_end is not None else {}
        hist["epoch"].append(epoch + 1)
        hist["train_loss"].append(mean)
        for k, v in extra.items():
            hist.setdefault(k, []).append(v)
        hist["seconds"].append(time.time() - t0)
        if observer is not None:
            observer(epoch_records(hist, desc)[-1])
        shown = "".join(f", {k} {v:.4f}" for k, v in extra.items() if isinstance(v, float))
        log.info("%s %d/%d: loss %.4f%s (%.0fs)", desc, epoch + 1, epochs, mean, shown, time.time() - t0)
    return hist


def training_subset(splits: data_mod.Splits, recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """The training points a recipe uses: the first ``max_train`` (all when 0)."""
    if recipe.max_train > 0:
        return splits.x_train[:recipe.max_train], splits.y_train[:recipe.max_train]
    return splits.x_train, splits.y_train


def labelled_batches(x: torch.Tensor, y: torch.Tensor, recipe: Recipe, card: data_mod.DataCard,
                     generator: torch.Generator, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled (images in [0, 1], labels) batches on ``device``, augmented when the recipe says
    so; order and augmentation draw from ``generator`` (CPU)."""
    for xb, yb in data_mod.batches(x, y, recipe.batch_size, shuffle=True, generator=generator):
        xb = data_mod.to_float(xb)
        if recipe.augment:
            xb = data_mod.augment(xb, card, generator)
        yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)


def train_classifier(model: nn.Module, splits: data_mod.Splits, recipe: Recipe, device: torch.device, seed: int,
                     procedure: TrainingProcedure, params: Iterable[torch.Tensor], *,
                     on_epoch_start: Callable[[int], None] | None = None,
                     on_epoch_end: Callable[[int, float], Mapping[str, Any]] | None = None,
                     columns: Sequence[str] = (), desc: str = "train epoch", progress: bool = False) -> dict[str, Any]:
    """``recipe`` applied to ``model`` (a Classifier on [0, 1] inputs) in place with ``procedure.loss``:
    optimizer and schedule over ``params``, shuffled (augmented) batches of the recipe's training points.

    Randomness: order and augmentation from a CPU generator seeded with ``seed``, the procedure's (attack
    starts) from a generator on ``device`` seeded with ``seed + 1``. Default epoch start: train mode. The
    history gains ``lr``: the learning rate of each epoch's last step.
    """
    x_tr, y_tr = training_subset(splits, recipe)
    g = torch.Generator().manual_seed(int(seed))
    dev_g = torch.Generator(device=device).manual_seed(int(seed) + 1)
    opt = build_optimizer(params, recipe)
    steps_per_epoch = math.ceil(x_tr.shape[0] / recipe.batch_size)
    sched = build_scheduler(opt, recipe, steps_per_epoch * recipe.epochs)
    model.to(device)
    last_lr = [float("nan")]

    def step_loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        last_lr[0] = float(opt.param_groups[0]["lr"])   # read before the step: the rate this step uses
        return procedure.loss(model, xb, yb, dev_g)

    def end(epoch: int, mean: float) -> dict[str, Any]:
        return {**(dict(on_epoch_end(epoch, mean) or {}) if on_epoch_end is not None else {}), "lr": last_lr[0]}

    return run_epochs(step_loss, lambda _: labelled_batches(x_tr, y_tr, recipe, splits.card, g, device), opt,
                      recipe.epochs, steps_per_epoch=steps_per_epoch, scheduler=sched,
                      on_epoch_start=on_epoch_start or (lambda _: model.train()), on_epoch_end=end,
                      columns=(*columns, "lr"), desc=desc, progress=progress)


def train(model: nn.Module, splits: data_mod.Splits, recipe: Recipe, device: torch.device,
          seed: int, procedure: TrainingProcedure | None = None, progress: bool = True) -> dict[str, Any]:
    """Train ``model`` (a Classifier on [0, 1] inputs) in place with ``procedure`` (default: cross-entropy).
    Returns the history (per epoch: train loss, clean accuracy on the first ``TRAIN_ACCURACY_POINTS`` training
    points and on the validation split, learning rate, seconds).

    Weight initialisation is done by the caller under the same seed.
    """
    procedure = procedure or StandardTraining(recipe.label_smoothing)
    procedure.prepare(model, splits, device)
    params = [p for p in model.parameters() if p.requires_grad]
    params += [p for p in procedure.parameters() if p.requires_grad]
    x_acc, y_acc = (t[:TRAIN_ACCURACY_POINTS] for t in training_subset(splits, recipe))
    hist = train_classifier(model, splits, recipe, device, seed, procedure, params,
                            on_epoch_end=lambda *_: {"train_accuracy": accuracy(model, x_acc, y_acc, device),
                                                     "val_accuracy": accuracy(model, splits.x_val, splits.y_val, device)},
                            columns=("train_accuracy", "val_accuracy"), progress=progress)
    model.eval()
    return hist


def accuracy(model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, device: torch.device,
             batch_size: int = 1000) -> float:
    if x_uint8.shape[0] == 0:
        return float("nan")
    correct = 0
    for i in range(0, x_uint8.shape[0], batch_size):
        xb = data_mod.to_float(x_uint8[i:i + batch_size]).to(device)
        correct += int((predict(model, xb) == y[i:i + batch_size].to(device)).sum())
    return correct / x_uint8.shape[0]


# ------------------------------------------------------------------------------------ the cache
def checkpoint_spec(model: str, model_kwargs: dict[str, Any], data: str, n_val: int, split_seed: int,
                    recipe: Recipe, procedure: TrainingProcedure | None, seed: int) -> dict[str, Any]:
    """Everything that decides a trained model's weights: its checkpoint key is the hash of this."""
    return {
        "version": TRAIN_CODE_VERSION,
        "model": {"name": model, "kwargs": dict(model_kwargs or {})},
        "data": {"name": data, "n_val": int(n_val), "split_seed": int(split_seed)},
        "recipe": {k: v for k, v in vars(recipe).items()},
        "training": procedure.spec() if procedure is not None else {"procedure": "standard"},
        "seed": int(seed),
    }


def load_or_build(cache: CheckpointCache, key: str, module: nn.Module, spec: dict[str, Any],
                  build: Callable[[], dict[str, Any]], rebuild: bool = False) -> tuple[dict[str, Any], bool]:
    """Entry ``key`` of ``cache`` loaded into ``module``, or ``build()`` (trains ``module`` in place and
    returns the values to store beside it) then stored. Returns (the entry's metadata, whether it was cached).

    Building one key is serialized across processes by a file lock: a second job waiting on the lock finds
    the finished entry and loads it instead of building it again. ``module`` is left on the CPU after a build.
    ``rebuild=True`` builds even when the entry exists, and replaces it.
    """
    meta = None if rebuild else cache.load(key, module, spec)
    if meta is not None:
        return meta, True
    with cache.lock(key):
        meta = None if rebuild else cache.load(key, module, spec)
        if meta is not None:
            return meta, True
        extra = build()
        cache.save(key, module.cpu(), spec, extra)
        return {"key": key, "spec": spec, **extra}, False


def get_or_train(model: nn.Module, spec: dict[str, Any], splits: data_mod.Splits, recipe: Recipe,
                 cache: CheckpointCache, device: torch.device, seed: int,
                 procedure: TrainingProcedure | None = None, progress: bool = True,
                 retrain: bool = False, on_epoch: EpochCallback | None = None) -> dict[str, Any]:
    """Load the checkpoint for ``spec`` from the cache (or the package's shipped checkpoints), or train it
    (``procedure.fit``; standard training without a procedure) and store it; ``retrain=True`` trains even
    when it is cached. Returns the cache metadata with ``cache_hit``.

    While it trains, every epoch of every stage goes to ``on_epoch`` as it ends; the same records are stored
    with the checkpoint (``epochs``), so a cache hit can show the curves it was trained with."""
    procedure = procedure or StandardTraining(recipe.label_smoothing)
    key = content_key(spec)

    def build() -> dict[str, Any]:
        log.info("training %s (checkpoint key %s)", spec.get("model", {}).get("name", "model"), key)
        records: list[dict[str, Any]] = []

        def observe(record: dict[str, Any]) -> None:
            records.append(record)
            if on_epoch is not None:
                on_epoch(record)

        with observing_epochs(observe):
            hist = procedure.fit(model, splits, recipe, device, seed, cache=cache, spec=spec, progress=progress)
        test_acc = accuracy(model, splits.x_test, splits.y_test, device)
        log.info("trained: test accuracy %.4f; checkpoint %s", test_acc, cache.weights_path(key))
        return {"history": hist, "epochs": records, "test_accuracy": test_acc,
                "train_seconds": hist["seconds"][-1] if hist["seconds"] else 0.0}

    meta, hit = load_or_build(cache, key, model, spec, build, rebuild=retrain)
    if hit:
        log.info("loaded cached checkpoint %s", cache.weights_path(key))
    model.to(device).eval()
    return {**meta, "cache_hit": hit}
