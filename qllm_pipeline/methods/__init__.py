"""The methods' maths, free of Hydra: QLLM's θ search (theta_search, reassembly_inputs) and low-rank correction
(lowrank), rotations (rotation), SmoothQuant (smoothquant), weight rounding (weight_rounding, gptq) and end-to-end
tuning (e2e_tuning, e2e_streaming). The stages in qllm_pipeline.stages call them.

May import: quantized, model, core's foundation; not data, evaluation or export.
"""
