"""Neural-guided representation alignment (Shao, Ma, Li, Beck, arXiv 2405.02564; ``docs/neural_guidance.md``).

The classifier gets a second, linear *neural head* on one of its layers, trained with
``(1 - alpha) * CE + alpha * MSE(head(features), target(x))``; the targets come from a region's responses
(measured, or an offline model-derived surrogate) turned into regression targets by the authors' pipeline.
Plain values in, no application imports: configs reach these classes through ``_target_`` paths.

Modules, one concept each (nothing is re-exported here: import from the module):

* ``defense``: ``NeuralGuidance``, the defense (``robustbench_lab/conf/defense/neural_guidance.yaml``);
* ``procedure``: ``NeuralGuidanceProcedure``, the per-batch loss and the head, for the core's training loop;
* ``features``: the guided layer (``resolve_layer``, ``FeatureTap``, ``layer_features``);
* ``analysis``: ``AnalysisSettings`` and the measurements after training (robustness curve, smoothness, RSA);
* ``target``: ``TargetSource`` (the pipeline run on a source's fit data) and ``FittedTarget``;
* ``pipeline``: steps 1-3 (repeats, z-score, PCA: ``ResponsePipeline``) and the shared response modules;
* ``predictor``: step 4, ``PredictorSettings`` and the predictor's training (modes and controls);
* the sources (``robustbench_lab/conf/defense/neural_target/*.yaml``): ``gabor`` (``V1GaborTarget``, a VOneNet-like Gabor
  bank), ``model_stage`` (``ModelStageTarget``, a stage of a trained, cached zoo network) and
  ``neural_file`` (``FileTarget``, measured responses in a validated ``.npz``).
"""
