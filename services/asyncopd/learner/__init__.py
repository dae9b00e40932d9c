"""The learner service: recompute student log-probs, the configured OPD estimator and corrections, AdamW,
versions, checkpoints; it hands new weights to a `weightsync` transport and never imports another service."""
