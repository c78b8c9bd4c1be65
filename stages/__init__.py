"""The stage registry: one instance per stage, in pipeline order (the order is derived from this list).

Adding a stage: a module here with a `Stage` subclass (qllm_pipeline.core.stage), one line below, and its conf group.
"""
from qllm_pipeline.core.stage import registry

from .calibrate import Calibrate
from .collect_activations import CollectActivations
from .evaluate import Evaluate
from .fuse import Fuse
from .reassemble import Reassemble
from .rotate import Rotate
from .search_theta import SearchTheta
from .smooth import Smooth
from .train_lowrank import TrainLowrank
from .tune_e2e import TuneE2E

STAGES = registry(
    [Calibrate(), Rotate(), CollectActivations(), Smooth(), SearchTheta(), Reassemble(), TrainLowrank(), Fuse(), TuneE2E(), Evaluate()]
)
