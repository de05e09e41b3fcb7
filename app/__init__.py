"""fedrec: a privacy-preserving federated recommender built on a small language model.

Run ``fedrec --help`` for the command line. The package maps the repository's top-level folders
(``server/``, ``client/``, ``shared/``, ``simulations/``) to ``fedrec.server``, ``fedrec.client``,
``fedrec.shared`` and ``fedrec.simulations``; this folder (``app/``) is the package root.
"""

__version__ = "0.1.0"
