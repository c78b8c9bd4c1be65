"""Pipeline stages, one module each, in pipeline order."""
from . import calibrate, collect_activations, evaluate, fuse, reassemble, search_theta, train_lowrank

STAGES = {
    "calibrate": calibrate,
    "collect_activations": collect_activations,
    "search_theta": search_theta,
    "reassemble": reassemble,
    "train_lowrank": train_lowrank,
    "fuse": fuse,
    "evaluate": evaluate,
}
