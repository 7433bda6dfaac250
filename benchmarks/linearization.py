"""Linearization benchmark: the three ways to the singular values of one residual unit, timed and compared.

    .venv/bin/python benchmarks/linearization.py [--model resnet20] [--unit s1u1] [--k 20] [--threads 2]
    .venv/bin/python benchmarks/linearization.py --tiny          # seconds: a random small net, no data

Default: the first unit of stage 1 of the default-data ResNet (Fashion-MNIST 1x28x28, unit 16x28x28 =
12,544 dims), at the first test image, boundary "pre" (J = I + dF). The model comes through the harness
cache exactly as in ``benchmarks/attacks.py`` (trained by ``python run.py model=...`` if not cached).
Rows:

* explicit: dense Jacobian by batched VJPs (``--batch-size``) + singular-values-only SVD (all n values);
* lowrank: the exact reduction J = lambda*I + A B (identity-shortcut units only; all n values);
* lanczos: the top ``--k`` by ARPACK on jvp / vjp products (``--bottom``: also the bottom k).

Agreement: max relative difference of every pair over the values they share (all n for explicit vs
lowrank, the top k for Lanczos). Writes a Markdown table (``--out``) and the raw numbers as JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("ROBUSTBENCH_LAB_ROOT", str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from robustbench_lab.app.builders import CONF_DIR, build_defense, load_model as load_run_model  # noqa: E402
from robustbench_lab.core import data as data_mod  # noqa: E402
from robustbench_lab.core.model import Classifier  # noqa: E402
from robustbench_lab.core.recipe import Recipe  # noqa: E402
from robustbench_lab.core.zoo import CifarResNet  # noqa: E402
from robustbench_lab.linearization.operators import DTYPES, TorchJacobian  # noqa: E402
from robustbench_lab.linearization.options import LinearizeOptions  # noqa: E402
from robustbench_lab.linearization.spectra import (count_equal_one, svd_explicit, svd_lanczos,  # noqa: E402
                                                   svd_lowrank)
from robustbench_lab.linearization.units import (find_unit, get_block, has_identity_shortcut,  # noqa: E402
                                                 unit_function, unit_input)

METHODS = ("explicit", "lowrank", "lanczos")   # the three ways; "auto" (choosing among them) is not timed


def load_model(name: str, device: torch.device) -> tuple[Classifier, torch.Tensor, str]:
    """The cached trained model ``name`` on the default data, loaded like a run's (trained if not cached),
    and the first 16 test images."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={name}"])
    splits = data_mod.load_splits(cfg.data.name, cfg.data.root, False, int(cfg.data.n_val), 10000, 0)
    model, _ = load_run_model(cfg, device, build_defense(cfg.defense), Recipe.from_config(cfg.model.train), splits)
    x = data_mod.to_float(splits.x_test[:16]).to(device)
    return model, x, f"{name} on {cfg.data.name} (cached checkpoint)"


