"""Concrete defenses, one file per defense (the protocols are in ``robustbench_lab.core.defense_base``).

* ``defenses.jumprelu``: JumpReLU retrofitting (Erichson et al. 2019), a model transform: every ReLU of a
  trained model becomes ``x * 1[x > k]``; the jump ``k`` is tuned on validation data.
* ``defenses.adv_training``: adversarial training (Madry et al. 2018 PGD-AT; Wong et al. 2020 FGSM with a
  random start; Zhang et al. 2019 TRADES), a training procedure: it replaces the per-batch training loss
  and enters the checkpoint key.
* ``defenses.acl``: adversarial contrastive learning (Jiang et al. 2020), a training procedure with its own
  schedule (``fit``): self-supervised pre-training with dual BatchNorm (SimCLR, A2A, A2S, DS; the encoder is
  cached on its own key), then a downstream protocol (SLF, ALF, AFF with TRADES).
* ``defenses.neural_guidance`` (a package): neural-guided representation alignment (Shao et al. 2024), a
  training procedure: a linear neural head regresses targets (measured data through a predictor, or
  model-derived surrogates: a V1-like Gabor bank, stages of a trained network); the evaluated model is the
  plain classifier.
"""
