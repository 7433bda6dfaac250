"""Linearization core (robustbench_lab.linearization: units, operators, lowrank, spectra) on tiny random ResNets.

The nets are random but not trivial: BatchNorm has running statistics from a few train-mode passes and
random affine parameters, so ReLUs are partly active and eval-mode BN is a genuine affine map.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustbench_lab.core.errors import ConfigError
from robustbench_lab.linearization.lowrank import reduction_rank
from robustbench_lab.linearization.operators import TorchJacobian, dense_jacobian
from robustbench_lab.linearization.spectra import (count_near, singular_values, svd_explicit, svd_lanczos,
                                                   svd_lowrank)
from robustbench_lab.linearization.units import (ModuleFunction, UnitRef, get_block, hidden_states, list_units, scaled,
                                                 stage_function, unit_function, unit_input)
from robustbench_lab.core.model import Classifier
from robustbench_lab.core.zoo import CifarResNet, SmallCNN

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _tiny(block: str, depth: int, size: int = 8, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    net = CifarResNet(depth=depth, in_channels=1, num_classes=10, block=block, width=4)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    net.train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(3):   # non-trivial running statistics
            net(torch.rand(16, 1, size, size, generator=g) * 2 - 0.5)
    net.eval()
    model = Classifier(net, (0.3,), (0.35,), 10).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def basic():
    return _tiny("basic", 14)          # 2 units per stage; stage 1: 4x8x8 = 256 dims


@pytest.fixture(scope="module")
def bottle():
    return _tiny("bottleneck", 20)     # 2 units per stage; s1u2: identity shortcut, 16x8x8 = 1024 dims


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _x0(model, images, name, i=0):
    ref = next(u for u in list_units(model) if u.name == name)
    return get_block(model.net, ref), unit_input(model, images, ref)[i]


def _autograd_jacobian(fn, x0):
    J = torch.autograd.functional.jacobian(lambda x: fn(x[None])[0], x0)
    n_out = int(np.prod(J.shape[:len(J.shape) - x0.dim()]))
    return J.reshape(n_out, x0.numel()).numpy()


# ------------------------------------------------------------------------------------------------- units
def test_unit_refs_names_and_order(basic, bottle):
    units = list_units(basic)
    assert [u.name for u in units] == ["s1u1", "s1u2", "s2u1", "s2u2", "s3u1", "s3u2"]
    assert units[3] == UnitRef(1, 1, "s2u2")
    assert list_units(basic.net) == units                       # bare net or Classifier
    assert get_block(basic, units[3]) is basic.net.stages[1][1]
    assert len(list_units(bottle)) == 6


def test_hidden_states_match_forward(basic, images):
    hs = hidden_states(basic, images)
    assert list(hs) == ["stem"] + [u.name for u in list_units(basic)]
    with torch.no_grad():
        logits = basic(images)
    torch.testing.assert_close(basic.net.head(hs["s3u2"]), logits, rtol=0, atol=1e-6)
    # the bare net takes normalized inputs; the Classifier normalizes itself
    hs_net = hidden_states(basic.net, basic.normalize(images))
    assert all(torch.equal(hs[k], hs_net[k]) for k in hs)
    hs_norm = hidden_states(basic, basic.normalize(images), normalized_input=True)
    assert torch.equal(hs_norm["s2u1"], hs["s2u1"])
    # unit inputs: the stem for s1u1, else the previous unit's (post-ReLU) output
    refs = list_units(basic)
    torch.testing.assert_close(unit_input(basic, images, refs[0]), hs["stem"], rtol=0, atol=0)
    for prev, ref in zip(refs[:-1], refs[1:]):
        torch.testing.assert_close(unit_input(basic, images, ref), hs[prev.name], rtol=0, atol=0)
    # a unit function "post" is the module; a stage function composes the stage, boundary on its last unit
    block = get_block(basic, refs[2])
    torch.testing.assert_close(unit_function(block, "post")(hs["s1u2"]), hs["s2u1"], rtol=0, atol=0)
    torch.testing.assert_close(stage_function(basic, 1, "post")(hs["s1u2"]), hs["s2u2"], rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.relu(stage_function(basic, 1, "pre")(hs["s1u2"])), hs["s2u2"],
                               rtol=0, atol=1e-6)


def test_unit_function_uses_eval_bn_and_restores_mode(basic, images):
    block = get_block(basic, list_units(basic)[1])
    x = unit_input(basic, images, list_units(basic)[1])
    y_eval = unit_function(block, "pre")(x)
    block.train()
    try:
        y = unit_function(block, "pre")(x)      # BatchNorm must not use batch statistics
        assert block.training and block.bn1.training
    finally:
        block.eval()
    torch.testing.assert_close(y, y_eval, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- operators
@pytest.mark.parametrize("name,boundary", [("s1u2", "pre"), ("s1u2", "post"), ("s2u1", "pre")])
def test_dense_jacobian_equals_autograd(basic, images, name, boundary):
    block, x0 = _x0(basic, images, name)
    fn = unit_function(block, boundary)
    op = TorchJacobian(fn, x0, batch_size=37)        # batches that do not divide n
    J = dense_jacobian(op)
    ref = _autograd_jacobian(fn, x0)
    assert J.shape == ref.shape == (op.n_out, op.n_in)
    np.testing.assert_allclose(J, ref, rtol=0, atol=1e-5)
    # the generic (numpy, protocol-only) path and the products themselves
    np.testing.assert_allclose(dense_jacobian(op, batch_size=50), J, rtol=0, atol=1e-6)
    rng = np.random.default_rng(0)
    V, U = rng.standard_normal((5, op.n_in)), rng.standard_normal((4, op.n_out))
    np.testing.assert_allclose(op.jvp(V), V @ ref.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(op.vjp(U), U @ ref, rtol=1e-4, atol=1e-4)
    if name == "s2u1":
        assert op.in_shape == (4, 8, 8) and op.out_shape == (8, 4, 4)


def test_stage_jacobian_equals_autograd(basic, images):
    x0 = unit_input(basic, images, list_units(basic)[2])[1]
    fn = stage_function(basic, 1, "post")
    J = dense_jacobian(TorchJacobian(fn, x0))
    np.testing.assert_allclose(J, _autograd_jacobian(fn, x0), rtol=0, atol=1e-5)


def test_float64_operator_uses_a_copy(basic, images):
    block, x0 = _x0(basic, images, "s1u2")
    op64 = TorchJacobian(unit_function(block), x0, dtype=F64)
    J64 = dense_jacobian(op64)
    assert J64.dtype == np.float64 and block.conv1.weight.dtype == torch.float32
    np.testing.assert_allclose(J64, dense_jacobian(TorchJacobian(unit_function(block), x0)), rtol=0, atol=1e-5)


def test_post_boundary_zeroes_inactive_rows(basic, images):
    block, x0 = _x0(basic, images, "s1u2")
    y = unit_function(block, "post")(x0[None])[0].reshape(-1)
    J_post = dense_jacobian(TorchJacobian(unit_function(block, "post"), x0, dtype=F64))
    J_pre = dense_jacobian(TorchJacobian(unit_function(block, "pre"), x0, dtype=F64))
    dead = (y == 0).numpy()
    assert 0 < dead.sum() < dead.size                  # the test needs both kinds of rows
    assert np.all(J_post[dead] == 0)
    np.testing.assert_allclose(J_post[~dead], J_pre[~dead], rtol=0, atol=1e-12)
    s = svd_explicit(TorchJacobian(unit_function(block, "post"), x0, dtype=F64)).values
    assert count_near(s, 0.0, 1e-9) >= dead.sum()     # a zero row per dead output


# ----------------------------------------------------------------------------------------------- spectra
@pytest.mark.parametrize("net,ratio", [("basic", 0.8), ("basic", 1.01), ("bottle", 0.8), ("bottle", 0.0)])
def test_explicit_and_lowrank_agree(request, images, net, ratio):
    model = request.getfixturevalue(net)
    for i in range(2):
        block, x0 = _x0(model, images, "s1u2", i)
        ex = svd_explicit(TorchJacobian(unit_function(block, "pre"), x0, dtype=F64))
        lr = svd_lowrank(block, x0, direct_ratio=ratio)
        assert ex.complete and lr.complete and ex.n == lr.n == x0.numel() == lr.values.size
        np.testing.assert_allclose(lr.values, ex.values, rtol=1e-3, atol=1e-5)
        m = min(lr.n, 2 * lr.extra["r"])
        assert lr.extra["path"] == ("reduced" if m <= ratio * lr.n else "direct")


def test_lanczos_top_and_bottom_agree_with_explicit(basic, bottle, images):
    block, x0 = _x0(basic, images, "s1u2")
    op = TorchJacobian(unit_function(block, "pre"), x0)
    ex = svd_explicit(TorchJacobian(unit_function(block, "pre"), x0, dtype=F64)).values
    top = svd_lanczos(op, 5, "LM")
    assert not top.complete and top.values.size == 5 and np.all(np.diff(top.values) <= 0)
    np.testing.assert_allclose(top.values, ex[:5], rtol=1e-3)
    # the bottom end needs many more products (no shift-invert matrix-free): a 64-dim unit keeps it quick
    block, x0 = _x0(basic, images, "s3u2")
    op = TorchJacobian(unit_function(block, "pre"), x0)
    ex = svd_explicit(TorchJacobian(unit_function(block, "pre"), x0, dtype=F64)).values
    assert op.n_in == 64
    bot = svd_lanczos(op, 4, "SM")
    np.testing.assert_allclose(bot.values, ex[-4:], rtol=1e-3, atol=1e-5)
    both = svd_lanczos(op, 3, "both", vectors=True)
    np.testing.assert_allclose(both.values, np.concatenate([ex[:3], ex[-3:]]), rtol=1e-3, atol=1e-5)
    # right singular vectors: ||J v|| = sigma
    J = dense_jacobian(op)
    np.testing.assert_allclose(np.linalg.norm(J @ both.extra["vh"].T, axis=0), both.values, rtol=1e-3, atol=1e-5)
    block, x0 = _x0(bottle, images, "s1u2")
    top = svd_lanczos(TorchJacobian(unit_function(block, "pre"), x0), 4, "LM")
    np.testing.assert_allclose(top.values, svd_lowrank(block, x0).values[:4], rtol=1e-3)


def test_bottleneck_has_at_least_n_minus_2r_ones(bottle, images):
    block, x0 = _x0(bottle, images, "s1u2")
    lr = svd_lowrank(block, x0)
    n, r = lr.n, lr.extra["r"]
    assert 0 < r <= n // 4                              # the 1x1 reduction: a quarter of the channels at most
    ex = svd_explicit(TorchJacobian(unit_function(block, "pre"), x0, dtype=F64)).values
    assert count_near(ex, 1.0, 1e-4) >= n - 2 * r >= n // 2
    assert count_near(lr.values, 1.0, 1e-4) >= n - 2 * r
    assert lr.extra["n_exact_lambda"] == n - 2 * r


def test_skip_scale_and_weight_scale(bottle, images):
    block, x0 = _x0(bottle, images, "s1u2")
    saved = [t.clone() for t in block.state_dict().values()]
    # lambda = 0: the spectrum of dF alone
    residual = ModuleFunction([block], lambda m, x: m[0].residual(x), "residual branch")
    dF = svd_explicit(TorchJacobian(residual, x0, dtype=F64)).values
    s0 = singular_values(block, x0, method="explicit", skip_scale=0.0, dtype=F64)
    np.testing.assert_allclose(s0.values, dF, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(svd_lowrank(block, x0, skip_scale=0.0).values, dF, rtol=1e-3, atol=1e-6)
    assert count_near(s0.values, 0.0, 1e-9) >= s0.n - svd_lowrank(block, x0).extra["r"]   # rank dF <= r
    # lambda = 2: at least n - 2r values are exactly 2
    lr2 = svd_lowrank(block, x0, skip_scale=2.0)
    assert count_near(lr2.values, 2.0, 1e-4) >= lr2.n - 2 * lr2.extra["r"]
    # weight scaling c: every conv weight of the branch times c, the shortcut and BN untouched
    w1 = block.conv1.weight.clone()
    with scaled(block, skip_scale=0.5, weight_scale=0.3):
        assert block.skip_scale == 0.5 and torch.equal(block.conv1.weight, w1 * 0.3)
        inside = singular_values(block, x0, method="explicit", dtype=F64)
    np.testing.assert_allclose(singular_values(block, x0, method="explicit", skip_scale=0.5, weight_scale=0.3,
                                               dtype=F64).values, inside.values, rtol=1e-9)
    np.testing.assert_allclose(svd_lowrank(block, x0, skip_scale=0.5, weight_scale=0.3).values, inside.values,
                               rtol=1e-3, atol=1e-6)
    with pytest.raises(RuntimeError):
        with scaled(block, skip_scale=3.0, weight_scale=7.0):
            raise RuntimeError("restored on error too")
    assert block.skip_scale == 1.0
    assert all(torch.equal(a, b) for a, b in zip(saved, block.state_dict().values()))   # bit for bit


def test_auto_method_choice(basic, bottle, images):
    block, x0 = _x0(bottle, images, "s1u2")
    s = singular_values(block, x0)
    assert s.method == "lowrank" and s.extra["requested"] == "auto" and s.complete
    block, x0 = _x0(basic, images, "s1u2")            # basic block: 2r ~ n, little or no gain
    r, n = reduction_rank(block, x0)
    s = singular_values(block, x0)
    assert s.method == ("lowrank" if 2 * r < 0.8 * n else "explicit")
    s = singular_values(block, x0, explicit_max=100, k=4)
    assert s.method == "lanczos" and s.values.size == 4 and not s.complete
    op = TorchJacobian(unit_function(block, "post"), x0)
    assert singular_values(op).method == "explicit"


def test_bad_inputs_raise_config_errors(basic, images):
    block, x0 = _x0(basic, images, "s1u2")
    with pytest.raises(ConfigError, match="linearize.boundary"):
        unit_function(block, "middle")
    with pytest.raises(ConfigError, match="linearize.boundary"):
        svd_lowrank(block, x0, boundary="post")
    with pytest.raises(ConfigError, match="model.name"):
        list_units(Classifier(SmallCNN(1, 10, width=4), (0.3,), (0.35,), 10, name="small_cnn"))
    down, xd = _x0(basic, images, "s2u1")
    with pytest.raises(ConfigError, match="linearize.method") as e:
        svd_lowrank(down, xd)
    assert "identity shortcut" in str(e.value)
    op = TorchJacobian(unit_function(block), x0)
    with pytest.raises(ConfigError, match="linearize.method"):
        singular_values(op, method="lowrank")
    with pytest.raises(ConfigError, match="linearize.method"):
        singular_values(op, method="qr")
    with pytest.raises(ConfigError, match="linearize.k"):
        svd_lanczos(op, op.n_in)
    with pytest.raises(ConfigError, match="linearize.which"):
        svd_lanczos(op, 3, "largest")
    with pytest.raises(ConfigError, match="linearize.stage"):
        stage_function(basic, 3)
    with pytest.raises(ConfigError, match="linearize.dtype"):
        TorchJacobian(unit_function(block), x0, dtype="float16")
