"""The client side of fedrec: the Flower ClientApp (``app``), its per-process state
(``runtime``), local DP-SGD (``local_train``) and the privacy budget it keeps (``budget``). It
imports ``fedrec.shared`` only, never ``fedrec.server`` (``tests/test_layering.py``)."""
