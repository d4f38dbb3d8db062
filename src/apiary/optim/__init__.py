"""The collaborative optimizer: progress through the DHT, gradient/parameter averaging, DiLoCo."""

from apiary.optim.optimizer import Optimizer
from apiary.optim.progress import PeerProgress, ProgressTracker, SwarmProgress
from apiary.optim.rules import MODES, check_mode
from apiary.optim.swarm import Swarm, SwarmLink

__all__ = [
    "MODES", "Optimizer", "PeerProgress", "ProgressTracker", "Swarm", "SwarmLink", "SwarmProgress", "check_mode",
]
