"""The wire and storage form of a model: its tensors as float32 arrays, in layer order.

Kept apart from ``quorum.tasks.model`` so that code which only moves, checks or stores weights (the
round loop, the runners, the artifact store) never imports torch, which takes seconds to load.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

Weights = list[NDArray[np.float32]]
