"""Step 4 of the pipeline: the *neural predictor*, a network mapping any image to the PCA scores.

The authors (``neural_predictor_training``) train it with Adam 1e-3, weight decay 5e-4 and the summed
squared error per image, then freeze it, so that every training image (augmented or not) gets a target.
Here it trains through the harness's one loop (``core.train.run_epochs``) on the recipe ``predictor_recipe``.
Modes (``defense.predictor.mode``): ``trained`` (that), ``direct`` (surrogates only: the surrogate itself
gives every image its exact target), and two of the authors' controls: ``random`` (an untrained predictor,
fixed seed, as their ``roi=random``) and ``shuffled`` (trained on image -> response pairs permuted across
images, as their ``--shuffle``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import torch

from robustbench_lab.core import data as data_mod
from robustbench_lab.core import zoo
from robustbench_lab.core.errors import check_choice, check_known_fields, check_number
from robustbench_lab.core.model import Classifier
from robustbench_lab.core.recipe import Recipe
from robustbench_lab.core.train import build_optimizer, build_scheduler, run_epochs

PREDICTOR_MODES = ("trained", "direct", "random", "shuffled")


@dataclasses.dataclass(frozen=True)
class PredictorSettings:
    """How targets reach the training images (``defense.predictor``); everything enters the checkpoint key.

    ``model``: a zoo architecture for the predictor (the authors use a ResNet-18; ``small_cnn`` on CPU), its
    classifier layer sized to the number of PCA components; ``epochs``/``batch_size``/``lr``/``weight_decay``:
    Adam training on the fit pairs (the authors: lr 1e-3, weight decay 5e-4, 40 epochs); ``seed``: its
    initialisation, data order, and the permutation of the shuffled control.
    """

    mode: str = "direct"
    model: str = "small_cnn"
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 5e-4
    seed: int = 0

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None, key: str = "defense.predictor") -> "PredictorSettings":
        d = dict(node or {})
        check_known_fields(cls, d, key, "predictor field")
        s = cls(**d)
        check_choice(f"{key}.mode", s.mode, PREDICTOR_MODES)
        zoo.get_card(s.model, key=f"{key}.model")
        check_number(f"{key}.epochs", s.epochs, low=0, integer=True)
        check_number(f"{key}.batch_size", s.batch_size, low=1, integer=True)
        check_number(f"{key}.lr", s.lr, low=0, low_open=True)
        check_number(f"{key}.weight_decay", s.weight_decay, low=0)
        check_number(f"{key}.seed", s.seed, integer=True)
        return s

    def spec(self) -> dict[str, Any]:
        if self.mode == "direct":
            return {"mode": "direct"}
        if self.mode == "random":
            return {"mode": "random", "model": self.model, "seed": self.seed}
        return dataclasses.asdict(self)


def build_predictor(spec: PredictorSettings, card: data_mod.DataCard, n_out: int) -> Classifier:
    """A zoo network with ``n_out`` outputs on [0, 1] inputs (normalization of the dataset), seeded by ``spec.seed``."""
    zoo.get_card(spec.model, key="defense.predictor.model")
    with torch.random.fork_rng(devices=[]):   # initialise under its own seed; the caller's RNG is untouched
        torch.manual_seed(int(spec.seed))
        # a "class" per PCA component: the zoo sizes the last layer from the data card
        net = zoo.build_classifier(spec.model, dataclasses.replace(card, num_classes=n_out))
    net.name = f"predictor:{spec.model}"
    return net


def shuffled_pairs(targets: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shuffled control's training targets: image i is paired with the response of image perm[i].

    Returns (permuted targets (n, k), perm (n,)); the permutation is fixed by ``seed``.
    """
    g = torch.Generator().manual_seed(int(seed) + 1024)
    perm = torch.randperm(targets.shape[0], generator=g)
    return targets[perm], perm


def pattern_correlation(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Per-image Pearson r between predicted and true response patterns: (n, k), (n, k) -> (n,)."""
    a = pred.double() - pred.double().mean(1, keepdim=True)
    b = true.double() - true.double().mean(1, keepdim=True)
    return torch.nan_to_num((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)))


def predictor_recipe(spec: PredictorSettings) -> Recipe:
    """The predictor's training as a core recipe: Adam at a constant learning rate, no augmentation (the
    targets belong to the unaugmented fit images)."""
    return Recipe(epochs=spec.epochs, batch_size=spec.batch_size, optimizer="adam", lr=spec.lr,
                  weight_decay=spec.weight_decay, schedule="constant", augment=False)


def train_predictor(spec: PredictorSettings, card: data_mod.DataCard, images: torch.Tensor, targets: torch.Tensor,
                    device: torch.device) -> tuple[Classifier, dict[str, Any]]:
    """Train a predictor on ``images`` (n, C, H, W) uint8 or [0, 1] float -> ``targets`` (n, k). Frozen on return.

    Randomness: the initialisation (``build_predictor``) and the batch order (a CPU generator) both seeded with
    ``spec.seed``; the caller's RNG is untouched.
    """
    model = build_predictor(spec, card, targets.shape[1]).to(device)
    recipe = predictor_recipe(spec)
    opt = build_optimizer(model.parameters(), recipe)
    steps_per_epoch = math.ceil(images.shape[0] / spec.batch_size)
    g = torch.Generator().manual_seed(int(spec.seed))

    def batches(_epoch: int):
        for xb, tb in data_mod.batches(images, targets, spec.batch_size, shuffle=True, generator=g):
            yield data_mod.to_float(xb).to(device), tb.to(device)

    def voxel_loss(xb: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
        return (model(xb) - tb).pow(2).sum(1).mean()     # the authors' VoxelLoss: summed over units

    hist = run_epochs(voxel_loss, batches, opt, spec.epochs, steps_per_epoch=steps_per_epoch,
                      scheduler=build_scheduler(opt, recipe, steps_per_epoch * spec.epochs),
                      on_epoch_start=lambda _: model.train(), desc="predictor")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, {"predictor_train_loss": hist["train_loss"]}
