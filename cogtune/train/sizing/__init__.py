"""Sizing a training run without a GPU: the estimator and the choices made from it.

`estimate.estimate_run(config, shapes)` traces the run's own training step and validation pass
on the meta device through a model of the CUDA caching allocator (`trace`, `allocator`); `fit`
decides what fits a GPU, what would make a run fit, and the pre-flight advice `run_training`
prints. The estimator uses the training building blocks (`plan`, `model`, `step`), never the
recipe.
"""
