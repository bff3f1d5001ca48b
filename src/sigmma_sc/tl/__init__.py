"""Tools: featurization, training, embedding."""

from ._composition import microenvironment_composition
from ._de import microenvironment_de
from ._embed import embed
from ._featurize import featurize
from ._microenvironments import microenvironments
from ._predict import predict_expression
from ._retrieve import retrieve
from ._slide import attach_reference, fit_probe, predict_slide
from ._train import train_sigmma

__all__ = [
    "attach_reference",
    "embed",
    "featurize",
    "fit_probe",
    "microenvironment_composition",
    "microenvironment_de",
    "microenvironments",
    "predict_expression",
    "predict_slide",
    "retrieve",
    "train_sigmma",
]
