"""Rollout autoscaler: a pure scaling policy, the pipeline signals it reads, and a Kubernetes adapter."""
