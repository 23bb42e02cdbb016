"""Recovery axis: what happens after masking.

* :func:`distill`: network-level training of the masked student against the frozen dense teacher, with
  a pluggable objective (``kd_logits``, ``layer_mse``) and mask dynamics (``static``).
* :func:`reconstruct_layers`: POT's layer-wise reconstruction on cached dense inputs.
* :func:`recalibrate_batchnorm`: fresh BatchNorm statistics from the calibration set.
"""

from .batchnorm import recalibrate_batchnorm
from .dynamics import DYNAMICS, Dynamics, Static, TrainState
from .layerwise import reconstruct_layers
from .objectives import OBJECTIVES, KDLogits, LayerMSE, Objective
from .trainer import TrainSchedule, distill

RECOVERIES = ("none", "distill", "layerwise")

__all__ = ["DYNAMICS", "Dynamics", "KDLogits", "LayerMSE", "OBJECTIVES", "Objective", "RECOVERIES", "Static",
           "TrainSchedule", "TrainState", "distill", "recalibrate_batchnorm", "reconstruct_layers"]
