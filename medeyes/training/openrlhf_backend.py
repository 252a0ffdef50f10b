"""Old import path of the OpenRLHF backend, kept so agent files exported before the split still load.

The code lives in the :mod:`medeyes.training.openrlhf` package (one module per concern); import from there.
"""

from medeyes.training.openrlhf import *  # noqa: F403
from medeyes.training.openrlhf import __all__  # noqa: F401
