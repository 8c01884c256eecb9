"""The one exception a user can act on."""


class PipelineError(Exception):
    """A problem the user can fix (bad params, bad data, missing inputs).

    Stages print its message as one line and exit non-zero; anything else is a bug and
    keeps its traceback.
    """
