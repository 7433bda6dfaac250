"""AutoAttack (Croce & Hein 2020), through the ``pyautoattack`` package (0.2.0), L-inf and L2.

The package reseeds torch's global RNG inside every component (``torch.random.manual_seed``) and logs through
``logging``; this module also holds the small bridge both pyautoattack wrappers use (this one and
``attacks.square``): an integer seed drawn from the call's ``torch.Generator``, the global RNG states saved
and restored around the call, and the package's log records and prints captured into a string.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from robustbench_lab.core.attack_base import Attack, AttackFamily
from robustbench_lab.core.errors import ConfigError, check_choice, check_number
from robustbench_lab.core.norms import Norm

log = logging.getLogger(__name__)

VERSIONS = ("standard", "plus", "rand", "custom")
COMPONENTS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
PYAA_LOGGER = "auto-attack"   # the logger pyautoattack.AutoAttack (and its APGD components) write to


# -- the pyautoattack bridge (shared with attacks.square) -----------------------------------------------
def pyaa_norm(norm: Norm) -> str:
    """pyautoattack's spelling of a norm."""
    return {Norm.LINF: "Linf", Norm.L2: "L2"}[norm]


def seed_from(generator: torch.Generator) -> int:
    """An int seed drawn from the call's generator: the package's randomness follows our seed."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))


@contextlib.contextmanager
def preserved_global_rng() -> Iterator[None]:
    """Save torch's (CPU, and initialized CUDA devices'), numpy's and Python's global RNG states; restore them.

    pyautoattack calls ``torch.random.manual_seed`` / ``torch.cuda.random.manual_seed`` inside each component,
    which would otherwise leave the caller's global RNG reseeded.
    """
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(np_state)
        random.setstate(py_state)


# pyautoattack's progress lines worth showing while it runs (a standard run on 500 points takes tens of
# minutes on a CPU): the start of each component and the robust accuracy after it.
LIVE_PREFIXES = ("running ", "robust accuracy after ")


class _ListHandler(logging.Handler):
    def __init__(self, live: Callable[[str], None] | None = None) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.live = live

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if self.live is not None and record.levelno < logging.WARNING:   # warnings are re-emitted afterwards
            msg = record.getMessage()
            if msg.startswith(LIVE_PREFIXES):
                self.live(msg)


@contextlib.contextmanager
def captured_output(logger_names: Sequence[str], sink: list[str],
                    live: Callable[[str], None] | None = None) -> Iterator[None]:
    """Capture records of ``logger_names`` (all levels) and anything printed to stdout into ``sink``.

    pyautoattack logs its progress at DEBUG level; those records are kept here instead of reaching the
    run's log handlers (propagation is switched off during the call). Records at WARNING or above (its
    sanity checks: randomized defense, probability outputs, ...) are re-emitted on this module's logger
    afterwards, so they are not lost. Also restores the Python trace function, which pyautoattack's
    ``check_dynamic`` resets with ``sys.settrace(None)`` (that would switch off coverage or a debugger).
    ``live``: called at once with each progress message (``LIVE_PREFIXES``), so a long run shows where it is.
    """
    handler = _ListHandler(live)
    saved = []
    for name in logger_names:
        lg = logging.getLogger(name)
        saved.append((lg, lg.level, lg.propagate))
        lg.setLevel(logging.DEBUG)
        lg.propagate = False
        lg.addHandler(handler)
    out = io.StringIO()
    trace = sys.gettrace()
    try:
        with contextlib.redirect_stdout(out):
            yield
    finally:
        if sys.gettrace() is not trace:
            sys.settrace(trace)
        for lg, level, propagate in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate
        fmt = logging.Formatter("%(levelname)s %(name)s: %(message)s")
        sink.extend(fmt.format(r) for r in handler.records)
        sink.extend(line for line in out.getvalue().splitlines() if line.strip())
        for r in handler.records:
            if r.levelno >= logging.WARNING:
                log.warning("pyautoattack: %s", r.getMessage())


@contextlib.contextmanager
def mode_guard(model: nn.Module, who: str) -> Iterator[None]:
    """Fail loudly if the wrapped code switches any module of ``model`` from eval to train mode.

    The template puts the model in eval mode before ``run``; results computed after a switch to train mode
    (BatchNorm batch statistics, active dropout) would not be valid. pyautoattack 0.2.0 never calls
    ``train()``, so this only guards against a future version doing it.
    """
    before = {m: m.training for m in model.modules()}
    yield
    flipped = [type(m).__name__ for m, t in before.items() if m.training and not t]
    if flipped:
        for m, t in before.items():
            m.train(t)
        raise RuntimeError(f"{who} switched modules {flipped[:5]} of the model to train mode during the attack; "
                           "its results are not valid for an eval-mode model")


@contextlib.contextmanager
def pyaa_call(model: nn.Module, generator: torch.Generator, who: str, logger_names: Sequence[str] = (),
              live: Callable[[str], None] | None = None) -> Iterator[tuple[int, list[str]]]:
    """The bridge around one pyautoattack call: yields ``(seed, lines)``, the int seed for the package (from
    ``generator``) and the list its captured output fills when the block ends; the global RNG states and the
    model's modes are guarded meanwhile (``preserved_global_rng``, ``captured_output``, ``mode_guard``)."""
    seed = seed_from(generator)
    lines: list[str] = []
    with preserved_global_rng(), captured_output(logger_names, lines, live), mode_guard(model, who):
        yield seed, lines


