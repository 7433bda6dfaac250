"""The analyses of ``task=linearize`` (Rothauge et al., arXiv 1905.13386; docs/methods.md section 6).

Each analysis writes a CSV table and a PNG plot through the run's ``ResultWriter``, returns scalar metrics
(slash-namespaced, for ``metrics.json``) and a Markdown section for ``summary.md``:

- ``units``: singular values of every selected residual unit's Jacobian J = lambda S + dF at the unit input of
  each image (S the shortcut; identity inside a stage). Per unit: the fraction within ``tol`` of 1, min /
  median / max, the top singular value, and the image-to-image spread (std across images of the sorted
  singular values, relative to their mean). ``explicit_units``: complete spectra of chosen units.
- ``stages``: the same for whole stages (top/bottom-k by Lanczos unless explicit is affordable).
- ``sweep``: the spectrum of one unit as its skip scale lambda (and, separately, its residual weights) vary.
- ``propagation``: ||h_k(x + d) - h_k(x)|| at every state h_k (stem, every unit output, logits) for a random
  d and an adversarial d of the same L2 norm, and each unit's gain ||dh_k|| / ||dh_{k-1}||.
- ``energy``: the share of each propagated perturbation (its difference at a unit's input) that lies in the
  span of that unit's top-k right singular vectors, against k / n for a direction drawn at random.

One module per analysis (``unit_spectra``, ``stage_spectra``, ``scale_sweep``, ``propagation``, ``energy``),
sharing ``context`` (the options, images, model and writer of a run), ``tables`` (statistics and table rows
of spectra) and ``plots`` (every analysis' figure, drawn from its table and spectra alone); ``runner.run_all`` runs the selected ones in a fixed order and
``runner.summary_markdown`` writes the summary. This package imports nothing itself.

Spectra come from ``robustbench_lab.linearization.spectra.singular_values`` on Jacobian operators of either
backend. A spectrum is *complete* (every singular value, explicit or exact low-rank) or *partial* (Lanczos top-k and
bottom-k): statistics a partial spectrum cannot give (the median, the exact fraction equal to 1) are NaN,
and the fraction equal to 1 is then reported as bounds ``frac_one_lo`` / ``frac_one_hi``.
"""
