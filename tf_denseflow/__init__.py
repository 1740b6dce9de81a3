"""tf_denseflow: DenseFlow (Densely connected normalizing flows, NeurIPS 2021) in TF2 + TFP.

Grcic, Grubisic, Segvic. Densely connected normalizing flows. NeurIPS 2021.
"""

from tf_denseflow import bijectors
from tf_denseflow.config import DenseFlowConfig
from tf_denseflow.model import DenseFlow

__all__ = ['DenseFlow', 'DenseFlowConfig', 'bijectors']
__version__ = '0.1.0'
