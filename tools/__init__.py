"""Developer tooling run from the repository root: local stacks, traffic, and the README pictures."""
