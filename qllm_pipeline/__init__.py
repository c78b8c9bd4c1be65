"""qllm-pipeline: resumable QLLM quantization of decoder-only models (LLaMA, Mistral, Qwen2/3, Gemma-3).

Subpackages, bottom up (each may import only the ones below it; see its docstring): core's foundation (errors, settings,
identity, cache, memory, distributed) → model → quantized → methods | data | evaluation | export → core (stage
contract, runner, plan, schema, cli). The stages live in qllm_pipeline.stages (the stages/ folder).
"""

__version__ = "0.1.0"
