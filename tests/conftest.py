"""Shared fixtures: a small model trained once per session on a slice of the real default data (or, where
Fashion-MNIST is not installed, on a synthetic task the tests make), and Hydra config composition."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("ROBUSTBENCH_LAB_ROOT", str(ROOT))
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# In CI a missing dataset or reference library is a failure, not a skip: a skip there would hide that the
# suite did not test what it claims. Skips by design (a case that does not apply) keep their reasons.
MISSING_PREREQUISITE = ("not installed", "could not import", "no module named")


def ci_fails_skip(reason: str, environ: dict | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get("CI", "").lower() == "true" and any(m in reason.lower() for m in MISSING_PREREQUISITE)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        if ci_fails_skip(reason):
            report.outcome = "failed"
            report.longrepr = f"CI=true: a missing prerequisite is a failure, not a skip ({reason})"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small-batch work (modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``): on a 2-core machine shared with other jobs,
    thread hand-offs made many small passes 6-10x slower. The previous setting is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fashion_available() -> bool:
    from robustbench_lab.core.data import SYSTEM_FASHION_MNIST
    return (SYSTEM_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file() or \
        (SYSTEM_FASHION_MNIST / "train-images-idx3-ubyte").is_file()


@pytest.fixture(scope="session")
def fmnist_small():
    """(x_train, y_train, x_test, y_test) float tensors in [0, 1]: 6000 train / 500 test points."""
    from robustbench_lab.core import data
    if not fashion_available():
        pytest.skip("Fashion-MNIST is not installed (bash scripts/setup.sh installs it)")
    s = data.load_splits("fashion_mnist", "/nonexistent", n_val=0, n_eval=500, split_seed=0)
    return (data.to_float(s.x_train[:6000]), s.y_train[:6000], data.to_float(s.x_eval), s.y_eval)


@pytest.fixture(scope="session")
def trained_small_cnn(fmnist_small):
    """A SmallCNN (width 32) trained for 3 epochs on 6000 Fashion-MNIST points (~85% test accuracy).

    Trained on one thread whatever the caller's setting, so every test sees the same model: with the
    machine's default (2 threads) the summation order differs and so do the weights, and tests calibrated on
    one model would depend on which module asked for the fixture first."""
    from robustbench_lab.core.model import Classifier
    from robustbench_lab.core.zoo import SmallCNN
    x, y, xt, yt = fmnist_small
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_small_cnn(Classifier, SmallCNN, x, y, xt, yt)
    finally:
        torch.set_num_threads(n_threads)


def _train_small_cnn(Classifier, SmallCNN, x, y, xt, yt):
    torch.manual_seed(0)
    m = Classifier(SmallCNN(1, 10, width=32), (0.286,), (0.353,), 10)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], 128):
            idx = perm[i:i + 128]
            loss = torch.nn.functional.cross_entropy(m(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        acc = (m(xt).argmax(1) == yt).float().mean().item()
    assert acc > 0.75, f"fixture model trained badly: {acc}"
    return m


@pytest.fixture()
def tmp_root(tmp_path, monkeypatch):
    """An isolated project root for outputs and cache (data still comes from the system install)."""
    monkeypatch.setenv("ROBUSTBENCH_LAB_ROOT", str(tmp_path))
    monkeypatch.setenv("ROBUSTBENCH_LAB_CACHE", str(tmp_path / "cache"))
    return tmp_path


def compose(overrides: list[str] | None = None, return_hydra_config: bool = False):
    from hydra import compose as h_compose, initialize_config_dir

    import robustbench_lab.app.schema  # noqa: F401  (registers the structured-config schemas in the ConfigStore)
    with initialize_config_dir(config_dir=str(ROOT / "robustbench_lab" / "conf"), version_base="1.3"):
        return h_compose(config_name="config", overrides=overrides or [], return_hydra_config=return_hydra_config)
