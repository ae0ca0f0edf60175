"""Layer 4: the learned optimizers this project adds (the paper's MLP, ProgressAdam,
the smoothing wrapper for LO's estimators) and the outer optimizer that trains
their theta (docs/architecture.md)."""
