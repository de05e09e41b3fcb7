"""Data: the fedrec on-disk layout, its strict loader, MovieLens-100K fetching, synthetic data.

Entry points: :func:`fedrec.shared.data.layout.load_dataset`,
:func:`fedrec.shared.data.movielens.fetch_ml100k`, :func:`fedrec.shared.data.synthetic.generate`.
"""

from fedrec.shared.data.dataset import Dataset
from fedrec.shared.data.errors import DataError
from fedrec.shared.data.layout import load_dataset, write_dataset

__all__ = ["DataError", "Dataset", "load_dataset", "write_dataset"]
