"""The exception types qpass raises, so users can catch qpass's own errors precisely."""


class QpassError(ValueError):
    """A user-facing error: the message names the field or module at fault and says what to do."""


class AdapterLoadError(QpassError):
    """An adapter directory or file that cannot be loaded onto this model."""


class QpassWarning(UserWarning):
    """Something qpass serves as asked but the user should know: e.g. adapter weights that hold NaN or inf."""
