"""`asyncopd study`: the paper's staleness study reproduced on the toy task, in one process.

- `harness`: a fixed-staleness trainer built from the project's own engine, scorer, trainer,
  estimator and evaluation (rollouts of step t come from version max(0, t - s)).
- `gradients`: pure bias/variance/cosine statistics of gradient estimators.
- `probe`: draws the estimators' gradients on fixed rollouts (the offline part 3a).
- `plan`: which cells each part runs (config overrides), and the study's sizes.
- `report`: study.md tables, plots and the findings derived from the numbers.
- `cli`: the `asyncopd study` subcommand.
"""
