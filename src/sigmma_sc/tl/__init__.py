"""Tools: featurization, training, embedding."""

from ._embed import embed
from ._featurize import featurize
from ._microenvironments import microenvironments
from ._train import train_sigmma

__all__ = ["embed", "featurize", "microenvironments", "train_sigmma"]
