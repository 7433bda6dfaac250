"""A JAX backend for the zoo's CIFAR ResNets: forward pass, unit functions, Jacobian operators, and a
torch-facing classifier that attacks can run on. This module gathers the public names of its four modules
(``jax_params``: the weights as a pytree; ``jax_net``: the forward pass and unit functions;
``jax_jacobian``: the Jacobian operator; ``jax_classifier``: the torch-facing classifier); it needs jax,
so the application imports it only for ``linearize.backend=jax``.

Why: JAX composes ``jvp``/``vjp`` with ``vmap`` and ``jit``, which makes the batched Jacobian products of the
linearization analysis (Rothauge et al., arXiv 1905.13386; docs/methods.md section 6) cheap, and gives an
independent implementation of the network to check the PyTorch numbers against (docs/jax_backend.md).

- ``params_from_torch(model)``: the weights of a ``Classifier`` around a ``CifarResNet`` (or a bare
  ``CifarResNet``, or either one's state dict) as a ``ResNetParams`` pytree of ``jnp`` arrays, including the
  normalization mean/std, BatchNorm running statistics and eps, and every unit's skip scale lambda.
- ``jax_forward(params, x)``: logits (B, K) for images x (B, C, H, W) in [0, 1]; NCHW throughout,
  ``lax.conv_general_dilated`` with torch's stride and symmetric zero padding, BatchNorm in eval mode, He et
  al.'s option-A shortcut (stride-2 subsampling, zero channel padding) or the bottleneck's projection.
- ``jax_hidden_states(params, x)``: ``"stem"`` and ``"s{stage}u{unit}"`` (1-based, after the post-addition
  ReLU), the names of ``robustbench_lab.linearization.units.hidden_states``.
- ``jax_unit_function`` / ``jax_stage_function``: a unit (or a stage) as a batched function of its input,
  with boundary ``"pre"`` (lambda * S(x) + F(x)) or ``"post"`` (relu of it), skip scale and residual-weight
  scale as arguments.
- ``JaxJacobian(fn, x0)``: the Jacobian operator of ``operators.JacobianOperator`` (numpy in and out:
  ``jvp``, ``vjp``, ``dense``) by vmapped, jitted ``jax.jvp`` / ``jax.vjp``. ``fn`` is a JAX function or one of
  the torch unit/stage functions of ``units`` (translated by ``jax_net``, checked against torch at ``x0``).
- ``JaxClassifier``: an ``nn.Module`` whose forward and backward (first and second order) run in JAX, with
  the ``num_classes`` and ``bounds`` of ``Classifier``, so every attack in ``attacks/`` runs on it unchanged.

Precision: float32 by default (convolutions and matmuls at ``Precision.HIGHEST``, so no TF32/bf16 passes on
accelerators). float64 operators run inside ``jax.enable_x64`` locally; the global JAX setting is untouched.
"""

from robustbench_lab.linearization.jax_classifier import JaxClassifier
from robustbench_lab.linearization.jax_jacobian import JaxJacobian, x64
from robustbench_lab.linearization.jax_net import (UnitChain, from_torch_function, jax_forward, jax_hidden_states,
                                                   jax_stage_function, jax_unit_function, jax_unit_input)
from robustbench_lab.linearization.jax_params import (ConvSpec, NetSpec, ResNetParams, UnitSpec, params_from_torch,
                                                      unit_from_torch)

__all__ = ["ConvSpec", "JaxClassifier", "JaxJacobian", "NetSpec", "ResNetParams", "UnitChain", "UnitSpec",
           "from_torch_function", "jax_forward", "jax_hidden_states", "jax_stage_function", "jax_unit_function",
           "jax_unit_input", "params_from_torch", "unit_from_torch", "x64"]
