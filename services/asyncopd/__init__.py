"""AsyncOPD: asynchronous on-policy distillation of language models.

The package is laid out the way it deploys. The product core: one subpackage per service
(`cache`, `rollout`, `teacher`, `learner`, `autoscaler`), the pure estimator math in `opd`, the
connections between services in `wire` (protobuf <-> domain, gRPC plumbing) and `weightsync`
(learner -> rollout weights), the domain `records`, `config`, `tasks` (prompt sets and graders,
the toy world included), `models`, `evaluation` and `observability`. The lab (`lab`: the local
launcher, chaos, the study, fleet simulation, toy-model training, benchmarks) imports the core;
the core never imports the lab (tests/unit/test_layout.py).
"""

__version__ = "0.1.0"
