"""The trust-region attack step by step against references written here from the method's definition
(docs/methods.md, section 1, and the class docstring for the bisection), not from its code: the first-order
radius rule with both ratios and the fixed radius and the returned boundary point, on a small smooth
network; the second-order step against Steihaug's truncated CG run on a Hessian computed explicitly, on a
network and on given matrices.

The attack's per-step values are read by wrapping the instance's step methods; nothing in the attack
changes. Every check is paired with a count showing that the case it covers occurs in the data.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian

from attacks.trust_region import TrustRegion
from robustbench_lab.app.builders import build_attack

from conftest import compose

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: small-batch work runs on one thread

# The radius rule as docs/methods.md states it (written out, not imported, so that a change is caught).
GROW, SHRINK, RHO_GOOD, RHO_BAD = 1.2, 1.2, 0.9, 0.5
MIN_STEP = 1e-4          # added to every step length before the overshoot


def tanh_net(seed: int, d: int, h: int, k: int, scale: float, n: int, dtype=torch.float32):
    """A d-h-k tanh network (weights N(0, scale^2)) and n inputs in [0.2, 0.8]^d shaped (n, 1, 1, d),
    labelled by the network itself (so every point is attacked)."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(d, h), nn.Tanh(), nn.Linear(h, k)).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=dtype))
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    x = 0.2 + 0.6 * torch.rand(n, 1, 1, d, generator=g, dtype=dtype)
    with torch.no_grad():
        y = net(x).argmax(1)
    return net, x, y


def record(atk: TrustRegion, name: str, fill=None) -> list[dict]:
    """Wrap ``atk.<name>`` so that each call's arguments and results are kept (cloned)."""
    log: list[dict] = []
    inner = getattr(atk, name)

    def wrapped(*args):
        out = inner(*args)
        entry = {"args": [a.clone() if torch.is_tensor(a) else a for a in args],
                 "out": [o.clone() for o in out] if isinstance(out, tuple) else out.clone()}
        (log.append if fill is None else fill)(entry)
        return out
    setattr(atk, name, wrapped)
    return log


# ---------------------------------------------------------------------------------------- first order
def reference_target(model, x, y: int, q: float, c: int) -> int:
    """The runner-up (among the c highest other logits) of smallest linearized distance
    (z_y - z_j) / ||grad(z_j - z_y)||_q."""
    xg = x[None].clone().requires_grad_(True)
    z = model(xg)[0]
    zd = z.detach()
    others = [j for j in zd.argsort(descending=True).tolist() if j != y][:c]
    dist = []
    for j in others:
        (g,) = torch.autograd.grad(z[j] - z[y], xg, retain_graph=True)
        dist.append(max(float(zd[y] - zd[j]), 0.0) / max(float(g.flatten().norm(p=q)), 1e-12))
    return others[int(np.argmin(dist))]


def radius_rule(s: float, rho: float, lo: float, hi: float) -> tuple[float, str]:
    """The radius after a step of length s with ratio rho, and what the rule did."""
    if rho > RHO_GOOD:
        new, what = s * GROW, "grow"
    elif rho < RHO_BAD:
        new, what = s / SHRINK, "shrink"
    else:
        new, what = s, "keep"
    if new > hi:
        return hi, what + "+max"
    if new < lo:
        return lo, what + "+min"
    return new, what