class LogMixin:
    """Keeps the captured output of pyautoattack calls.

    ``last_log``: the log of the most recent call (one batch); ``log``: every call since construction or
    ``clear_log()``, in order, each headed by its batch size and seed. The evaluator calls an attack once per
    batch, so a run's results should store ``log`` (and call ``clear_log()`` when the run starts).
    Both are kept in private attributes so they stay out of ``Attack.config()``.
    """

    _logs: list[str]

    @property
    def last_log(self) -> str:
        return self._logs[-1] if getattr(self, "_logs", None) else ""

    @property
    def log(self) -> str:
        return "\n".join(getattr(self, "_logs", []))

    def clear_log(self) -> None:
        self._logs = []

    def _record_log(self, header: str, lines: list[str]) -> None:
        if not hasattr(self, "_logs"):
            self._logs = []
        self._logs.append("\n".join([header, *lines]))


# -- the attack ---------------------------------------------------------------------------------------
class AutoAttack(LogMixin, Attack):
    """AutoAttack: the parameter-free ensemble APGD-CE, APGD-T, FAB-T, Square (``version='standard'``).

    Inputs (B, C, H, W) in [0, 1]; returns (B, C, H, W) inside the eps ball and the box. Each component runs
    only on the points the previous ones left robust and the per-example first success is kept (the package's
    own cascade); points never broken come back unchanged. ``version``: ``'standard'`` (APGD-CE 1 restart,
    APGD-T 9 targets, FAB-T 9 targets, Square 5000 queries; the RobustBench setting), ``'plus'`` (adds
    APGD-DLR and FAB, 5 restarts each: much slower), ``'rand'`` (APGD-CE and APGD-DLR with 20-sample EOT,
    for randomized defenses), ``'custom'`` (the components listed in ``attacks``, from
    {apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square}). Beware: pyautoattack applies no version settings to
    ``'custom'``, so there APGD-CE/DLR and FAB run 5 restarts (its constructor defaults) unless
    ``apgd_n_restarts`` says otherwise.

    Optional overrides (``None`` keeps the version's value): ``apgd_n_iter`` (APGD iterations, 100),
    ``apgd_n_restarts`` (restarts of untargeted APGD), ``n_target_classes`` (APGD-T and FAB-T targets, 9),
    ``square_n_queries`` (Square's query budget, 5000). ``batch_size`` is pyautoattack's internal batch.

    The model's passes are counted (the model is passed to the package as is). The package's randomness is
    seeded from the call's generator; torch's global RNG is restored afterwards. Its log (progress, robust
    accuracy after each component, sanity-check warnings, the final norm audit) is captured: ``last_log``,
    ``log`` (see ``LogMixin``); each component's start and the robust accuracy after it also go to this
    module's logger (INFO) as they happen. Cost: APGD is 1 forward + 1 backward per iteration and example; Square uses
    forward passes only; FAB uses per-class gradients.
    """

    name = "autoattack"
    family = AttackFamily.FIXED_EPS
    supported_norms: ClassVar[tuple[Norm, ...]] = (Norm.LINF, Norm.L2)

    def __init__(self, *, norm: str = "linf", version: str = "standard", attacks: Sequence[str] | None = None,
                 apgd_n_iter: int | None = None, apgd_n_restarts: int | None = None,
                 n_target_classes: int | None = None, square_n_queries: int | None = None,
                 batch_size: int = 250) -> None:
        super().__init__(norm=norm)
        check_choice("attack.version", version, VERSIONS)
        if attacks is not None:
            if isinstance(attacks, str):
                raise ConfigError("attack.attacks", attacks, "a list of component names, e.g. [apgd-ce, apgd-t]")
            attacks = [check_choice("attack.attacks", str(a), COMPONENTS) for a in attacks]
            if version != "custom" and attacks:
                raise ConfigError("attack.attacks", attacks, "null unless attack.version=custom",
                                  f"version {version!r} fixes its own components")
        if version == "custom" and not attacks:
            raise ConfigError("attack.attacks", attacks, "a non-empty list of " + ", ".join(COMPONENTS),
                              "attack.version=custom runs exactly the listed components")
        for key, v in (("apgd_n_iter", apgd_n_iter), ("apgd_n_restarts", apgd_n_restarts),
                       ("square_n_queries", square_n_queries)):
            check_number(f"attack.{key}", v, low=1, integer=True, allow_none=True, hint="null keeps the version's")
        check_number("attack.batch_size", batch_size, low=1, integer=True)
        check_number("attack.n_target_classes", n_target_classes, low=1, high=9, integer=True, allow_none=True,
                     hint="null keeps the version's")
        self.version = version
        self.attacks = list(attacks) if attacks else None
        self.apgd_n_iter = apgd_n_iter
        self.apgd_n_restarts = apgd_n_restarts
        self.n_target_classes = n_target_classes
        self.square_n_queries = square_n_queries
        self.batch_size = int(batch_size)
        self._logs: list[str] = []

    def _build(self, model: nn.Module, eps: float, seed: int, device: torch.device):
        from pyautoattack import AutoAttack as PyAA
        from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

        aa = PyAA(model, attacks=self.attacks if self.version == "custom" else None, device=device,
                  eps=float(eps), norm=pyaa_norm(self.norm), seed=seed, version=self.version)
        if self.apgd_n_iter is not None:
            # APGD derives its checkpoint schedule from n_iter in __init__: rebuild rather than set n_iter.
            old, old_t = aa.apgd, aa.apgd_targeted
            aa.apgd = APGDAttack(model, n_iter=self.apgd_n_iter, norm=old.norm, n_restarts=old.n_restarts,
                                 eps=old.eps, seed=seed, loss=old.loss, eot_iter=old.eot_iter, rho=old.thr_decr,
                                 verbose=False, device=device, use_largereps=old.use_largereps,
                                 logger=aa.logger)
            aa.apgd_targeted = APGDAttack_targeted(
                model, n_iter=self.apgd_n_iter, norm=old_t.norm, n_restarts=old_t.n_restarts, eps=old_t.eps,
                seed=seed, eot_iter=old_t.eot_iter, rho=old_t.thr_decr, n_target_classes=old_t.n_target_classes,
                verbose=False, device=device, use_largereps=old_t.use_largereps, logger=aa.logger)
        if self.apgd_n_restarts is not None:
            aa.apgd.n_restarts = self.apgd_n_restarts
        if self.n_target_classes is not None:
            aa.apgd_targeted.n_target_classes = self.n_target_classes
            aa.fab.n_target_classes = self.n_target_classes
        if self.square_n_queries is not None:
            aa.square.n_queries = self.square_n_queries
        return aa

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
            generator: torch.Generator) -> torch.Tensor:
        assert eps is not None
        if x.shape[0] == 0:
            return x.clone()
        _reset_dynamic_check_counters()
        def live(msg: str) -> None:
            log.info("autoattack (%d points): %s", x.shape[0], msg)

        with pyaa_call(model, generator, "pyautoattack", [PYAA_LOGGER], live) as (seed, lines):
            aa = self._build(model, float(eps), seed, x.device)
            x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=self.batch_size)
        comps = ",".join(aa.attacks_to_run)
        self._record_log(f"== autoattack version={self.version} attacks={comps} norm={self.norm.value} "
                         f"eps={float(eps):g} n={x.shape[0]} seed={seed}", lines)
        return x_adv.detach()


def _reset_dynamic_check_counters() -> None:
    """pyautoattack's ``check_dynamic`` counts calls in a module-level dict that it never resets: after one
    flagged model, every later evaluation in the process would warn "dynamic defense". Reset it per call."""
    try:
        from pyautoattack import checks
    except ImportError:  # pragma: no cover
        return
    funcs = getattr(checks, "funcs", None)
    if isinstance(funcs, dict):
        for k in funcs:
            funcs[k] = 0
