"""Prometheus and Grafana configuration of the service, and the scripts that run them locally."""