def reference_first_order(model, x0, y: int, atk: TrustRegion):
    """The first-order method for one example: (target, [(x_new, radius after the step)], [rule events]).

    Step: f = z_t - z_y, g = grad f, r = -f / ||g||_q, s = min(r, radius), x <- clip(x + (1 + overshoot)
    (s + 1e-4) dir) with dir = g / ||g||_2 (L2) or sign(g) (L-inf). Ratio: 'model' = actual / linearly
    predicted change of f for the step taken; 'official' = (z_y(x) - z_y(x_new)) / s. The radius becomes s,
    then the rule (with a fixed radius: unchanged). Stops once the new point is misclassified.
    """
    q = atk.norm.dual
    t = reference_target(model, x0, y, q, atk.n_classes)
    x, radius, steps, events = x0.clone(), atk.radius, [], []
    for _ in range(atk.iterations):
        xg = x[None].clone().requires_grad_(True)
        z = model(xg)[0]
        f = z[t] - z[y]
        (g,) = torch.autograd.grad(f, xg)
        g, f, zy = g[0], float(f.detach()), float(z[y].detach())
        r = max(-f, 0.0) / max(float(g.flatten().norm(p=q)), 1e-12)
        direction = g / max(float(g.norm()), 1e-12) if atk.norm.value == "l2" else g.sign()
        s = min(r, radius)
        x_new = (x + (1 + atk.overshoot) * (s + MIN_STEP) * direction).clamp(0, 1)
        with torch.no_grad():
            zn = model(x_new[None])[0]
        if not atk.adaptive:
            events.append("capped" if r > radius else "free")
        else:
            if atk.ratio == "official":
                rho = (zy - float(zn[y])) / max(s, 1e-12)
            else:
                rho = (float(zn[t] - zn[y]) - f) / max(float((g * (x_new - x)).sum()), 1e-12)
            radius, what = radius_rule(s, rho, atk.radius_min, atk.radius_max)
            events.append(what)
        steps.append((x_new, radius))
        if int(zn.argmax()) != y:
            break
        x = x_new
    return t, steps, events


def reference_boundary(model, lo, hi, y: int, steps: int, p: float, x0):
    """The returned point after a crossing, as the docstring of ``TrustRegion`` defines it: on the segment
    from ``lo`` (still y) to ``hi`` (not y), probes at fractions a (the first where the margin
    m = max_{j != y} z_j - z_y, linear between the ends, is 0; then the middle of the bracket); a probe is
    adversarial when m > 1e-5 max(1, max |z|) and then becomes the bracket's end; the adversarial end is
    returned, or ``hi`` if that is nearer to ``x0`` in the p-norm."""
    def margin(v):
        with torch.no_grad():
            z = model(v[None])[0]
        others = torch.cat([z[:y], z[y + 1:]])
        return float(others.max() - z[y]), float(z.abs().max())
    m_lo, m_hi = margin(lo)[0], margin(hi)[0]
    a_lo, a_hi, best = 0.0, 1.0, hi
    for k in range(steps):
        a = min(max(m_lo / (m_lo - m_hi), 1e-3), 1 - 1e-3) if k == 0 else (a_lo + a_hi) / 2
        probe = torch.minimum(torch.maximum(lo + a * (hi - lo), torch.minimum(lo, hi)), torch.maximum(lo, hi))
        m, scale = margin(probe)
        if m > 1e-5 * max(1.0, scale):
            a_hi, best = a, probe
        else:
            a_lo = a
    near = float((best - x0).flatten().norm(p=p)) <= float((hi - x0).flatten().norm(p=p))
    return best if near else hi


def compare_first_order(atk: TrustRegion, model, x, y) -> Counter:
    """Attack each example alone (so its forward passes are those of the reference, bit for bit) and
    compare target, every iterate, every radius and the returned point with the reference. Returns the
    rule events seen (and 'bisected' where the returned point is not the crossing iterate).

    Run in float64: near the boundary f = z_t - z_y nearly cancels, and float32 rounding in the step
    length would then move the last radii by up to 1e-4 relative, too close to what a wrong rule moves.
    """
    events: Counter = Counter()
    names = ("_select_targets", "_step_first", "_update_radius")
    for i in range(len(y)):
        targets, log, radii = (record(atk, name) for name in names)
        res = atk(model, x[i:i + 1], y[i:i + 1])
        for name in names:
            delattr(atk, name)                                           # back to the class's methods
        t, steps, ev = reference_first_order(model, x[i], int(y[i]), atk)
        events.update(part for e in ev for part in e.split("+"))
        assert int(targets[0]["out"][0][0]) == t, f"example {i}: target"
        assert len(log) == len(steps), f"example {i}: {len(log)} steps, the reference takes {len(steps)}"
        assert len(radii) == (len(steps) if atk.adaptive else 0)
        for k, (e, (x_ref, r_ref)) in enumerate(zip(log, steps)):
            torch.testing.assert_close(e["out"][0][0], x_ref, rtol=0, atol=1e-12,
                                       msg=f"example {i}, step {k}: iterate")
            if atk.adaptive:
                r_new = float(radii[k]["out"][0])
                assert r_new == pytest.approx(r_ref, rel=1e-9), f"example {i}, step {k}: radius {r_new} != {r_ref}"
        x_end = steps[-1][0]
        if res.fooled[0] and atk.bisection_steps:
            lo = steps[-2][0] if len(steps) > 1 else x[i]
            x_end = reference_boundary(model, lo, x_end, int(y[i]), atk.bisection_steps, atk.norm.p, x[i])
            events["bisected"] += not torch.equal(x_end, steps[-1][0])
        torch.testing.assert_close(res.x_adv[0], x_end, rtol=0, atol=1e-12)
    return events


