"""Running meta-training: the LO compatibility layer and its stand-ins, the
resumable local loop with checkpoints and metrics, and from-scratch evaluation."""
