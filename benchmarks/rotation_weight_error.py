"""How the rotation changes the weights' own quantization error: relative RTN error ‖Q(W) − W‖ / ‖W‖ per projection
(RMS over the blocks) of the default model as loaded, with its norms folded in, and rotated (QuaRot-style).

    python benchmarks/rotation_weight_error.py [--wbits 4] [--seed 0]     # ~1 min on 2 CPU cores
Writes benchmarks/results/rotation_weight_error.md and .json.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def relative_errors(model, spec) -> dict[str, float]:
    from qllm_pipeline.quantized.blocks import decoder_layers
    from qllm_pipeline.quantized.quantizer import quantize_weight

    layers = decoder_layers(model)
    out = {}
    for name in PROJECTIONS:
        sq = [float(((quantize_weight(w, spec) - w).norm() / w.norm()) ** 2)
              for w in (layer.get_submodule(name).weight.detach() for layer in layers)]
        out[name] = (sum(sq) / len(sq)) ** 0.5
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wbits", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from hydra import compose, initialize_config_dir

    from qllm_pipeline.methods.rotation import fuse_norms_into_linears, rotate_model
    from qllm_pipeline.model.model_loading import ModelSource, load_model
    from qllm_pipeline.quantized.quantizer import QuantSpec

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        m = compose("config").model
    model = load_model(ModelSource.from_config(m))
    folded = copy.deepcopy(model)
    fuse_norms_into_linears(folded)
    rotated = copy.deepcopy(model)
    rotate_model(rotated, args.seed)
    spec = QuantSpec(args.wbits)
    table = {label: relative_errors(mdl, spec) for label, mdl in (("as loaded", model), ("norms folded", folded), ("rotated", rotated))}
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benchmarks/rotation_weight_error.py", *sys.argv[1:]])
    (args.out / "rotation_weight_error.json").write_text(json.dumps({"command": command, "wbits": args.wbits, "errors": table}, indent=2))
    lines = [f"# Relative W{args.wbits} RTN weight error, RMS over blocks (`{command}`)", "",
             "| weights | " + " | ".join(p.split(".")[-1] for p in PROJECTIONS) + " |", "|---|" + "---:|" * len(PROJECTIONS)]
    lines += [f"| {label} | " + " | ".join(f"{row[p]:.4f}" for p in PROJECTIONS) + " |" for label, row in table.items()]
    text = "\n".join(lines) + "\n"
    (args.out / "rotation_weight_error.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
