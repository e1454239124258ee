"""qpass's built-in adapter pattern specs, one file per adapter kind (installed as `qpass.patterns`).

Importing this package registers every spec; a new adapter kind is a new file here (or anywhere, for a
user's own spec: see examples/custom_pattern.py) that calls `qpass.register(AdapterSpec(...))`.
"""

from . import lora  # noqa: F401
from . import qalora  # noqa: F401
from . import adalora  # noqa: F401
from . import oft  # noqa: F401
