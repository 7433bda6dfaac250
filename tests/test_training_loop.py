"""The one training loop (robustbench_lab.core.train): standard training equals a hand-written reference loop
weight for weight, the procedure's hooks are called in order and their parameters trained, get_or_train
goes through ``fit``, and the loop's callbacks, history and per-step schedule do what they say."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustbench_lab.core import data as data_mod
from robustbench_lab.core.cache import CheckpointCache, content_key
from robustbench_lab.core.defense_base import TrainingProcedure as ReExported
from robustbench_lab.core.model import Classifier
from robustbench_lab.core.recipe import Recipe
from robustbench_lab.core.train import (PerStepLR, StandardTraining, TrainingProcedure, get_or_train, run_epochs,
                                        train)

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def _splits(n_train: int = 40, seed: int = 0) -> data_mod.Splits:
    g = torch.Generator().manual_seed(seed)
    n = n_train + 20
    x = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    tr, va, te = slice(0, n_train), slice(n_train, n_train + 10), slice(n_train + 10, n)
    return data_mod.Splits(data_mod.get_card("fashion_mnist"), x[tr], y[tr], x[va], y[va], x[te], y[te],
                           torch.arange(10), torch.arange(10))


def _model(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 16), nn.ReLU(), nn.Linear(16, 10))
    return Classifier(net, (0.5,), (0.25,), 10)


def _reference(model: nn.Module, splits: data_mod.Splits, r: Recipe, seed: int) -> None:
    """Standard training written out by hand: shuffled batches from a generator seeded with ``seed``,
    optional augmentation from the same generator, Nesterov SGD, OneCycle stepped per batch."""
    g = torch.Generator().manual_seed(seed)
    x_tr, y_tr = splits.x_train[:r.max_train], splits.y_train[:r.max_train]
    opt = torch.optim.SGD(model.parameters(), lr=r.lr, momentum=r.momentum, nesterov=True, weight_decay=r.weight_decay)
    steps = -(-x_tr.shape[0] // r.batch_size) * r.epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r.lr, total_steps=steps, pct_start=r.warmup_frac,
                                                anneal_strategy="cos", div_factor=10.0, final_div_factor=100.0)
    for _ in range(r.epochs):
        model.train()
        order = torch.randperm(x_tr.shape[0], generator=g)
        for i in range(0, x_tr.shape[0], r.batch_size):
            idx = order[i:i + r.batch_size]
            xb = x_tr[idx].float() / 255.0
            if r.augment:
                xb = data_mod.augment(xb, splits.card, g)
            loss = F.cross_entropy(model(xb), y_tr[idx], label_smoothing=r.label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()


@pytest.mark.parametrize("augment", [False, True])
def test_standard_training_equals_a_hand_written_loop(augment):
    splits = _splits()
    r = Recipe(epochs=1, batch_size=10, max_train=30, lr=0.1, augment=augment, label_smoothing=0.1)   # 3 steps
    ours, ref = _model(), _model()
    hist = train(ours, splits, r, CPU, seed=3, progress=False)
    _reference(ref, splits, r, seed=3)
    assert hist["epoch"] == [1] and len(hist["train_loss"]) == len(hist["val_accuracy"]) == len(hist["seconds"]) == 1
    for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    assert not torch.equal(ours.state_dict()["net.1.weight"], _model().state_dict()["net.1.weight"])   # it trained
    other = _model()
    train(other, splits, r, CPU, seed=4, progress=False)
    assert not torch.equal(other.state_dict()["net.1.weight"], ours.state_dict()["net.1.weight"])      # seed matters


class Recording(TrainingProcedure):
    """CE plus a pull of an extra scalar (not part of the model) towards 1; records the hooks called."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.extra: nn.Parameter | None = None

    def prepare(self, model: nn.Module, splits: data_mod.Splits | None, device: torch.device) -> None:
        self.calls.append("prepare")
        self.extra = nn.Parameter(torch.zeros(()))

    def parameters(self) -> list[nn.Parameter]:
        self.calls.append("parameters")
        return [self.extra] if self.extra is not None else []

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        self.calls.append("loss")
        return F.cross_entropy(model(x), y) + (self.extra - 1.0) ** 2

    def spec(self) -> dict:
        return {"procedure": "recording"}


