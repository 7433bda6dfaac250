"""The worked example of docs/architecture.md, exercised as a user would follow it: the attack module and
its config are taken from the page, written outside the repository, and run through the harness with no
change to the application code."""

from __future__ import annotations

import re
import sys

import pytest
import torch

from robustbench_lab.app.builders import build_attacks
from robustbench_lab.core.errors import ConfigError
from robustbench_lab.core.evaluator import evaluate
from robustbench_lab.core.norms import linf

from conftest import ROOT, compose

DOC = ROOT / "docs" / "architecture.md"


def _blocks() -> dict[str, str]:
    """The fenced code blocks of the worked example, keyed by the file name written above each."""
    text = DOC.read_text().split("## Worked example", 1)[1]
    return {name: code for name, code in
            re.findall(r"`([\w/]+\.(?:py|yaml))`:\n```\w+\n(.*?)```", text, flags=re.S)}


@pytest.fixture()
def user_plugin(tmp_path, monkeypatch):
    blocks = _blocks()
    assert set(blocks) == {"my_attacks/random_sign.py", "my_conf/attack/random_sign.yaml"}, set(blocks)
    for name, code in blocks.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for mod in [m for m in sys.modules if m == "my_attacks" or m.startswith("my_attacks.")]:
        del sys.modules[mod]


def test_the_example_attack_runs_through_the_harness(user_plugin, trained_small_cnn, fmnist_small):
    cfg = compose(["attack=random_sign", f"hydra.searchpath=[file://{user_plugin / 'my_conf'}]",
                   "attack.eps=0.3", "attack.trials=10"])
    attacks, eps, label = build_attacks(cfg)
    assert label == "random_sign" and eps == 0.3 and type(attacks[0]).__module__ == "my_attacks.random_sign"
    _, _, xt, yt = fmnist_small
    x, y = xt[:100], yt[:100]
    gen = torch.Generator().manual_seed(0)
    ev = evaluate(trained_small_cnn, x, y, attacks, eps, gen, batch_size=64)
    pe = ev.per_example()
    broken = pe["broken_by"].notna().to_numpy()
    # what the attack must achieve: at eps 0.3 random corners fool a plain CNN on some points, never all
    assert 0 < broken.sum() < pe["clean_correct"].sum()
    # inside the ball and the box, and success verified by the harness on the returned points
    assert float(linf(ev.x_adv - x).max()) <= 0.3 + 1e-6
    assert ev.x_adv.min() >= 0 and ev.x_adv.max() <= 1
    with torch.no_grad():
        pred = trained_small_cnn(ev.x_adv).argmax(1)
    hit = torch.tensor(broken)
    assert bool((pred[hit] != y[hit]).all())


def test_the_example_attack_names_a_bad_value(user_plugin):
    cfg = compose(["attack=random_sign", f"hydra.searchpath=[file://{user_plugin / 'my_conf'}]",
                   "attack.trials=0"])
    with pytest.raises(ConfigError, match="attack.trials"):
        build_attacks(cfg)
