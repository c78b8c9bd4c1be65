"""Pipeline stages, one module each, in pipeline order."""
from . import calibrate, collect_activations, evaluate, fuse, reassemble, rotate, search_theta, smooth, train_lowrank

STAGES = {
    "calibrate": calibrate,
    "rotate": rotate,
    "collect_activations": collect_activations,
    "smooth": smooth,
    "search_theta": search_theta,
    "reassemble": reassemble,
    "train_lowrank": train_lowrank,
    "fuse": fuse,
    "evaluate": evaluate,
}
