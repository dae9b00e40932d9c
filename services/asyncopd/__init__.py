"""AsyncOPD: asynchronous on-policy distillation of language models.

The package is laid out the way it deploys: one subpackage per service (cache, rollout,
teacher, learner), the pure estimator math in `opd`, the connections between services in
`wire` (protobuf <-> domain) and `weightsync` (learner -> rollout weights), and the embedded
toy world in `toy`.
"""

__version__ = "0.1.0"
