"""Recovery axis: what happens after masking (:data:`RECOVERIES`: none, distill, layerwise).

* :func:`distill`: network-level training of the masked student against the frozen dense teacher, with
  a pluggable objective (``kd_logits``, ``layer_mse``, ``kd_blocks``, ``base_decayed``) and mask dynamics
  (``static``, ``gradual``, ``learned_thresholds``, ``dst``, ``iee``).
* :func:`reconstruct_layers`: POT's layer-wise reconstruction on cached dense inputs.
* :func:`recalibrate_batchnorm`: fresh BatchNorm statistics from the calibration set.
"""

from .batchnorm import recalibrate_batchnorm
from .dst import DynamicSparseTraining
from .dynamics import DYNAMICS, Dynamics, Static, TrainState
from .gradual import Gradual
from .iee import ExploitExplore
from .kinds import RECOVERIES, Distill, Layerwise, NoRecovery, Recovery
from .layerwise import reconstruct_layers
from .objectives import OBJECTIVES, BaseDecayed, KDBlocks, KDLogits, LayerMSE, Objective
from .thresholds import LearnedThresholds, ThresholdMask
from .trainer import DistillSettings, TrainSchedule, distill

__all__ = ["BaseDecayed", "DYNAMICS", "Distill", "DistillSettings", "Dynamics", "DynamicSparseTraining",
           "ExploitExplore", "Gradual", "KDBlocks", "KDLogits", "LayerMSE", "Layerwise", "LearnedThresholds",
           "NoRecovery", "OBJECTIVES", "Objective", "RECOVERIES", "Recovery", "Static", "ThresholdMask",
           "TrainSchedule", "TrainState", "distill", "recalibrate_batchnorm", "reconstruct_layers"]
