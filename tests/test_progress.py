"""Progress of long work: the attack and check bars count what was done, stay silent unless asked, shrink to a
few plain lines off a terminal; the evaluate task names its stages in order; the smoke preset is what it says."""

from __future__ import annotations

import io
import logging
import re

import pytest
import torch

import robustbench_lab as rbl
from robustbench_lab.app.builders import attack_from_name
from robustbench_lab.app.checks import CheckLevel, planned_checks, run_checks
from robustbench_lab.app.evaluate import STAGES, defense_banner, model_banner
from robustbench_lab.app.execute import run_task
from robustbench_lab.app.validate import validate
from robustbench_lab.core.errors import ConfigError
from robustbench_lab.core.evaluator import attack_points, evaluate
from robustbench_lab.core.progress import Progress

from conftest import compose

pytestmark = pytest.mark.usefixtures("one_thread")

LINE = re.compile(r"^(?P<desc>[\w+]+): (?P<n>\d+)/(?P<total>\d+) (?P<unit>\w+)s \(\d+%\)(?P<rest>.*)$")


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as stderr does in an interactive shell."""

    def isatty(self) -> bool:
        return True


def parsed(text: str) -> list[re.Match]:
    lines = text.splitlines()
    matches = [LINE.match(line) for line in lines]
    assert all(matches), f"unexpected progress line in {lines}"
    return matches   # type: ignore[return-value]


def count(m: re.Match, what: str) -> int:
    found = re.search(rf", (\d+) {what}", m["rest"])
    assert found, (what, m.string)
    return int(found.group(1))


@pytest.fixture()
def points(fmnist_small):
    _, _, xt, yt = fmnist_small
    return xt[:120], yt[:120]


def test_attack_bar_counts_points_and_broken(trained_small_cnn, points):
    x, y = points
    fgsm, eps = attack_from_name("fgsm", "linf", 0.08, key="attack")
    quiet = attack_points(trained_small_cnn, fgsm, x, y, eps, torch.Generator().manual_seed(0), batch_size=16)
    stream = io.StringIO()
    out = attack_points(trained_small_cnn, fgsm, x, y, eps, torch.Generator().manual_seed(0), batch_size=16,
                        progress=Progress(True, stream=stream, heartbeat=3600))
    assert torch.equal(out.success, quiet.success)   # the bar only watches
    n_attacked, n_broken = int(out.attacked.sum()), int(out.success.sum())
    assert n_attacked == int(out.clean_correct.sum()) > 16 and 0 < n_broken < n_attacked
    lines = parsed(stream.getvalue())
    assert "\r" not in stream.getvalue() and 2 <= len(lines) <= 11
    last = lines[-1]
    assert (last["desc"], int(last["n"]), int(last["total"]), last["unit"]) == ("fgsm", n_attacked, n_attacked, "point")
    assert count(last, "broken") == n_broken
    # every line sits at a batch boundary, with the points broken in the batches before it
    for m in lines:
        done = int(m["n"])
        assert done == n_attacked or done % 16 == 0
        first = out.attacked.nonzero().squeeze(1)[:done]
        assert count(m, "broken") == int(out.success[first].sum())

    tty = Terminal()
    attack_points(trained_small_cnn, fgsm, x, y, eps, torch.Generator().manual_seed(0), batch_size=16,
                  progress=Progress(True, stream=tty))
    assert f"{n_attacked}/{n_attacked}" in tty.getvalue() and f"broken={n_broken}" in tty.getvalue()


def test_silent_by_default_and_when_disabled(trained_small_cnn, points, capsys):
    x, y = points
    pgd, eps = attack_from_name("pgd", "linf", 0.05, key="attack", steps=3)
    attack_points(trained_small_cnn, pgd, x, y, eps, torch.Generator().manual_seed(0), batch_size=32)
    evaluate(trained_small_cnn, x, y, [pgd], eps, torch.Generator().manual_seed(0), batch_size=32)
    evaluate(trained_small_cnn, x, y, [pgd], eps, torch.Generator().manual_seed(0), batch_size=32,
             progress=Progress(False))
    rbl.evaluate(trained_small_cnn, data=(x, y), attacks=["fgsm"], eps=0.05, checks="none", device="cpu")
    assert capsys.readouterr() == ("", "")

    # the API's switch: bars on stderr, which here is no terminal, so plain lines
    r = rbl.evaluate(trained_small_cnn, data=(x, y), attacks=["fgsm"], eps=0.05, checks="quick", device="cpu",
                     batch_size=32, progress=True)
    err = capsys.readouterr().err
    attacked = r.metrics["per_attack"]["fgsm"]["attacked"]
    assert f"fgsm: {attacked}/{attacked} points (100%)" in err and "checks: " in err and "\r" not in err
    with pytest.raises(ConfigError, match="progress"):
        rbl.evaluate(trained_small_cnn, data=(x, y), attacks=["fgsm"], eps=0.05, progress="yes")


def test_non_terminal_stream_gets_a_bounded_number_of_lines():
    stream = io.StringIO()
    with Progress(True, stream=stream, heartbeat=3600).bar(1000, "pgd") as bar:
        for i in range(1000):
            bar.update(1, broken=i % 2)
    lines = parsed(stream.getvalue())
    assert len(lines) == 10 and "\r" not in stream.getvalue()   # one per tenth, the last at 100%
    assert (int(lines[-1]["n"]), count(lines[-1], "broken")) == (1000, 500)
    # slow work still talks: with a zero heartbeat every update gets a line
    stream = io.StringIO()
    bar = Progress(True, stream=stream, heartbeat=0).bar(50, "square")
    for _ in range(50):
        bar.update(1)
    assert len(parsed(stream.getvalue())) == 50
    # work that stops early says where it stopped; an empty bar says nothing
    stream = io.StringIO()
    with Progress(True, stream=stream, heartbeat=3600).bar(100, "cw") as bar:
        bar.update(3)
    assert [int(m["n"]) for m in parsed(stream.getvalue())] == [3]
    with Progress(True, stream=stream).bar(0, "cw"):
        pass
    assert len(parsed(stream.getvalue())) == 1


def test_checks_bar_has_one_step_per_check(trained_small_cnn, points):
    x, y = points[0][:40], points[1][:40]
    pgd, eps = attack_from_name("pgd", "linf", 0.05, key="attack", steps=3)
    ev = evaluate(trained_small_cnn, x, y, [pgd], eps, torch.Generator().manual_seed(0), batch_size=40)
    stream = io.StringIO()
    results = run_checks(trained_small_cnn, x, y, [pgd], eps, ev.robust, ev.x_adv, ev.n_nan, CheckLevel.QUICK,
                         torch.Generator().manual_seed(1), 40, table=ev.table, raw=ev.attack_counts,
                         progress=Progress(True, stream=stream, heartbeat=0))
    lines = parsed(stream.getvalue())
    assert len(results) == planned_checks(trained_small_cnn, eps) == 8
    assert [int(m["n"]) for m in lines] == list(range(1, 9)) and {m["total"] for m in lines} == {"8"}
    assert {m["desc"] for m in lines} == {"checks"} and lines[0]["unit"] == "check"
    assert count(lines[-1], "fired") == sum(r.fired for r in results)


def test_banners_name_each_stage_in_order(tmp_root, caplog, capsys):
    small = ["preset=smoke", "model.train.max_train=2000", "data.n_eval=50", "checks=quick"]
    caplog.set_level(logging.INFO, logger="robustbench_lab.core.progress")
    m = run_task(compose(small), tmp_root / "run")
    banners = [r.getMessage() for r in caplog.records if r.name == "robustbench_lab.core.progress"]
    assert [re.match(r"\[(\d)/6\] (\w+): ", b).groups() for b in banners] == \
        [(str(i + 1), s) for i, s in enumerate(STAGES)]
    assert banners[0].startswith("[1/6] data: fashion_mnist (50 test points")
    assert banners[1].startswith("[2/6] model: small_cnn (trained in")
    assert banners[3].startswith("[4/6] attacks: pgd (linf, eps 0.1) on 50 points")
    assert str(tmp_root / "run") in banners[5]
    err = capsys.readouterr().err   # not a terminal: plain lines from the attack and check bars
    attacked = m["per_attack"]["pgd"]["attacked"]
    assert f"pgd: {attacked}/{attacked} points (100%)" in err and "checks: 8/8 checks (100%)" in err

    caplog.clear()
    m2 = run_task(compose(small + ["progress=false"]), tmp_root / "quiet")
    assert capsys.readouterr().err == ""          # no bars
    banners = [r.getMessage() for r in caplog.records if r.name == "robustbench_lab.core.progress"]
    assert len(banners) == 6 and "(cache hit" in banners[1]   # the banners stay as log lines
    assert m2["robust_accuracy"] == m["robust_accuracy"]


def test_smoke_preset_composes_with_the_promised_values():
    cfg = compose(["preset=smoke"])
    validate(cfg)
    assert cfg.model.name == "small_cnn" and cfg.model.train.epochs == 1 and cfg.model.train.max_train == 5000
    assert cfg.data.n_eval == 100 and cfg.checks == "none" and cfg.logger.name == "none"
    assert cfg.attack.name == "pgd" and cfg.defense.name == "none"
    # the command line still wins over the preset
    cfg = compose(["preset=smoke", "checks=quick", "logger=wandb", "data.n_eval=10"])
    assert (cfg.checks, cfg.logger.name, cfg.data.n_eval) == ("quick", "wandb", 10)


def test_model_and_defense_banners_say_where_weights_came_from():
    assert model_banner("resnet20", {"cache_hit": True, "checkpoint_test_accuracy": 0.9253}) == \
        "resnet20 (cache hit, 92.5% test accuracy)"
    assert model_banner("resnet20", {"cache_hit": True, "checkpoint_source": "bundled",
                                     "checkpoint_test_accuracy": 0.9253}) == \
        "resnet20 (cache hit, bundled weights, 92.5% test accuracy)"
    assert model_banner("lenet", {"cache_hit": False, "train_seconds": 61.2, "checkpoint_test_accuracy": 0.5}) == \
        "lenet (trained in 61 s, 50.0% test accuracy)"
    assert model_banner("custom", {"cache_hit": None, "checkpoint": "w.pt"}) == "custom (weights from w.pt)"
    assert defense_banner("none", {}, 0.01) == "none (0.0 s)"
    assert defense_banner("jumprelu", {"jump": 0.123456, "jump_mode": "auto", "grid": [0, 1], "n_val": 500,
                                       "max_accuracy_drop": 0.01, "shares": True}, 240.0) == \
        "jumprelu (jump 0.1235, jump_mode auto, n_val 500, ...; 240.0 s)"
