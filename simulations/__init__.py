"""Experiment suites: named configurations that run fedrec and its baselines on the same split."""
