"""The fedrec recommender: LoRA (PEFT) on a text backbone, an item tower and a user tower.

Modules: :mod:`.config` (validated settings), :mod:`.catalog_cache` (frozen per-token states of
the public catalog), :mod:`.towers` (item and user towers, scoring), :mod:`.examples` (how
training examples are built), :mod:`.artifacts` (saving/loading a trained model).
"""
