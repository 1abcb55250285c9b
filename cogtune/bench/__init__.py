"""`cogtune bench`: grids of training runs, sized by the estimator (`cogtune.train.sizing`) or measured.

Importing the package stays light: `cogtune completion` reads `METHODS` without loading torch.
"""

METHODS = ("lora", "full")  # the values of the methods axis: full=False or True
