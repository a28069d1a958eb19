"""The DMFT activity service (HTTP API over the model bundles)."""
