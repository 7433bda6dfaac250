"""Concrete defenses, one file per defense (the protocols are in ``robustbench_lab.defense_base``).

* ``defenses.jumprelu``: JumpReLU retrofitting (Erichson et al. 2019), a model transform: every ReLU of a
  trained model becomes ``x * 1[x > k]``; the jump ``k`` is tuned on validation data.
* ``defenses.adv_training``: adversarial training (Madry et al. 2018 PGD-AT; Wong et al. 2020 FGSM with a
  random start; Zhang et al. 2019 TRADES), a training procedure: it replaces the per-batch training loss
  and enters the checkpoint key.
"""
