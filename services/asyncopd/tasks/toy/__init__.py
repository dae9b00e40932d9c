"""The toy world: the synthetic reasoning task (`task`) and its character tokenizer (`tokenizer`).

The task the shipped tiny models are trained on; it imports nothing else of the project.
"""
