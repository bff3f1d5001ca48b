"""Tools: featurization, training, embedding."""

from ._embed import embed
from ._featurize import featurize
from ._train import train_sigmma

__all__ = ["embed", "featurize", "train_sigmma"]
