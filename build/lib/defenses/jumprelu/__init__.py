"""JumpReLU retrofitting (Erichson, Yao, Mahoney, "JumpReLU: A Retrofit Defense Strategy for Adversarial
Attacks", arXiv 1904.03750, ICPRAM 2020). Written from the paper and docs/methods.md section 3.

Every ``nn.ReLU`` of an already trained model becomes JumpReLU_k(x) = x if x > k else 0, one shared jump k,
weights unchanged, no retraining. The jump trades clean accuracy for (apparent) robustness and is tuned on
validation data: ``jump='auto'`` takes the largest k of a grid whose clean validation accuracy is within
``max_accuracy_drop`` of the k = 0 (original) model.

The jump's autograd derivative is 1[x > k]: no gradient flows through the discontinuity, which can mask
gradients (Athalye et al. 2018). For adaptive evaluation every JumpReLU has a BPDA mode (forward unchanged,
backward through a smooth surrogate), switched on by the ``attacks.adaptive.BPDA`` attack wrapper.

Modules (import them directly; this package file re-exports nothing, so no module depends on its parent):

* ``activation``: the ``JumpReLU`` module and its BPDA backward;
* ``retrofit``: the model transform (every ReLU -> JumpReLU, the original kept for transfer attacks);
* ``measure``: what the tuning measures per jump (zero input gradients, an attack's strength);
* ``tuning``: the choice of the jump and the stored tunings;
* ``plot``: the trade-off figure;
* ``defense``: ``JumpReLUDefense``, the defense a config builds (``_target_: defenses.jumprelu.defense.JumpReLUDefense``).
"""
