"""The lab: everything that runs, measures or stresses the product without being part of it.

`launch` (the local launcher behind `asyncopd run`), `chaos` (fault injection), `study` (the
staleness study), `fleet` (simulated replicas against the real cache), `toytrain` (training the
shipped toy models), `bench` (every benchmark, one module each) and `prometheus_local`. The lab
imports the product core; nothing in the core imports the lab.
"""
