"""`cogtune bench`: size training runs without a GPU (`estimate`) and measure them on one (`measure`)."""
