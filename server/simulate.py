"""Moved to :mod:`fedrec.simulations.launch`; a re-export until app/cli.py switches."""

from fedrec.simulations.launch import resolve as resolve
from fedrec.simulations.launch import simulate as simulate
