"""Writing the quantized model: our packed format (packed), compressed-tensors for stock transformers and vLLM
(export_ct, with the modeling code shipped in the checkpoint: remote_modeling), sharded writing (shards), the final
checkpoint as a cached artifact (model_writer), and integer-GEMM execution (int_linear).

May import: quantized, model, core's foundation.
"""