@pytest.mark.parametrize("norm,ratio", [("l2", "model"), ("linf", "model"), ("l2", "official"),
                                        ("linf", "official")])
def test_first_order_radius_rule_matches_the_reference(norm, ratio):
    """With the configured defaults (radii per norm, overshoot, target), every step's iterate and radius
    equal the reference's; the data make the rule grow, keep and shrink the radius and clip it at both
    bounds."""
    atk, _ = build_attack(compose(["attack=trust_region", f"attack.norm={norm}", f"attack.ratio={ratio}",
                                   "attack.iterations=40"]).attack)
    model, x, y = tanh_net(seed=2, d=16, h=12, k=4, scale=10.0, n=48, dtype=torch.float64)
    events = compare_first_order(atk, model, x, y)
    for what in ("grow", "keep", "shrink", "max", "min", "bisected"):
        assert events[what] > 0, f"the data never make the rule {what}: {dict(events)}"


def test_first_order_fixed_radius_matches_the_reference():
    """``adaptive=False``: the radius stays at its initial value; it caps some steps, and others (the
    linear prediction nearer than the radius) are taken whole and followed by further steps. Without the
    bisection the crossing iterate itself is returned."""
    model, x, y = tanh_net(seed=2, d=16, h=12, k=4, scale=10.0, n=12, dtype=torch.float64)
    for bisection in (10, 0):
        atk = TrustRegion(norm="l2", adaptive=False, radius=0.05, iterations=40, bisection_steps=bisection)
        events = compare_first_order(atk, model, x, y)
        assert events["capped"] > 0 and events["free"] > 0, dict(events)
        assert (events["bisected"] > 0) == (bisection > 0), dict(events)


# --------------------------------------------------------------------------------------- second order
def reference_steihaug(H, g, phi: float, radius: float, cg_steps: int):
    """Steihaug's truncated CG for min m(d) = g.d + d.Hd / 2 over ||d||_2 <= radius, on a dense H (n, n),
    stopped at the first point of the CG path where the model phi + m(d) reaches 0.

    Returns (d, how it stopped, CG iteration of the stop): 'model-zero', 'negative-curvature' and
    'boundary' (both end on the sphere), 'converged' (residual <= 1e-6 ||g||), 'cg-steps' (budget spent).
    """
    d = torch.zeros_like(g)
    if float(g.norm()) == 0:
        return d, "zero-gradient", 0
    r, p = g.clone(), -g
    for k in range(cg_steps):
        hp = H @ p
        kappa = float(p @ hp)
        # tau >= 0 with ||d + tau p|| = radius
        a, b, c = float(p @ p), 2 * float(d @ p), float(d @ d) - radius ** 2
        tau_b = (-b + np.sqrt(max(b * b - 4 * a * c, 0.0))) / (2 * a)
        if kappa <= 0:
            tau_end, how = tau_b, "negative-curvature"
        else:
            alpha = float(r @ r) / kappa
            tau_end, how = (tau_b, "boundary") if alpha >= tau_b else (alpha, None)
        # the model along the segment, as a polynomial in tau; its first zero on [0, tau_end] ends the step
        c0 = phi + float(g @ d) + 0.5 * float(d @ H @ d)
        roots = sorted(z.real for z in np.roots([0.5 * kappa, float(r @ p), c0])
                       if abs(z.imag) < 1e-12 and z.real >= 0)
        if c0 > 0 and roots and roots[0] <= tau_end:
            return d + roots[0] * p, "model-zero", k
        d = d + tau_end * p
        if how is not None:
            return d, how, k
        r_new = r + tau_end * hp
        if float(r_new.norm()) <= 1e-6 * float(g.norm()):
            return d, "converged", k
        p = -r_new + float(r_new @ r_new) / float(r @ r) * p
        r = r_new
    return d, "cg-steps", cg_steps - 1


