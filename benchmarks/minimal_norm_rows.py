"""The rows of the minimal-norm benchmark: one method, one library, one norm, one budget each.

Every row is a function ``f(model, x, y) -> x_adv`` (peers) or one of our attack configs with overrides
(ours), run on the same points through the same counting proxy, so forward/backward passes are counted the
same way for every library. Budgets are iterations: ``b`` for the iterative attacks (TR, FMN, DDN, ALMA),
the iteration cap for DeepFool (it stops per example at success), and binary-search steps x optimizer steps
for CW (4 x 25 at 100, 9 x 111 at 1000), the same numbers for every implementation of a method.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from benchmarks.attack_runs import foolbox_call

# CW's budget split: (binary-search steps, optimizer steps per search step), about ``b`` steps in all.
CW_SPLIT = {100: (4, 25), 1000: (9, 111)}


@dataclasses.dataclass
class Row:
    method: str                 # the method, the same for every library that implements it (ratios pair on it)
    norm: str                   # l1 | l2 | linf
    library: str                # robustbench_lab | foolbox | torchattacks | adv_lib
    budget: int                 # iterations (see the module docstring)
    note: str = ""              # how the budget maps onto this implementation's options
    ours: tuple[str, list[str]] | None = None          # (attack config, overrides) for our rows
    fn: Callable[..., torch.Tensor] | None = None      # f(model, x, y) -> x_adv for peers
    max_n: int | None = None    # at most this many points (an implementation too slow for all of them)

    @property
    def name(self) -> str:
        return f"{self.library} {self.method}-{self.norm} @{self.budget}"


def cw_split(b: int) -> tuple[int, int]:
    return CW_SPLIT.get(b, (max(1, round(b ** 0.5 / 1.1)), max(1, b // max(1, round(b ** 0.5 / 1.1)))))


def our_rows(b: int) -> list[Row]:
    bs, st = cw_split(b)
    tr = f"{b} iterations, 9 candidate classes, stops per example at success"
    return [
        Row("TR", "l2", "robustbench_lab", b, tr, ours=("trust_region", ["attack.norm=l2", f"attack.iterations={b}"])),
        Row("TR", "linf", "robustbench_lab", b, tr, ours=("trust_region", ["attack.norm=linf", f"attack.iterations={b}"])),
        Row("DeepFool", "l2", "robustbench_lab", b, f"at most {b} steps, 10 candidates, overshoot 0.02",
            ours=("deepfool", ["attack.norm=l2", f"attack.steps={b}"])),
        Row("DeepFool", "linf", "robustbench_lab", b, f"at most {b} steps, 10 candidates, overshoot 0.02",
            ours=("deepfool", ["attack.norm=linf", f"attack.steps={b}"])),
        Row("CW", "l2", "robustbench_lab", b, f"{bs} binary-search x {st} Adam steps, lr 0.01, abort early",
            ours=("cw", [f"attack.binary_search_steps={bs}", f"attack.steps={st}"])),
        Row("FMN", "l1", "robustbench_lab", b, f"{b} steps", ours=("fmn", ["attack.norm=l1", f"attack.steps={b}"])),
        Row("FMN", "l2", "robustbench_lab", b, f"{b} steps", ours=("fmn", ["attack.norm=l2", f"attack.steps={b}"])),
        Row("FMN", "linf", "robustbench_lab", b, f"{b} steps", ours=("fmn", ["attack.norm=linf", f"attack.steps={b}"])),
        Row("DDN", "l2", "robustbench_lab", b, f"{b} steps", ours=("ddn", [f"attack.steps={b}"])),
    ]


def foolbox_rows(b: int, fb: Any) -> list[Row]:
    bs, st = cw_split(b)
    A = fb.attacks
    mk = lambda atk: foolbox_call(fb, atk, None)  # noqa: E731  (unbounded minimization: epsilons=None)
    return [
        Row("DeepFool", "l2", "foolbox", b, f"at most {b} steps, 10 candidates, overshoot 0.02",
            fn=mk(A.L2DeepFoolAttack(steps=b, candidates=10, overshoot=0.02))),
        Row("DeepFool", "linf", "foolbox", b, f"at most {b} steps, 10 candidates, overshoot 0.02",
            fn=mk(A.LinfDeepFoolAttack(steps=b, candidates=10, overshoot=0.02))),
        Row("CW", "l2", "foolbox", b, f"{bs} binary-search x {st} Adam steps, lr 0.01, abort early",
            fn=mk(A.L2CarliniWagnerAttack(binary_search_steps=bs, steps=st, stepsize=0.01, confidence=0,
                                          initial_const=1e-3, abort_early=True))),
        Row("FMN", "l1", "foolbox", b, f"{b} steps", fn=mk(A.L1FMNAttack(steps=b))),
        Row("FMN", "l2", "foolbox", b, f"{b} steps (Foolbox 3.3.4's L2 FMN does not project onto the ball)",
            fn=mk(A.L2FMNAttack(steps=b))),
        Row("FMN", "linf", "foolbox", b, f"{b} steps", fn=mk(A.LInfFMNAttack(steps=b))),
        Row("DDN", "l2", "foolbox", b, f"{b} steps", fn=mk(A.DDNAttack(steps=b))),
    ]


def torchattacks_rows(b: int, ta: Any) -> list[Row]:
    def deepfool(m, x, y):
        adv = ta.DeepFool(m, steps=b, overshoot=0.02)(x, y)
        return adv[0] if isinstance(adv, tuple) else adv
    return [
        # One Jacobian per image, class by class: about 2.7 s per point on this machine, hence 50 points.
        Row("DeepFool", "l2", "torchattacks", b, f"at most {b} steps, overshoot 0.02 (all classes); first 50 points",
            fn=deepfool, max_n=50),
        Row("CW", "l2", "torchattacks", b, f"c = 1 fixed (no binary search), {b} Adam steps, lr 0.01",
            fn=lambda m, x, y: ta.CW(m, c=1, kappa=0, steps=b, lr=0.01)(x, y)),
    ]


def adv_lib_rows(b: int, A: Any) -> list[Row]:
    bs, st = cw_split(b)
    p = {"l1": 1, "l2": 2, "linf": float("inf")}
    tr = f"{b} iterations, 9 candidate classes, adaptive radius (adv_lib default: fixed)"
    return [
        Row("TR", "l2", "adv_lib", b, tr, fn=lambda m, x, y: A.tr(m, x, y, iter=b, adaptive=True, p=2)),
        Row("TR", "linf", "adv_lib", b, tr, fn=lambda m, x, y: A.tr(m, x, y, iter=b, adaptive=True, p=float("inf"))),
        Row("DeepFool", "l2", "adv_lib", b, f"at most {b} steps, overshoot 0.02 (all classes)",
            fn=lambda m, x, y: A.df(m, x, y, steps=b, overshoot=0.02, norm=2)),
        Row("DeepFool", "linf", "adv_lib", b, f"at most {b} steps, overshoot 0.02 (all classes)",
            fn=lambda m, x, y: A.df(m, x, y, steps=b, overshoot=0.02, norm=float("inf"))),
        Row("CW", "l2", "adv_lib", b, f"{bs} binary-search x {st} Adam steps, lr 0.01, abort early",
            fn=lambda m, x, y: A.carlini_wagner_l2(m, x, y, binary_search_steps=bs, max_iterations=st)),
        *[Row("FMN", n, "adv_lib", b, f"{b} steps", fn=(lambda n: lambda m, x, y: A.fmn(m, x, y, norm=p[n], steps=b))(n))
          for n in ("l1", "l2", "linf")],
        Row("DDN", "l2", "adv_lib", b, f"{b} steps, continuous values (levels None)",
            fn=lambda m, x, y: A.ddn(m, x, y, steps=b, levels=None)),
        Row("ALMA", "l2", "adv_lib", b, f"{b} steps (no implementation of ours: a strong reference for the best)",
            fn=lambda m, x, y: A.alma(m, x, y, num_steps=b, distance="l2")),
    ]


def all_rows(b: int) -> tuple[list[Row], list[str]]:
    """Every row at budget ``b``, and the peer libraries that are missing (their rows are left out)."""
    rows, missing = our_rows(b), []
    try:
        import foolbox as fb
        rows += foolbox_rows(b, fb)
    except ImportError:
        missing.append("foolbox")
    try:
        import torchattacks as ta
        rows += torchattacks_rows(b, ta)
    except ImportError:
        missing.append("torchattacks")
    try:
        import adv_lib.attacks as adv_attacks
        rows += adv_lib_rows(b, adv_attacks)
    except ImportError:
        missing.append("adv_lib")
    # The implementations of one method run back to back, so they see the same machine load.
    order = {m: i for i, m in enumerate(dict.fromkeys(r.method for r in rows))}
    rows.sort(key=lambda r: (order[r.method], r.norm))
    return rows, missing
