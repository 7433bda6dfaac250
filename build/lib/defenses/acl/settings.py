"""ACL's settings: the choices, the pre-training and fine-tuning dataclasses, and their validation.

Every value enters a cache key (the encoder's or the classifier's), so the dataclasses keep the values as
given (an integer stays an integer) and only turn containers into plain lists: the keys of entries cached
before this module existed stay the same.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence, TypeVar

from robustbench_lab.core.errors import ConfigError, check_bool, check_choice, check_known_fields, check_number

VARIANTS = ("none", "simclr", "a2a", "a2s", "ds")
PROTOCOLS = ("slf", "alf", "aff")
TRANSFER_BN = ("auto", "normal", "pgd")
PRETRAIN_OPTIMIZERS = ("lars", "sgd")
SELECT_BY = ("robust", "clean", "last")
# bump when a change in defenses.acl changes pre-trained or fine-tuned weights. 2: SimCLR augmentations
# through torchvision.transforms.v2 (integer crop boxes, antialiased bicubic resize) instead of a
# hand-written sampling grid and HSV conversion
ACL_CODE_VERSION = 2

T = TypeVar("T")


def plain(value: Any) -> Any:
    """A config value as plain Python: mappings -> dict, sequences (not strings) -> list, recursively.
    Hydra hands nested nodes over as its own container types; nothing here imports them."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [plain(v) for v in value]
    return value


def from_mapping(cls: type[T], node: Mapping[str, Any] | None, key: str) -> T:
    """``cls`` (a settings dataclass with ``validate(key)``) from a config node; unknown fields and bad
    values raise a ConfigError naming ``key.<field>``."""
    d = plain(node) or {}
    if not isinstance(d, dict):
        raise ConfigError(key, node, f"a mapping of {cls.__name__} fields")
    check_known_fields(cls, d, key)
    return cls(**d).validate(key)   # type: ignore[attr-defined]


