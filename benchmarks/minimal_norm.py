"""Minimal-norm attacks against the libraries that implement the same methods, AttackBench-style, in one run.

    .venv/bin/python benchmarks/minimal_norm.py [--models default,adv_trained] [--n 1000] [--budgets 100,1000]
        [--n-at 1000=200] [--out docs/minimal_norm.md] [--only TR,FMN] [--resume]

For each model (``default``: the README's ResNet-20 on Fashion-MNIST; ``adv_trained``: LeNet adversarially
trained by ``defense=adv_training model=lenet``, trained into the cache when missing) and each budget, every
row (``benchmarks/minimal_norm_rows.py``: our TR, DeepFool, CW, FMN, DDN; Foolbox 3, torchattacks and
adv_lib's implementations of the same methods) attacks the first ``--n`` clean-correct test points
(``--n-at 1000=200``: fewer at a budget). Per row: success rate, median and mean norm of the successes,
forward and backward passes per example (one counting proxy for every library), seconds, and the AttackBench
optimality (Cina et al. 2024): with d_i the row's per-example norm (+inf where it failed) and d*_i the
smallest over every row of the same model and norm in the run, both curves r(eps) = fraction with d > eps
are integrated up to D = max d*:

    optimality = 1 - (A_row - A_best) / (D - A_best),   A = mean_i min(d_i, D)   (the exact area)

1 is the per-example best everywhere, 0 fails everywhere (AttackBench integrates the same curves with the
trapezoid rule on their breakpoints, and scales D by the clean accuracy, which is 1 on clean-correct points).
Every returned point is re-verified here: clipped into the box, one forward pass, success = prediction != label.

Rows finish one at a time into ``<out>.rows.jsonl`` (with the per-example norms); ``--resume`` keeps the rows
already there, so an interrupted run loses nothing that finished.
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

from robustbench_lab.app.builders import build_defense, load_model  # noqa: E402
from robustbench_lab.core import data as data_mod  # noqa: E402
from robustbench_lab.core.model import predict  # noqa: E402
from robustbench_lab.core.norms import Norm, norm_of  # noqa: E402
from robustbench_lab.core.recipe import Recipe  # noqa: E402
from benchmarks.attack_runs import cfg_of, external, ours  # noqa: E402
from benchmarks.minimal_norm_report import write  # noqa: E402
from benchmarks.minimal_norm_rows import Row, all_rows  # noqa: E402

MODELS = {"default": [], "adv_trained": ["defense=adv_training", "model=lenet"]}


def load(name: str, device: torch.device):
    cfg = cfg_of(MODELS[name] + ["progress=false"])
    splits = data_mod.load_splits(cfg.data.name, cfg.data.root, False, int(cfg.data.n_val), 10000,
                                  int(cfg.data.split_seed))
    model, info = load_model(cfg, device, build_defense(cfg.defense), Recipe.from_config(cfg.model.train), splits)
    return model, splits, info


def points(model, splits, n: int, device):
    """The first ``n`` clean-correct test points (N, C, H, W), labels, and their test-set indices."""
    x_all = data_mod.to_float(splits.x_test[:max(4 * n, 1000)]).to(device)
    y_all = splits.y_test[:x_all.shape[0]].to(device)
    ok = (predict(model, x_all) == y_all).nonzero().squeeze(1)[:n]
    return x_all[ok], y_all[ok], ok.cpu().numpy()


def run_row(row: Row, model, x, y) -> dict:
    if row.ours is not None:
        res, _ = ours(row.ours[0], row.ours[1], model, x, y, None)
        x_adv, sec, nf, nb = res.x_adv, res.seconds, res.n_forward, res.n_backward
    else:
        torch.manual_seed(0)
        x, y = x.clone(), y.clone()   # some peers detach their inputs in place, which a view does not allow
        x_adv, sec, nf, nb = external(row.fn, model, x, y)
    x_adv = x_adv.detach().clamp(0, 1)
    with torch.no_grad():
        fooled = predict(model, x_adv) != y
    d = norm_of(x_adv - x, Norm.parse(row.norm))
    d = torch.where(fooled, d, torch.full_like(d, float("inf")))
    n = x.shape[0]
    return {"name": row.name, "method": row.method, "norm": row.norm, "library": row.library, "budget": row.budget,
            "note": row.note, "n": n, "seconds": sec, "forward_per_example": nf / n, "backward_per_example": nb / n,
            "load_avg": os.getloadavg()[0], "threads": torch.get_num_threads(), "dist": d.cpu().tolist()}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="default,adv_trained")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--budgets", default="100,1000")
    ap.add_argument("--n-at", default="", help="fewer points at a budget, e.g. 1000=200")
    ap.add_argument("--only", default="", help="comma-separated methods (TR,DeepFool,CW,FMN,DDN,ALMA)")
    ap.add_argument("--libraries", default="", help="comma-separated libraries (default: all installed)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=str(ROOT / "docs" / "minimal_norm.md"))
    ap.add_argument("--resume", action="store_true", help="keep the rows already in <out>.rows.jsonl")
    ap.add_argument("--report-only", action="store_true", help="write the report from <out>.rows.jsonl")
    ap.add_argument("--time-n", type=int, default=0, help="points for interleaved time ratios (0: skip)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions per time ratio")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    out = Path(a.out)
    store = out.with_suffix(".rows.jsonl")
    timing_store = out.with_suffix(".timing.jsonl")
    done = {}
    if (a.resume or a.report_only) and store.exists():
        for line in store.read_text().splitlines():
            r = json.loads(line)
            done[(r["model"], r["name"])] = r
    else:
        store.unlink(missing_ok=True)
        timing_store.unlink(missing_ok=True)
    n_at = dict((int(k), int(v)) for k, v in (p.split("=") for p in a.n_at.split(",") if p))
    only = set(filter(None, a.only.split(",")))
    libs = set(filter(None, a.libraries.split(",")))
    missing: set[str] = set()
    models_info = {}
    if not a.report_only:
        for model_name in a.models.split(","):
            model, splits, info = load(model_name, device)
            x, y, idx = points(model, splits, a.n, device)
            models_info[model_name] = {"n": int(x.shape[0]), "checkpoint": info.get("checkpoint"),
                                       "test_indices_first_last": [int(idx[0]), int(idx[-1])]}
            for b in map(int, a.budgets.split(",")):
                rows, miss = all_rows(b)
                missing.update(miss)
                for row in rows:
                    if (only and row.method not in only) or (libs and row.library not in libs):
                        continue
                    if (model_name, row.name) in done:
                        continue
                    m = min(n_at.get(b, x.shape[0]), row.max_n or x.shape[0])
                    t0 = time.perf_counter()
                    r = {"model": model_name, **run_row(row, model, x[:m], y[:m]), "indices": idx[:m].tolist()}
                    done[(model_name, row.name)] = r
                    with store.open("a") as f:
                        f.write(json.dumps(r) + "\n")
                    fin = np.isfinite(np.asarray(r["dist"], dtype=float))
                    print(f"{model_name} {row.name}: success {fin.mean():.3f}, median "
                          f"{np.median(np.asarray(r['dist'])[fin]) if fin.any() else float('nan'):.4f}, "
                          f"{r['seconds']:.1f} s ({time.perf_counter() - t0:.1f} s with verification), load "
                          f"{r['load_avg']:.1f}", flush=True)
                if a.time_n:
                    for t in interleaved(rows, model, x[:a.time_n], y[:a.time_n], a.repeats, only, libs):
                        with timing_store.open("a") as f:
                            f.write(json.dumps({"model": model_name, **t}) + "\n")
    timing = [json.loads(line) for line in timing_store.read_text().splitlines()] if timing_store.exists() else []
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, device {device}",
            "versions": versions(), "missing": sorted(missing), "models": models_info}
    write(list(done.values()), out, meta, timing)


def interleaved(rows: list[Row], model, x, y, repeats: int, only: set, libs: set) -> list[dict]:
    """Time ratios ours / peer for every method with a peer, from interleaved repetitions (ours, peer 1,
    peer 2, ours, ...) on the same points: the median over repetitions of the per-repetition ratio, so a load
    that changes slowly cancels out."""
    out = []
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        if (only and row.method not in only) or (libs and row.library not in libs and row.library != "robustbench_lab"):
            continue
        groups.setdefault((row.method, row.norm), []).append(row)
    for (method, norm), group in groups.items():
        mine = [r for r in group if r.library == "robustbench_lab"]
        peers = [r for r in group if r.library != "robustbench_lab" and (r.max_n or x.shape[0]) >= x.shape[0]]
        if not mine or not peers:
            continue
        times: dict[str, list[float]] = {r.library: [] for r in [mine[0], *peers]}
        for _ in range(repeats):
            for r in [mine[0], *peers]:
                times[r.library].append(run_row(r, model, x, y)["seconds"])
        for p in peers:
            ratios = [a / b for a, b in zip(times["robustbench_lab"], times[p.library])]
            out.append({"method": method, "norm": norm, "budget": mine[0].budget, "peer": p.library, "n": x.shape[0],
                        "median": float(np.median(ratios)), "all": ratios})
            print(f"time {method}-{norm} @{mine[0].budget} ours / {p.library}: {np.median(ratios):.3f} "
                  f"({', '.join(f'{v:.3f}' for v in ratios)})", flush=True)
    return out


def versions() -> dict[str, str]:
    v = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("foolbox", "torchattacks", "adv_lib"):
        try:
            m = __import__(mod)
            v[mod] = getattr(m, "__version__", None) or _dist_version(mod)
        except ImportError:
            pass
    return v


def _dist_version(mod: str) -> str:
    from importlib.metadata import version
    try:
        return version(mod.replace("_", "-"))
    except Exception:
        return "?"


if __name__ == "__main__":
    main()
