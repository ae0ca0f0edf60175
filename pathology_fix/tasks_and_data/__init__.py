"""Layer 4: what the learned optimizer trains on: offline datasets, the paper's
networks and class-subset task families, and the validation meta-objective as a
task wrapper (docs/architecture.md)."""
