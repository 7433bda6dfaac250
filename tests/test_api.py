"""The Python API (``robustbench_lab.evaluate``): any nn.Module, the same numbers and files as the CLI, and
clear errors for models that break the contract."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torchvision
from torch import nn

import robustbench_lab as rbl
from robustbench_lab.app.builders import build_model
from robustbench_lab.app.execute import run_task
from robustbench_lab.core import data as data_mod
from robustbench_lab.core.cache import load_weights
from robustbench_lab.core.errors import ConfigError
from robustbench_lab.core.norms import linf

from conftest import ROOT, compose, fashion_available

pytestmark = pytest.mark.usefixtures("one_thread")


def test_torchvision_resnet18_on_cifar_shaped_tensors(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(12, 3, 32, 32, generator=g), torch.randint(0, 10, (12,), generator=g)
    with torch.no_grad():
        y[:6] = net.eval()(x[:6]).argmax(1)        # some clean-correct points to attack
    eps = 8 / 255
    r = rbl.evaluate(net, data=(x, y), attacks=["pgd"], eps=eps, checks="quick", device="cpu", batch_size=8,
                     preprocessing=((0.49, 0.48, 0.45), (0.25, 0.24, 0.26)))
    m = r.metrics
    assert m["n_examples"] == 12 and m["clean_accuracy"] >= 0.5 and m["robust_accuracy"] <= m["clean_accuracy"]
    assert float(linf(r.x_adv - x).max()) <= eps + 1e-6 and r.x_adv.min() >= 0 and r.x_adv.max() <= 1
    broken = r.per_example[r.per_example["broken_by"].notna()]
    if len(broken):   # success re-verified: the wrapped model misclassifies every returned point it lists
        clf = rbl.api.as_classifier(net, x[:2], ((0.49, 0.48, 0.45), (0.25, 0.24, 0.26)), "r18")
        hit = torch.tensor(broken.index.tolist())
        with torch.no_grad():
            pred = clf.eval()(r.x_adv[hit]).argmax(1)
        assert bool((pred != y[hit]).all())
    path = r.save(tmp_path / "out")
    saved = json.loads(path.read_text())
    assert saved["robust_accuracy"] == m["robust_accuracy"]
    for f in ("per_example.parquet", "summary.md", "eval_indices.json", "examples.png"):
        assert (tmp_path / "out" / f).is_file(), f


@pytest.mark.skipif(not fashion_available(), reason="Fashion-MNIST not installed")
def test_api_agrees_with_the_cli_on_the_same_model_points_and_seed(tmp_root):
    cfg = compose(["model=small_cnn", "model.train.max_train=2000", "model.train.epochs=1", "data.n_eval=64",
                   "data.n_val=200", "progress=false", "logger=none", "attack=pgd", "attack.eps=0.05",
                   "attack.steps=5", "seed=3"])
    cli = run_task(cfg, tmp_root / "cli")
    model = build_model(cfg, data_mod.get_card("fashion_mnist"))
    load_weights(model, cli["checkpoint"], what="test")
    r = rbl.evaluate(model, data="fashion_mnist", attacks=["pgd"], eps=0.05, n_examples=64, seed=3,
                     device="cpu", attack_options={"steps": 5})
    for k in ("n_examples", "clean_accuracy", "robust_accuracy", "attack_success_rate", "median_linf",
              "grad_evals_per_example", "checks_fired"):
        assert r.metrics[k] == cli[k], k


def test_readme_snippet_runs_as_written(tmp_path, monkeypatch):
    if not fashion_available():
        pytest.skip("Fashion-MNIST not installed")
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", readme, flags=re.S).group(1)
    assert len([ln for ln in snippet.splitlines() if ln.strip() and not ln.startswith("#")]) <= 5
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)   # noqa: S102 - the README's own code, run as written
    assert (tmp_path / "my_eval" / "metrics.json").is_file()
    assert 0 <= scope["result"].metrics["robust_accuracy"] <= scope["result"].metrics["clean_accuracy"]


class WrongShape(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :1]             # one output: not logits of a classifier


class NotATensor(nn.Module):
    def forward(self, x):
        return {"logits": x.flatten(1)[:, :10]}


class Probabilities(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(784, 10)

    def forward(self, x):
        return self.lin(x.flatten(1)).softmax(1)


@pytest.mark.parametrize("model,match", [(WrongShape(), r"output \(2, 1\)"), (NotATensor(), "output dict")])
def test_models_that_break_the_contract_are_named(model, match):
    x, y = torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ConfigError, match=f"config key 'model'.*{match}|{match}.*config key 'model'"):
        rbl.evaluate(model, data=(x, y), attacks=["fgsm"], eps=0.1, device="cpu")


def test_bad_arguments_name_the_argument():
    x, y = torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    for kw, key in (({"norm": "l3"}, "norm"), ({"checks": "fast"}, "checks"), ({"eps": -1.0}, "eps"),
                    ({"attacks": ["nope"]}, r"attacks\[0\]"), ({"data": "imagenet"}, "data"),
                    ({"data": (x * 255, y)}, "data"), ({"attacks": ["pgd"], "eps": None}, r"attacks\[0\].eps")):
        with pytest.raises(ConfigError, match=f"config key '{key}'"):
            rbl.evaluate(net, **{"data": (x, y), "attacks": ["fgsm"], "eps": 0.1, "device": "cpu", **kw})


def test_a_model_returning_probabilities_fires_the_softmax_check():
    torch.manual_seed(0)
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    with pytest.warns(UserWarning, match="softmax_output"):
        r = rbl.evaluate(Probabilities(), data=(x, y), attacks=["fgsm"], eps=0.1, device="cpu")
    assert "softmax_output" in r.checks_fired
