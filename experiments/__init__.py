"""Experiments: python -m experiments.run."""
