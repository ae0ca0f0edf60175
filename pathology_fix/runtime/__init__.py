"""Layer 5, running meta-training: the outer loop, the run directory's checkpoints
and summaries, the resumable loop LO's run_train calls, from-scratch evaluation,
several processes, and meta-validation's building blocks (docs/architecture.md).
`local_training` registers the gin name `resumable_local_train`."""
