"""Layer 3: the gradient estimators of the smoothed meta-objective and their
antithetic unroll (inner problems, chunked reverse pass, sample sharding, batch
reading), truncation-length schedules and estimator mixtures
(docs/architecture.md)."""
