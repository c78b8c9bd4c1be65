"""Models as they come: each family's layout (arch), loading from a GGUF package, the hub or a directory
(model_loading), and streaming a checkpoint block by block (streaming). Nothing here quantizes.

May import: core's foundation (errors, identity).
"""
