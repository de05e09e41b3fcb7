"""Privacy maths (pure functions): DP-SGD noise calibration and epsilon accounting via Opacus.

State (a client's accountant that persists across rounds, the server's ledger) lives with the
federation code; this package only computes.
"""
