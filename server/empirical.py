"""Moved to :mod:`fedrec.simulations.empirical_audit`; a re-export until app/cli.py switches."""

from fedrec.simulations.empirical_audit import run_empirical as run_empirical
