"""Data sets by name: ``build_dataset(name, ...)`` returns a DataBundle.

A bundle holds the train / val / test splits (the validation split is held out
of the training set; the test split is never used for model selection) and the
``model_args`` a model needs to fit the data (image size, channels, classes, or
vocabulary size). Loaders for each family live in their own module and
register themselves with ``@register_dataset``.
"""

from afmp.data import folder, images, listops, points, text, vision  # noqa: E402, F401  (each registers its data sets)
from afmp.data.base import (  # noqa: F401  (the package's API)
    COMMON_OPTIONS,
    DATASETS,
    DataBundle,
    DataUnavailable,
    build_dataset,
    dataset_options,
    list_datasets,
    register_dataset,
)