def tiny_model(device: torch.device) -> tuple[Classifier, torch.Tensor, str]:
    """A random small ResNet-8 (width 8) on 1x12x12 inputs with non-trivial BatchNorm statistics."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = CifarResNet(depth=8, in_channels=1, num_classes=10, width=8).train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(32, 1, 12, 12, generator=g))
    model = Classifier(net, (0.3,), (0.35,), 10, name="tiny_resnet8").to(device).eval()
    return model, torch.rand(4, 1, 12, 12, generator=g).to(device), "random ResNet-8, width 8, 1x12x12 (--tiny)"


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-6))) if a.size else float("nan")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet20", help="a ResNet model card (resnet20/32/44/56/110, ...)")
    ap.add_argument("--unit", default="s1u1")
    ap.add_argument("--image", type=int, default=0, help="index among the first 16 test images")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--bottom", action="store_true", help="also the bottom k by Lanczos (slow to converge)")
    ap.add_argument("--batch-size", type=int, default=LinearizeOptions().batch_size)
    ap.add_argument("--dtype", default=LinearizeOptions().dtype, choices=list(DTYPES))
    ap.add_argument("--methods", default=",".join(METHODS), help=f"a comma-separated subset of {METHODS}")
    ap.add_argument("--direct-ratio", type=float, default=0.8,
                    help="lowrank: form J directly when 2r > ratio * n (1.0 forces the QR reduction; slow for "
                         "basic blocks, where 2r ~ n)")
    ap.add_argument("--threads", type=int, default=0, help="torch/BLAS threads (0: leave as is)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tiny", action="store_true", help="a random small net instead of the trained model")
    ap.add_argument("--out", default="", help="Markdown path (default docs/linearization_benchmark.md; "
                    "with --tiny outputs/benchmarks/linearization_tiny.md)")
    a = ap.parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    out = Path(a.out) if a.out else (ROOT / "outputs" / "benchmarks" / "linearization_tiny.md" if a.tiny
                                     else ROOT / "docs" / "linearization_benchmark.md")
    model, x, what = tiny_model(device) if a.tiny else load_model(a.model, device)
    ref = find_unit(model, a.unit, key="--unit")
    block = get_block(model, ref)
    x0 = unit_input(model, x[a.image:a.image + 1], ref)[0].detach()
    dtype = DTYPES[a.dtype]
    methods = [m for m in a.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"--methods: unknown {unknown}; choose from {METHODS}")
    n = x0.numel()
    print(f"{what}: unit {ref.name} ({type(block).__name__}), input {tuple(x0.shape)} = {n} dims, "
          f"{torch.get_num_threads()} threads", flush=True)

    rows: list[dict] = []
    spectra: dict[str, np.ndarray] = {}

    def record(name: str, sp, note: str = "") -> None:
        spectra[name] = sp.values
        row = {"method": name, "values": int(sp.values.size), "complete": sp.complete, "seconds": sp.seconds,
               "seconds_products": sp.extra.get("seconds_products"),
               "seconds_linalg": sp.extra.get("seconds_svd", sp.extra.get("seconds_linalg")),
               "sigma_max": float(sp.values[0]), "sigma_min": float(sp.values[-1]) if sp.complete else None,
               "n_equal_one": count_equal_one(sp.values, 1e-3) if sp.complete else None, "note": note}
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    op = TorchJacobian(unit_function(block, "pre"), x0, batch_size=a.batch_size, dtype=dtype)
    if "explicit" in methods:
        sp = svd_explicit(op)
        record("explicit", sp, f"{n} VJPs in batches of {a.batch_size} ({a.dtype}) + values-only SVD "
                               f"({sp.extra['dtype']})")
    if "lowrank" in methods:
        if has_identity_shortcut(block):
            sp = svd_lowrank(block, x0, batch_size=a.batch_size, dtype=dtype, direct_ratio=a.direct_ratio)
            record("lowrank", sp, f"r = {sp.extra['r']} active mid units ({100 * sp.extra['active_fraction']:.0f}%), "
                                  f"m = {sp.extra['m']}, path {sp.extra['path']}, {sp.extra['precision']}")
        else:
            print(f"lowrank skipped: {ref.name} has no identity shortcut", file=sys.stderr)
    if "lanczos" in methods:
        k = min(a.k, n - 1)
        sp = svd_lanczos(op, k, "LM")
        record("lanczos", sp, f"top {k}, ARPACK, {sp.extra['n_jvp']} JVPs + {sp.extra['n_vjp']} VJPs")
        if a.bottom:
            sp = svd_lanczos(op, k, "SM")
            spectra["lanczos_bottom"] = sp.values
            record("lanczos_bottom", sp, f"bottom {k}, ARPACK, {sp.extra['n_jvp']} JVPs + {sp.extra['n_vjp']} VJPs")

    agree: dict[str, float] = {}
    if "explicit" in spectra and "lowrank" in spectra:
        agree["lowrank_vs_explicit_all"] = rel_diff(spectra["lowrank"], spectra["explicit"])
    for full in ("explicit", "lowrank"):
        if full in spectra and "lanczos" in spectra:
            kk = spectra["lanczos"].size
            agree[f"lanczos_vs_{full}_top{kk}"] = rel_diff(spectra["lanczos"], spectra[full][:kk])
        if full in spectra and "lanczos_bottom" in spectra:
            kk = spectra["lanczos_bottom"].size
            agree[f"lanczos_bottom_vs_{full}"] = rel_diff(spectra["lanczos_bottom"], spectra[full][-kk:])
    print(json.dumps(agree), flush=True)
    result = {"setting": what, "model": "tiny" if a.tiny else a.model, "unit": ref.name,
              "block": type(block).__name__, "boundary": "pre", "n": n, "in_shape": list(x0.shape),
              "image": a.image, "k": a.k, "batch_size": a.batch_size, "dtype": a.dtype,
              "threads": torch.get_num_threads(), "device": str(device), "torch": torch.__version__,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows, "agreement": agree}
    write(result, out)
    return result


def write(res: dict, out: Path) -> None:
    cols = ["method", "values", "complete", "seconds", "seconds_products", "seconds_linalg", "sigma_max",
            "sigma_min", "n_equal_one", "note"]
    fmt = (lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)))  # noqa: E731
    lines = ["# Linearization benchmark", "",
             f"{res['setting']}; unit {res['unit']} ({res['block']}), boundary pre (J = I + dF), input "
             f"{tuple(res['in_shape'])} = {res['n']} dims, test image {res['image']}. {res['dtype']} products, batch "
             f"{res['batch_size']}; {res['threads']} threads, device {res['device']}; {res['machine']}; torch "
             f"{res['torch']}, Python {res['python']}; {res['date']}. Generated by `benchmarks/linearization.py`.",
             "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in res["rows"]:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
    lines += ["", "`n_equal_one`: singular values within 1e-3 of 1. Agreement (max relative difference over the "
              "values both methods have):", ""]
    lines += [f"- {k}: {v:.2e}" for k, v in res["agreement"].items()]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
