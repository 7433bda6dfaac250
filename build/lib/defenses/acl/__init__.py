"""Adversarial contrastive learning (ACL; Jiang, Chen, Chen, Wang, "Robust Pre-Training by Adversarial
Contrastive Learning", NeurIPS 2020, arXiv 2010.13337), with its downstream fine-tuning protocols.

Written from the paper and ``docs/methods.md`` section 4; the authors' release
(``VITA-Group/Adversarial-Contrastive-Learning``: ``train_simCLR.py``, ``models/resnet_multi_bn.py``,
``utils.py``, ``train_trades.py``, ``optimizer/lars.py``) served as the reference for details the paper
leaves open (which BN the attack uses, the projection head's layers, the LARS form, the zero-initialised
classifier). ``docs/acl.md`` lists every choice.

A training procedure in two stages, both inside ``ACLProcedure.fit`` (called by
``robustbench_lab.core.train.get_or_train``), each on the core training loop:

1. **Self-supervised pre-training** (labels unused) of the run's network with its classification head
   replaced by a projection head, every BatchNorm doubled into a "normal" and a "pgd" set (all other weights
   shared). ``variant``: ``simclr`` (standard views, normal BN), ``a2a`` (both views attacked, pgd BN),
   ``a2s`` (view 1 standard through the normal BN, view 2 attacked through the pgd BN), ``ds`` (dual stream:
   0.5 NT-Xent(clean views, normal BN) + 0.5 NT-Xent(attacked views, pgd BN)), or ``none`` (no
   pre-training: the fine-tuning stage alone, i.e. TRADES from scratch under ``protocol=aff``). The attack
   maximizes the NT-Xent loss itself (L-inf PGD, random start) with the model in eval mode on the pgd BN.
   The pre-trained encoder is cached under a key of the pre-training spec only, so runs that differ only
   downstream pre-train once.
2. **Fine-tuning** of the run's classifier, initialised from the encoder with the adversarial branch's BN
   ("pgd"; "normal" for ``simclr``, whose pgd set is never trained) and a zero classification head.
   ``protocol``: ``slf`` (standard linear: cross-entropy, frozen encoder), ``alf`` (adversarial linear:
   TRADES, frozen encoder), ``aff`` (adversarial full fine-tuning: TRADES, every weight). The fine-tuning
   recipe is the run's ``model.train``; the epoch kept is the one of best validation robust accuracy.

Modules, one concept each: ``dual_bn`` (the two BatchNorm sets), ``contrastive_model`` (encoder, projection
head, transfer into the classifier), ``ntxent`` (the loss and the contrastive PGD), ``augment`` (SimCLR
views), ``lars`` (the pre-training optimizer), ``settings`` (choices, dataclasses, validation),
``pretraining``, ``finetuning``, ``encoder_cache``, ``procedure`` (``ACLProcedure``) and ``defense``
(``ACL``, the config's ``_target_``). This ``__init__`` imports none of them (a package importing its own
modules is an import cycle in the layer check): import from the modules.
"""