def check_step_properties(H, g, phi: float, radius: float, d, how: str) -> None:
    """What makes d a trust-region step: inside the radius; a model decrease at least the Cauchy point's
    (unless the path stopped where the model predicts the boundary); on the sphere under negative
    curvature along -g."""
    m = lambda v: float(g @ v + 0.5 * v @ H @ v)                              # noqa: E731
    scale = abs(phi) + float(g.norm()) * radius
    assert float(d.norm()) <= radius * (1 + 1e-9)
    ghg, gn = float(g @ H @ g), float(g.norm())
    tau_c = radius / gn if ghg <= 0 else min(gn ** 2 / ghg, radius / gn)
    if how == "model-zero":
        assert abs(phi + m(d)) <= 1e-9 * scale
    else:
        assert m(d) <= m(-tau_c * g) + 1e-12 * scale
    if ghg <= 0 and how != "model-zero":
        assert float(d.norm()) == pytest.approx(radius, rel=1e-9)


def test_second_order_step_is_steihaug_on_the_explicit_hessian():
    """On a float64 tanh network: the gradient and Hessian of phi = p_y - p_t are computed here by autograd
    (``hessian``), and every step's CG solution equals the reference Steihaug on that Hessian; the new
    iterate is x + (1 + overshoot)(||d|| + 1e-4) d / ||d|| in the box, and the new radius follows the rule
    with rho = actual / predicted decrease of the quadratic model for the step taken."""
    model, x, y = tanh_net(seed=0, d=4, h=8, k=3, scale=2.0, n=24, dtype=torch.float64)
    hows: Counter = Counter()
    for radius in (0.05, 0.3):
        atk = TrustRegion(norm="l2", order=2, radius=radius, radius_min=1e-3, radius_max=0.5, iterations=10)
        steps, cgs, rules = (record(atk, name) for name in ("_step_second", "_steihaug", "_update_radius"))
        atk(model, x, y)
        assert len(steps) == len(cgs) == len(rules) > 1
        for cg, step, rule in zip(cgs, steps, rules):
            # the step's points are the attacked rows of the pass whose graph it differentiates
            _, xg, _, rows, ys, ts, radii = step["args"]
            xs = xg.detach()[rows]
            x_new = step["out"][0]
            r_new = rule["out"]
            _, g_att, phi_att, radius_att, active = cg["args"]
            torch.testing.assert_close(radius_att, radii.double(), rtol=0, atol=0)
            for j in range(len(ys)):
                assert active[j]
                yj, tj, xj = int(ys[j]), int(ts[j]), xs[j]

                def phi_of(v, yj=yj, tj=tj):
                    p = model(v[None]).softmax(1)[0]
                    return p[yj] - p[tj]
                xg = xj.clone().requires_grad_(True)
                phi = phi_of(xg)
                (g,) = torch.autograd.grad(phi, xg)
                g, phi = g.flatten(), float(phi.detach())
                H = hessian(phi_of, xj).reshape(g.numel(), g.numel())
                torch.testing.assert_close(g_att[j].flatten(), g, rtol=1e-10, atol=1e-14)
                assert float(phi_att[j]) == pytest.approx(phi, rel=1e-12)
                d_ref, how, _ = reference_steihaug(H, g, phi, float(radii[j]), atk.cg_steps)
                hows[how] += 1
                d = cg["out"][j].flatten()
                torch.testing.assert_close(d, d_ref, rtol=1e-8, atol=1e-12 * float(radii[j]))
                check_step_properties(H, g, phi, float(radii[j]), d, how)
                length = float(d.norm())
                x_ref = (xj.flatten() + (1 + atk.overshoot) * (length + MIN_STEP) * d / length).clamp(0, 1)
                torch.testing.assert_close(x_new[j].flatten(), x_ref, rtol=0, atol=1e-12)
                delta = x_ref - xj.flatten()
                predicted = -float(g @ delta + 0.5 * delta @ H @ delta)
                rho = (phi - float(phi_of(x_ref.view_as(xj)))) / max(predicted, 1e-300)
                r_ref, _ = radius_rule(length, rho, atk.radius_min, atk.radius_max)
                assert float(r_new[j]) == pytest.approx(r_ref, rel=1e-9)
    for how in ("model-zero", "negative-curvature", "boundary"):
        assert hows[how] > 0, f"no step ends by {how}: {dict(hows)}"


