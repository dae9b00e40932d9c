"""`asyncopd study`: the paper's staleness study reproduced on the toy task, in one process.

- `harness`: a fixed-staleness trainer built from the project's own engine, scorer, trainer,
  estimator and evaluation (rollouts of step t come from version max(0, t - s)).
- `gradients`: pure bias/variance/cosine statistics of gradient estimators.
- `probe`: draws the estimators' gradients on fixed rollouts (the offline part 3a).
- `plan`: the rows of each part as config overrides, the cells they need, the study's size.
- `runner`: runs the cells and probes in worker processes (one torch thread each).
- `summary`, `findings`: per-table numbers, paired differences, and the findings computed from them.
- `report`, `plots`: study.md, study.json and the PNG figures.
- `cli`: the `asyncopd study` subcommand.
"""
