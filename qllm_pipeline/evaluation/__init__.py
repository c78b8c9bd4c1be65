"""Measuring a model: perplexity block by block (perplexity), paired bootstrap intervals (intervals), and zero-shot
tasks with lm-eval (zeroshot; its workarounds isolated in lm_eval_compat; task files in tasks/).

May import: quantized, model, core's foundation.
"""