def _numbers(value: Any, length: int, **bounds: Any) -> bool:
    """Whether ``value`` is a list of ``length`` numbers each within ``check_number``'s ``bounds``."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != length:
        return False
    try:
        for v in value:
            check_number("", v, **bounds)
    except ConfigError:
        return False
    return True


def check_pair(key: str, value: Any, *, high: float | None = None, allow_none: bool = False,
               hint: str = "") -> Any:
    """``value`` if it is [lo, hi] with 0 < lo <= hi (<= ``high``), else a ConfigError naming ``key``."""
    if value is None and allow_none:
        return None
    if not (_numbers(value, 2, low=0, low_open=True, high=high) and value[0] <= value[1]):
        raise ConfigError(key, value, "[lo, hi] with 0 < lo <= hi" + (f" <= {high}" if high is not None else "")
                          + (", or null" if allow_none else ""), hint)
    return value


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Pre-training settings (``defense.pretrain.*``); all enter the encoder's cache key.

    Defaults are the authors' CIFAR-10 values except ``epochs``/``batch_size``/``max_train`` (CPU-sized in
    ``robustbench_lab/conf/defense/acl.yaml``). ``crop_scale: null`` picks per dataset: (0.1, 1) on colour data (the paper),
    (0.3, 1) on grayscale data (see ``docs/acl.md``: a 10%-area crop of a 28 x 28 image is a 9 x 9 patch).
    ``hflip: null`` follows the data card (no flips on digits).
    """

    epochs: int = 1000
    batch_size: int = 512
    optimizer: str = "lars"
    lr: float = 5.0
    momentum: float = 0.9
    weight_decay: float = 1e-6
    eta: float = 0.001               # LARS trust coefficient
    warmup_epochs: float = 10.0
    min_lr: float = 1e-6
    max_train: int = 0               # >0: pre-train on the first N training points only
    eps: float = 8 / 255             # contrastive PGD, L-inf, input space
    step_size: float = 2 / 255
    steps: int = 5
    random_start: bool = True
    crop_scale: Any = None           # [lo, hi] area fraction, or null (per dataset)
    crop_ratio: Any = (3 / 4, 4 / 3)
    hflip: Any = None                # true / false / null (data card)
    color_jitter: Any = (0.4, 0.4, 0.4, 0.1)   # brightness, contrast, saturation, hue; null: none
    jitter_p: float = 0.8
    gray_p: float = 0.2

    def validate(self, key: str = "defense.pretrain") -> "PretrainConfig":
        check_number(f"{key}.epochs", self.epochs, low=0, integer=True)
        check_number(f"{key}.batch_size", self.batch_size, low=2, integer=True)
        check_choice(f"{key}.optimizer", self.optimizer, PRETRAIN_OPTIMIZERS)
        for name in ("lr", "eta", "step_size"):
            check_number(f"{key}.{name}", getattr(self, name), low=0, low_open=True)
        for name in ("weight_decay", "warmup_epochs", "min_lr"):
            check_number(f"{key}.{name}", getattr(self, name), low=0)
        for name in ("momentum", "jitter_p", "gray_p"):
            check_number(f"{key}.{name}", getattr(self, name), low=0, high=1)
        check_number(f"{key}.max_train", self.max_train, low=0, integer=True, hint="0: the whole training split")
        check_number(f"{key}.eps", self.eps, low=0, low_open=True, high=1, hint="L-inf, [0, 1] pixels")
        check_number(f"{key}.steps", self.steps, low=1, integer=True)
        check_bool(f"{key}.random_start", self.random_start)
        check_pair(f"{key}.crop_scale", self.crop_scale, high=1, allow_none=True,
                   hint="area fractions; null: per dataset")
        check_pair(f"{key}.crop_ratio", self.crop_ratio, hint="aspect ratios (width / height)")
        check_choice(f"{key}.hflip", self.hflip, (None, True, False), "null: the data card's choice")
        cj = self.color_jitter
        if cj is not None and not (_numbers(cj, 4, low=0) and cj[3] <= 0.5):
            raise ConfigError(f"{key}.color_jitter", cj, "[brightness, contrast, saturation, hue] >= 0 (hue <= 0.5), "
                              "or null")
        return self

    def spec(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


@dataclasses.dataclass(frozen=True)
class DownstreamConfig:
    """Fine-tuning settings besides the recipe (``defense.downstream.*``); they enter the checkpoint key.

    ``eps``/``step_size``/``steps``/``beta``/``trades_init_std``: the TRADES inner maximization of ALF/AFF
    (the authors: 10 steps of 2/255 at 8/255, beta 6). Model selection: after every epoch the robust
    accuracy (``select_by='robust'``; PGD-CE, ``select_steps`` steps of ``select_step_size``, at
    ``select_eps``, random start) or the clean accuracy on the first ``select_n`` validation points (0: the
    whole validation split); the best epoch's weights are kept (the first on ties). ``select_by='last'``
    keeps the last epoch.
    """

    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    beta: float = 6.0
    trades_init_std: float = 0.001
    select_by: str = "robust"
    select_n: int = 0                # 0: the whole validation split (data.n_val)
    select_steps: int = 10
    select_step_size: Any = None     # null: 2.5 * select_eps / select_steps
    select_eps: Any = None           # null: eps

    def validate(self, key: str = "defense.downstream") -> "DownstreamConfig":
        check_number(f"{key}.eps", self.eps, low=0, low_open=True, high=1, hint="L-inf, [0, 1] pixels")
        check_number(f"{key}.step_size", self.step_size, low=0, low_open=True)
        check_number(f"{key}.steps", self.steps, low=1, integer=True)
        check_number(f"{key}.beta", self.beta, low=0)
        check_number(f"{key}.trades_init_std", self.trades_init_std, low=0)
        check_choice(f"{key}.select_by", self.select_by, SELECT_BY)
        check_number(f"{key}.select_n", self.select_n, low=0, integer=True, hint="0: the whole validation split")
        check_number(f"{key}.select_steps", self.select_steps, low=1, integer=True)
        check_number(f"{key}.select_step_size", self.select_step_size, low=0, low_open=True, allow_none=True)
        check_number(f"{key}.select_eps", self.select_eps, low=0, low_open=True, high=1, allow_none=True)
        return self

    @property
    def sel_eps(self) -> float:
        return float(self.select_eps if self.select_eps is not None else self.eps)

    @property
    def sel_step(self) -> float:
        return float(self.select_step_size if self.select_step_size is not None
                     else 2.5 * self.sel_eps / self.select_steps)

    def spec(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