def test_the_loop_calls_the_declared_hooks_and_trains_the_procedures_parameters(tmp_path):
    assert ReExported is TrainingProcedure                      # one class, importable from the defense protocols
    splits, r = _splits(), Recipe(epochs=2, batch_size=10, max_train=30, augment=False, schedule="constant",
                                  nesterov=False, momentum=0.0, weight_decay=0.0, lr=0.1)
    p = Recording()
    train(_model(), splits, r, CPU, seed=0, procedure=p, progress=False)
    assert p.calls == ["prepare", "parameters"] + ["loss"] * 6
    assert float(p.extra.detach()) == pytest.approx(1 - 0.8 ** 6)        # SGD on (e - 1)^2 at lr 0.1: 6 steps
    # get_or_train goes through fit (default: the same loop), stores the model only, then hits the cache
    cache, p2 = CheckpointCache(tmp_path), Recording()
    spec = {"model": {"name": "mlp"}, "training": p2.spec(), "seed": 0}
    m = _model()
    meta = get_or_train(m, spec, splits, r, cache, CPU, 0, p2, progress=False)
    assert meta["cache_hit"] is False and p2.calls[:2] == ["prepare", "parameters"] and p2.calls.count("loss") == 6
    assert meta["key"] == content_key(spec) and len(meta["history"]["epoch"]) == 2
    again, p3 = _model(seed=1), Recording()
    assert get_or_train(again, spec, splits, r, cache, CPU, 0, p3, progress=False)["cache_hit"] is True
    assert p3.calls == [] and all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values()))


def test_get_or_train_calls_an_overridden_fit_with_the_cache_and_the_spec(tmp_path):
    seen = {}

    class Staged(StandardTraining):
        def fit(self, model, splits, recipe, device, seed, *, cache=None, spec=None, progress=False):
            seen.update(cache=cache, spec=spec, seed=seed)
            return {"seconds": [1.5], "stages": 2}

    cache, spec = CheckpointCache(tmp_path), {"model": {"name": "mlp"}, "seed": 5}
    meta = get_or_train(_model(), spec, _splits(), Recipe(epochs=1), cache, CPU, 5, Staged(), progress=False)
    assert seen == {"cache": cache, "spec": spec, "seed": 5}
    assert meta["history"]["stages"] == 2 and meta["train_seconds"] == 1.5
    with pytest.raises(NotImplementedError):
        TrainingProcedure().loss(_model(), torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.long),
                                 torch.Generator())


def test_run_epochs_callbacks_history_and_a_per_step_schedule():
    w = nn.Parameter(torch.tensor(0.0))
    opt = torch.optim.SGD([w], lr=99.0)
    sched = PerStepLR(opt, lambda k: 0.1 * k)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)      # step 1's rate, set before step 1
    events, lrs = [], []

    def loss(xb: torch.Tensor) -> torch.Tensor:
        lrs.append(opt.param_groups[0]["lr"])
        return w * 0 + xb.sum() / xb.shape[0]                   # the batch's mean value

    def batches(epoch: int):
        events.append(("batches", epoch))
        yield (torch.full((2,), float(epoch)),)
        yield (torch.full((1,), 3.0),)

    hist = run_epochs(loss, batches, opt, 2, scheduler=sched, on_epoch_start=lambda e: events.append(("start", e)),
                      on_epoch_end=lambda e, m: events.append(("end", e)) or {"double": 2 * m}, columns=("double",))
    assert events == [("start", 0), ("batches", 0), ("end", 0), ("start", 1), ("batches", 1), ("end", 1)]
    assert lrs == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert hist["epoch"] == [1, 2] and hist["train_loss"] == pytest.approx([1.0, 5 / 3])   # weighted by batch size
    assert hist["double"] == pytest.approx([2.0, 10 / 3]) and len(hist["seconds"]) == 2
    assert list(hist) == ["epoch", "train_loss", "double", "seconds"]
