"""`asyncopd chaos`: fault injection over a local pipeline run, and the checks it must pass."""
