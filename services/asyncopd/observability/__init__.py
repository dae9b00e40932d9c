"""Metrics and health: the Prometheus metric families every service exports (`metrics`) and the exec
health probe the chart runs when TLS is on (`health_probe`). Nothing here knows what a service does."""
