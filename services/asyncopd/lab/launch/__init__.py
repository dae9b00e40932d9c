"""The local launcher behind `asyncopd run`: child processes by handle, Redis, health waits,
live progress, the run report and its plots. It starts the services as separate processes and
talks to them only through their typed gRPC clients and their log/metrics output.
"""
