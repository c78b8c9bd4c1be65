"""qllm-pipeline: resumable QLLM quantization of LLaMA-family models."""

__version__ = "0.1.0"
