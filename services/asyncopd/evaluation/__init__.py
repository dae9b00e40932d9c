"""Accuracy of a model on a task: greedy generation then grading (`greedy`), and `asyncopd eval` (`cli`).

It knows models, tokenizers and graders; nothing of services, Redis or gRPC.
"""
