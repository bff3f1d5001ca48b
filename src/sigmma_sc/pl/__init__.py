"""Plots (matplotlib): microenvironments, composition, expression, training, retrieval, attention.

Single-panel plots return their :class:`~matplotlib.axes.Axes`, multi-panel plots their
:class:`~matplotlib.figure.Figure`; all take ``figsize`` and ``save``.
"""

from ._attention import attention
from ._composition import composition
from ._expression import expression
from ._microenvironments import microenvironments
from ._retrieval import retrieval_examples
from ._training import training_curves

__all__ = ["attention", "composition", "expression", "microenvironments", "retrieval_examples", "training_curves"]
