"""The server side of fedrec: the Flower ServerApp (``app``, ``strategy``, ``user_dp``,
``outputs``) and the SuperLink operator's deployment set-up (``deploy``: certificates, SuperNode
keys, the commands). It imports ``fedrec.shared`` only, never ``fedrec.client``: what both sides
exchange is :mod:`fedrec.shared.federation.contract` (``tests/test_layering.py`` checks it)."""