def _spd(n: int, eigs, g: torch.Generator) -> torch.Tensor:
    q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    return q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T


def test_steihaug_on_given_matrices():
    """The CG solver alone, batched, on chosen (H, g, phi, radius): the cases a network rarely produces
    (interior solutions, a spent CG budget, negative curvature met after some CG steps, an inactive
    example) all give the reference's step and satisfy the trust-region properties."""
    n, gen = 6, torch.Generator().manual_seed(0)
    cases = []    # (H, g, phi, radius)
    for _ in range(3):
        g = torch.randn(n, generator=gen, dtype=torch.float64)
        pd = _spd(n, [1.0, 2.0, 3.0, 5.0, 8.0, 13.0], gen)
        ill = _spd(n, [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0], gen)
        indef = _spd(n, [-4.0, 1.0, 2.0, 3.0, 5.0, 8.0], gen)
        newton = float(torch.linalg.solve(pd, g).norm())
        cases += [(pd, g, 100.0, 2 * newton),              # interior: the Newton step
                  (ill, g, 100.0, 1e3),                     # ill-conditioned: CG needs all n steps
                  (pd, g, 100.0, 0.6 * newton),             # ends on the sphere
                  (indef, g, 100.0, 10.0),                  # indefinite: negative curvature on the way
                  (pd, g, 0.05, 2 * newton),                # the model reaches 0 first
                  (-pd, g, 100.0, 1.0)]                     # negative curvature at once
    # indefinite, with g mostly along the positive-curvature directions: met only after some CG steps
    evals, evecs = torch.linalg.eigh(cases[3][0])
    cases.append((cases[3][0], evecs[:, 1:] @ torch.ones(n - 1, dtype=torch.float64) + 1e-3 * evecs[:, 0],
                  100.0, 10.0))
    H = torch.stack([c[0] for c in cases])
    g = torch.stack([c[1] for c in cases]).view(len(cases), 1, 1, n)
    phi = torch.tensor([c[2] for c in cases], dtype=torch.float64)
    radius = torch.tensor([c[3] for c in cases], dtype=torch.float64)
    active = torch.ones(len(cases), dtype=torch.bool)
    active[-2] = False                                      # an example already misclassified: d stays 0

    def hvp(v):
        return torch.einsum("bij,bj->bi", H, v.flatten(1)).view_as(v)

    hows: Counter = Counter()
    for cg_steps in (2, 8):
        d = TrustRegion(norm="l2", order=2, cg_steps=cg_steps)._steihaug(hvp, g, phi, radius, active)
        assert torch.equal(d[~active], torch.zeros_like(d[~active]))
        for j in active.nonzero().flatten().tolist():
            d_ref, how, k = reference_steihaug(H[j], g[j].flatten(), float(phi[j]), float(radius[j]), cg_steps)
            hows[how] += 1
            hows["later negative curvature"] += how == "negative-curvature" and k > 0
            torch.testing.assert_close(d[j].flatten(), d_ref, rtol=1e-9, atol=1e-12)
            check_step_properties(H[j], g[j].flatten(), float(phi[j]), float(radius[j]), d[j].flatten(), how)
    for how in ("converged", "cg-steps", "boundary", "negative-curvature", "model-zero", "later negative curvature"):
        assert hows[how] > 0, f"no case ends by {how}: {dict(hows)}"
