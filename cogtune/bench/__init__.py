"""`cogtune bench`: grids of training runs, sized by the estimator (`cogtune.train.sizing`) or measured."""
