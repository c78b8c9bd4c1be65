"""The pipeline itself: the stage contract (stage), the runner that walks stages and blocks (runner), the artifact
cache (cache), the memory plan (plan, working_sets, lrc_memory), the configuration's schema (schema), the command line
(cli), and what a run reports (report, run_report, plots, sweep, tracking).

Its foundation (errors, settings, identity, cache, memory, distributed, scratch) imports nothing else of ours and is what every other
subpackage may use from here; the rest of core sits on top and may import every subpackage and qllm_pipeline.stages.
"""
