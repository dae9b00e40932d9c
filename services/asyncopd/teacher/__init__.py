"""The teacher service: prefill-only scoring of rollouts (teacher top-k log-probs, log-probs at given ids,
tail mass), claimed from and returned to the cache."""
