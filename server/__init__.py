"""The Flower ServerApp side of fedrec (strategy, aggregation, privacy ledger, run directory)."""
