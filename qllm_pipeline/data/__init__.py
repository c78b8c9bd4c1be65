"""Text: the corpora for calibration and evaluation, and the token windows cut from them (corpora).

May import: model, core's foundation.
"""
