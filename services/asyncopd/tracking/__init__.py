"""Experiment tracking: the learner's step records sent to TensorBoard (and later other backends).

The learner writes one JSON record per step (and per evaluation) to its step log; a `Tracker`
receives the same records. `scalars_of` turns a record into named scalars (pure, shared by every
backend) and `histograms_of` into named value lists (the staleness histogram); a backend only
writes them. `open_tracker(config, output_dir)` builds what `tracking.backends` lists.

It knows the step record's fields and the backends' writers; nothing of training, services or
the cache. A backend's failure is logged and the backend dropped: tracking never stops training.
"""

from asyncopd.tracking.base import FanOut, NullTracker, Tracker, open_tracker
from asyncopd.tracking.records import histograms_of, scalars_of

__all__ = ["FanOut", "NullTracker", "Tracker", "histograms_of", "open_tracker", "scalars_of"]
