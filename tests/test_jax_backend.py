"""The JAX backend (robustbench_lab/linearization/jax_backend.py, gathering its jax_* modules) against the
PyTorch zoo, on tiny random CIFAR ResNets made here (width 4; BatchNorm with non-trivial affine parameters and
running statistics from a few train-mode passes, then eval mode):

- logits and every hidden state equal torch's within 1e-4 (float32), for basic and bottleneck networks,
  square, non-square and odd image sizes; the state-dict path gives the same pytree;
- unit functions (pre/post boundary, skip scale, weight scale) equal a torch equivalent; unit Jacobians
  from ``JaxJacobian.dense()`` equal torch's (``torch.autograd.functional.jacobian``) and so do their
  singular values (1e-3 relative); a bottleneck unit has the n - 2r singular values exactly 1 the math
  predicts; jvp / vjp are adjoint and agree with the dense matrix, also chunked; float64 operators agree
  with torch float64 to 1e-9; the app's path (torch unit/stage functions translated, ``units.scaled``,
  ``spectra.svd_explicit``) agrees with ``TorchJacobian``;
- ``JaxClassifier``: gradients and Hessian-vector products equal torch's; PGD (L-inf), DeepFool (L2) and the
  trust-region attack (L2, first and second order) give the same success masks and adversarial examples
  as on the torch ``Classifier`` with the same weights (tolerances and reasons at ``test_attacks_agree``).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

jax = pytest.importorskip("jax")

from robustbench_lab.linearization import jax_backend as jb  # noqa: E402
from robustbench_lab.core.model import Classifier, eval_frozen  # noqa: E402
from robustbench_lab.core.zoo import CifarResNet  # noqa: E402
from robustbench_lab.linearization.operators import TorchJacobian  # noqa: E402
from robustbench_lab.linearization.spectra import svd_explicit  # noqa: E402
from robustbench_lab.linearization.units import (ModuleFunction, UnitRef, scaled, stage_function,  # noqa: E402
                                                 unit_function, unit_input)

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4     # float32 forward: rounding differences between the two conv implementations are ~1e-6


def _tiny(block: str, depth: int, in_ch: int, n_cls: int, hw: tuple[int, int], seed: int) -> Classifier:
    torch.manual_seed(seed)
    net = CifarResNet(depth=depth, in_channels=in_ch, num_classes=n_cls, block=block, width=4)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.momentum = None      # cumulative average: running stats become the batches' statistics
    g = torch.Generator().manual_seed(seed)
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(16, in_ch, *hw, generator=g) * 2 - 0.5)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    mean, std = [0.3, 0.5, 0.4][:in_ch], [0.25, 0.2, 0.3][:in_ch]
    model = Classifier(net, mean, std, n_cls, name=f"tiny_{block}").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def basic() -> Classifier:
    """Depth 14 (2 basic units per stage), 3 channels, 5 classes; unit s2u2 has skip scale 0.7."""
    m = _tiny("basic", 14, 3, 5, (12, 12), 0)
    m.net.stages[1][1].skip_scale = 0.7
    return m


@pytest.fixture(scope="module")
def bottleneck() -> Classifier:
    """Depth 20 (2 bottleneck units per stage), 1 channel, 4 classes."""
    return _tiny("bottleneck", 20, 1, 4, (8, 8), 1)


def _images(n: int, c: int, hw: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.rand(n, c, *hw, generator=torch.Generator().manual_seed(seed))


def _torch_states(model: Classifier, x: torch.Tensor) -> dict[str, torch.Tensor]:
    net, h = model.net, model.normalize(x)
    h = net.stem(h)
    out = {"stem": h}
    for s, stage in enumerate(net.stages):
        for u, blk in enumerate(stage):
            h = blk(h)
            out[f"s{s + 1}u{u + 1}"] = h
    return out


def _unit_in(model: Classifier, x: torch.Tensor, name: str) -> torch.Tensor:
    names = list(_torch_states(model, x))
    return _torch_states(model, x)[names[names.index(name) - 1]]


def _block(model: Classifier, name: str) -> nn.Module:
    s, u = name[1:].split("u")
    return model.net.stages[int(s) - 1][int(u) - 1]


def _torch_unit(block: nn.Module, boundary: str, lam: float | None = None, c: float = 1.0):
    """An independent torch unit function: a copy of the block with lambda set and residual convs scaled."""
    b = copy.deepcopy(block)
    if lam is not None:
        b.skip_scale = lam
    with torch.no_grad():
        for name, m in b.named_children():
            if name.startswith("conv"):
                m.weight.mul_(c)
    return (lambda x: b.pre_activation(x)) if boundary == "pre" else b


# ---------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("which,hw", [("basic", (12, 12)), ("basic", (7, 9)), ("bottleneck", (8, 8))])
def test_forward_and_hidden_states_match_torch(which, hw, request):
    model = request.getfixturevalue(which)
    params = jb.params_from_torch(model)
    x = _images(6, model.net.conv1.in_channels, hw, 2)
    with torch.no_grad():
        ref = model(x).numpy()
        ref_states = {k: v.numpy() for k, v in _torch_states(model, x).items()}
    np.testing.assert_allclose(np.asarray(jb.jax_forward(params, x.numpy())), ref, rtol=0, atol=ATOL)
    states = jb.jax_hidden_states(params, x.numpy())
    assert list(states) == list(ref_states)       # same names, same order
    for k, v in ref_states.items():
        assert states[k].shape == v.shape, k
        np.testing.assert_allclose(np.asarray(states[k]), v, rtol=0, atol=ATOL, err_msg=k)
    assert np.abs(ref).max() > 0.1                 # the comparison is not between near-zero outputs


def test_state_dict_path_gives_the_same_params(basic, bottleneck):
    for model in (basic, bottleneck):
        a = jb.params_from_torch(model)
        b = jb.params_from_torch(model.state_dict())
        assert a.spec == b.spec
        la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
        assert [p for p, _ in la] == [p for p, _ in lb]
        for (path, u), (_, v) in zip(la, lb):
            if jax.tree_util.keystr(path).endswith("['skip_scale']") and float(u) == pytest.approx(0.7):
                assert float(v) == 1.0           # a state dict does not carry lambda: the zoo's 1
            else:
                np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=jax.tree_util.keystr(path))
    with pytest.raises(TypeError, match="CifarResNet"):
        jb.params_from_torch(Classifier(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), [0.0], [1.0], 2))


def test_unit_functions_match_torch(basic, bottleneck):
    cases = [(basic, "s1u2", 1.0, 1.0), (basic, "s2u1", 0.5, 1.0), (basic, "s2u2", None, 2.0),
             (bottleneck, "s1u1", 1.1, 0.5), (bottleneck, "s3u2", 0.0, 1.0)]
    for model, name, lam, c in cases:
        params = jb.params_from_torch(model)
        x0 = _unit_in(model, _images(3, model.net.conv1.in_channels, (12, 12) if model is basic else (8, 8), 3),
                      name).detach()
        for boundary in ("pre", "post"):
            f = jb.jax_unit_function(params, name, boundary=boundary, skip_scale=lam, weight_scale=c)
            with torch.no_grad():
                ref = _torch_unit(_block(model, name), boundary, lam, c)(x0).numpy()
            np.testing.assert_allclose(np.asarray(f(x0.numpy())), ref, rtol=0, atol=ATOL,
                                       err_msg=f"{name} {boundary} lambda={lam} c={c}")
            if boundary == "pre":
                assert (ref < 0).any()               # so that pre and post differ: the boundary is tested
    # the stored lambda (0.7 on basic s2u2) is used by default and in the full forward pass
    p = jb.params_from_torch(basic)
    assert float(p.unit(1, 1)[0]["skip_scale"]) == pytest.approx(0.7)
    s0, i0 = 1, 1
    f = jb.jax_unit_function(p, s0, i0, boundary="post")
    assert repr(f).startswith("UnitChain(1 basic")


# ---------------------------------------------------------------------------------------------- Jacobians
def _torch_jacobian(fn, x0: torch.Tensor) -> np.ndarray:
    J = torch.autograd.functional.jacobian(lambda z: fn(z[None])[0], x0, vectorize=True)
    return J.reshape(-1, x0.numel()).double().numpy()


@pytest.mark.parametrize("which,name", [("basic", "s1u2"), ("basic", "s2u1"), ("bottleneck", "s2u1"),
                                        ("bottleneck", "s3u2")])
def test_unit_singular_values_match_torch(which, name, request):
    model = request.getfixturevalue(which)
    params = jb.params_from_torch(model)
    hw = (12, 12) if which == "basic" else (8, 8)
    x0 = _unit_in(model, _images(1, model.net.conv1.in_channels, hw, 4), name)[0].detach()
    for boundary in ("pre", "post"):
        op = jb.JaxJacobian(jb.jax_unit_function(params, name, boundary=boundary), x0, batch_size=200)
        J = op.dense()
        assert J.shape == (op.n_out, op.n_in) and J.dtype == np.float32
        Jt = _torch_jacobian(_torch_unit(_block(model, name), boundary), x0)
        np.testing.assert_allclose(J, Jt, rtol=0, atol=1e-5 * np.abs(Jt).max())
        s = np.linalg.svd(J.astype(np.float64), compute_uv=False)
        st = np.linalg.svd(Jt, compute_uv=False)
        np.testing.assert_allclose(s, st, rtol=1e-3, atol=1e-6 * st[0], err_msg=f"{which} {name} {boundary}")
        if boundary == "post":
            # rows of outputs the post-addition ReLU switches off are zero
            dead = op.y0.ravel() <= 0
            assert dead.any() and np.all(J[dead] == 0)
    if which == "bottleneck" and name == "s3u2":
        # identity shortcut, lambda 1: J = I + dF with rank(dF) <= r = 16 planes * 2 * 2, so at least
        # n - 2r = 256 - 128 singular values are exactly 1 (docs/methods.md section 6)
        op = jb.JaxJacobian(jb.jax_unit_function(params, name, boundary="pre"), x0)
        s = np.linalg.svd(op.dense().astype(np.float64), compute_uv=False)
        assert op.n_in == 256 and np.sum(np.abs(s - 1) < 1e-5) >= 256 - 2 * 64


def test_jvp_vjp_adjoint_chunked_and_dense(basic):
    params = jb.params_from_torch(basic)
    x0 = _unit_in(basic, _images(1, 3, (12, 12), 5), "s2u1")[0].detach()
    op = jb.JaxJacobian(jb.jax_unit_function(params, "s2u1", boundary="post"), x0, batch_size=64)
    assert (op.in_shape, op.out_shape) == ((4, 12, 12), (8, 6, 6)) and (op.n_in, op.n_out) == (576, 288)
    rng = np.random.default_rng(0)
    V = rng.standard_normal((100, op.n_in)).astype(np.float32)     # 100 > batch_size: two chunks, padded
    U = rng.standard_normal((100, op.n_out)).astype(np.float32)
    JV, JtU = op.jvp(V), op.vjp(U)
    assert JV.shape == (100, op.n_out) and JtU.shape == (100, op.n_in) and op.n_jvp == op.n_vjp == 100
    lhs = np.einsum("bi,bi->b", U.astype(np.float64), JV)
    rhs = np.einsum("bi,bi->b", JtU.astype(np.float64), V)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5, atol=1e-5 * np.abs(lhs).max())
    J = op.dense().astype(np.float64)
    np.testing.assert_allclose(JV, V @ J.T, rtol=0, atol=1e-4 * np.abs(JV).max())
    np.testing.assert_allclose(JtU, U @ J, rtol=0, atol=1e-4 * np.abs(JtU).max())
    np.testing.assert_allclose(op.jvp(V[0]), JV[:1], rtol=0, atol=1e-5 * np.abs(JV).max())   # 1-D input
    with pytest.raises(ValueError, match=r"\(b, 576\)"):
        op.jvp(np.zeros((2, 575), np.float32))


def test_torch_unit_function_is_translated_and_checked(basic):
    params = jb.params_from_torch(basic)
    block = _block(basic, "s1u2")
    x0 = _unit_in(basic, _images(1, 3, (12, 12), 6), "s1u2")[0].detach()
    a = jb.JaxJacobian(unit_function(block, "pre"), x0).dense()
    b = jb.JaxJacobian(jb.jax_unit_function(params, "s1u2", boundary="pre"), x0).dense()
    np.testing.assert_array_equal(a, b)
    # a torch function whose translation would not reproduce it (pre computed, "post" described) is refused
    liar = ModuleFunction([block], lambda mods, x: mods[0].pre_activation(x), "BasicBlock, boundary post", "post")
    with pytest.raises(ValueError, match="does not reproduce"):
        jb.JaxJacobian(liar, x0)


def test_app_path_spectra_and_stage_function(basic):
    """What ``linearize.backend=jax`` runs: torch ``unit_function`` / ``stage_function`` handed to JaxJacobian,
    spectra by ``spectra.svd_explicit``, against the torch operator."""
    x = _images(1, 3, (12, 12), 11)
    x0 = unit_input(basic, x, UnitRef.of(2, 0))[0].detach()
    fn = stage_function(basic, 2, "post")
    oj, ot = jb.JaxJacobian(fn, x0, batch_size=64), TorchJacobian(fn, x0, batch_size=64)
    assert (oj.in_shape, oj.out_shape) == (ot.in_shape, ot.out_shape) == ((8, 6, 6), (16, 3, 3))
    Jt = ot.dense_t().numpy()
    np.testing.assert_allclose(oj.dense(), Jt, rtol=0, atol=1e-5 * np.abs(Jt).max())
    block = basic.net.stages[0][1]
    x1 = unit_input(basic, x, UnitRef.of(0, 1))[0].detach()
    with scaled(block, skip_scale=0.5, weight_scale=2.0):     # translated inside the context: scaled weights
        sj = svd_explicit(jb.JaxJacobian(unit_function(block, "pre"), x1)).values
        st = svd_explicit(TorchJacobian(unit_function(block, "pre"), x1)).values
    np.testing.assert_allclose(np.sort(sj), np.sort(st), rtol=1e-3, atol=1e-6 * np.max(st))
    ref = jb.JaxJacobian(jb.jax_unit_function(jb.params_from_torch(basic), 0, 1, "pre", 0.5, 2.0), x1).dense()
    np.testing.assert_allclose(np.sort(np.linalg.svd(ref, compute_uv=False)), np.sort(sj), rtol=1e-3,
                               atol=1e-6 * np.max(st))


def test_float64_operator_matches_torch_float64(bottleneck):
    name = "s2u1"
    x0 = _unit_in(bottleneck, _images(1, 1, (8, 8), 7), name)[0].detach()
    op = jb.JaxJacobian(jb.jax_unit_function(jb.params_from_torch(bottleneck), name), x0, dtype=torch.float64)
    J = op.dense()
    assert J.dtype == np.float64 and op.jvp(np.ones((1, op.n_in))).dtype == np.float64
    blk = copy.deepcopy(_block(bottleneck, name)).double()
    Jt = _torch_jacobian(lambda z: blk.pre_activation(z), x0.double())
    np.testing.assert_allclose(J, Jt, rtol=0, atol=1e-9 * np.abs(Jt).max())
    assert not jax.config.jax_enable_x64          # float64 stayed local to the operator


# ---------------------------------------------------------------------------------------------- classifier
def test_classifier_gradients_and_hvp_match_torch(basic):
    jm = jb.JaxClassifier.from_torch(basic)
    assert jm.num_classes == basic.num_classes and jm.bounds == basic.bounds and not list(jm.parameters())
    x = _images(5, 3, (12, 12), 8)
    y = torch.tensor([0, 1, 2, 3, 4])
    grads, hvps = [], []
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    for m in (basic, jm):
        xg = x.clone().requires_grad_(True)
        logits = m(xg)
        loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
        (g,) = torch.autograd.grad(loss, xg, create_graph=True)
        (hv,) = torch.autograd.grad((g * v).sum(), xg)      # double backward: softmax curvature through J
        grads.append(g.detach())
        hvps.append(hv)
    np.testing.assert_allclose(grads[1].numpy(), grads[0].numpy(), rtol=0, atol=1e-5 * grads[0].abs().max().item())
    np.testing.assert_allclose(hvps[1].numpy(), hvps[0].numpy(), rtol=0, atol=1e-4 * hvps[0].abs().max().item())
    assert hvps[0].abs().max() > 0
    with torch.no_grad():
        assert jm(x[:0]).shape == (0, 5)
        assert jm(x.double()).dtype == torch.float64
    with eval_frozen(jm, warn_train=False):
        assert not jm.training


def test_attacks_agree(basic):
    """Same success mask and pass counts; adversarial examples equal within 1e-4 (abs, [0, 1] pixels) for
    PGD-L-inf except on at most 1 in 1000 pixels (sign steps: a float32 rounding difference can flip the
    sign of a gradient entry within ~1e-7 of 0 and move that pixel by a whole step), and for DeepFool and
    trust region (continuous in the gradients) within 1e-5 abs and 1e-3 relative to the perturbation's L2
    norm (the ~1e-7 relative differences of the two float32 implementations grow over the iterations; the
    2% overshoot keeps returned points clearly off the boundary, so success agrees exactly). Measured here:
    PGD bit-identical, the others <= 1.2e-7 abs and <= 2e-5 relative."""
    from attacks.deepfool import DeepFool
    from attacks.pgd import PGD
    from attacks.trust_region import TrustRegion

    jm = jb.JaxClassifier.from_torch(basic)
    x = _images(8, 3, (12, 12), 10)
    with torch.no_grad():
        y = basic(x).argmax(1)                 # every point clean-correct on both models
        assert torch.equal(jm(x).argmax(1), y)
    cases = [(PGD(norm="linf", steps=10), 0.03), (DeepFool(norm="l2", steps=20), None),
             (TrustRegion(norm="l2", iterations=20), None), (TrustRegion(norm="l2", order=2, iterations=5), None)]
    for atk, eps in cases:
        rt = atk(basic, x, y, eps=eps, generator=torch.Generator().manual_seed(0))
        rj = atk(jm, x, y, eps=eps, generator=torch.Generator().manual_seed(0))
        label = f"{atk.name} {atk.norm.value} {getattr(atk, 'order', '')}"
        assert torch.equal(rt.success, rj.success), label
        assert rt.success.any(), label         # the attack does something on this net
        assert (rt.n_forward, rt.n_backward) == (rj.n_forward, rj.n_backward), label
        d = (rt.x_adv - rj.x_adv).abs()
        if eps is not None:
            assert (d > 1e-4).float().mean() <= 1e-3, (label, d.max())
        else:
            scale = rt.l2.clamp_min(1e-6)
            rel = (rt.x_adv - rj.x_adv).flatten(1).norm(dim=1) / scale
            assert rel.max() <= 1e-3 and d.max() <= 1e-5, (label, rel, d.max())
