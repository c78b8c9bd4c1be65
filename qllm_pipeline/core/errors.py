"""User-facing errors: one clear line saying what was wrong and what to do."""


class PipelineError(ValueError):
    """A problem with the user's input or environment. The CLI prints it as a single line and exits with code 2."""
