"""Code used by both sides of the federation: data, splits, metrics, baselines, model, inference."""
