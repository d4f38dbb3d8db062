"""When an epoch ends, whom to follow, when to have a group formed ahead: the optimizer's decisions.

Two threads share an optimizer's numbers. The training thread publishes a `LocalProgress`
snapshot after every batch; the background loop publishes the swarm's `SwarmProgress` view after
every refresh. Both are frozen, so each thread reads the other's numbers whole, without locks,
and `EpochController` decides from them alone: no I/O, no clock of its own (callers pass `now`).

An epoch ends on the counts the peers reported (`SwarmProgress.reported`), never on an
extrapolation, and the swarm's epoch is the newest that two peers report: a peer that lies about
its counts moves neither, because `ProgressTracker` bounds what it reports (optim/progress.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from apiary.optim.progress import SwarmProgress

NEAR_END = 0.8  # past this share of the target (estimated), the swarm's counts are read every FINAL_REFRESH s
FINAL_REFRESH = 0.05  # ... times the number of progress shards (a larger swarm), up to MAX_FINAL_REFRESH
MAX_FINAL_REFRESH = 2.0


@dataclass(frozen=True)
class LocalProgress:
    """This peer's epoch, the samples it accumulated toward it, its throughput, and whether it is
    training (False while it averages: it then publishes a throughput of 0)."""

    epoch: int
    samples: int = 0
    samples_per_second: float = 0.0
    training: bool = True

    @property
    def published_speed(self) -> float:
        return self.samples_per_second if self.training else 0.0

    def counted(self, batch_size: int, seconds: float | None) -> LocalProgress:
        """After a batch of `batch_size` samples that took `seconds` (None: the first since a pause);
        the throughput is a moving average."""
        speed = self.samples_per_second
        if seconds is not None and seconds > 0:
            current = batch_size / seconds
            speed = current if speed == 0 else 0.8 * speed + 0.2 * current
        return replace(self, samples=self.samples + batch_size, samples_per_second=speed)


class Step(enum.Enum):
    CONTINUE = "continue"  # keep accumulating
    REFRESH = "refresh"  # the estimate reached the target: read the swarm's counts now, then decide again
    FINISH = "finish"  # end this epoch with a round
    CATCH_UP = "catch_up"  # the swarm moved on without us: load its state and follow it


@dataclass(frozen=True)
class Decision:
    step: Step
    epoch: int  # the swarm's epoch to follow (CATCH_UP), else this peer's


@dataclass(frozen=True)
class EpochController:
    """The rules of a run's epochs for one peer (see the module docstring)."""

    target_batch_size: int
    refresh_period: float = 0.25

    @staticmethod
    def awaited(epoch: int, swarm_epoch: int, prepared_epoch: int) -> bool:
        """The swarm has just ended `epoch`, and the group formed ahead for its round counts on us."""
        return swarm_epoch == epoch + 1 and prepared_epoch == epoch

    def after_batch(self, local: LocalProgress, view: SwarmProgress | None, prepared_epoch: int, now: float,
                    fresh: bool) -> Decision:
        """What to do after a batch. With a view read earlier (`fresh` False), an estimate that
        reaches the target asks for a refresh; with one read just now, reported counts end the epoch."""
        if view is not None and view.epoch > local.epoch:
            if self.awaited(local.epoch, view.epoch, prepared_epoch):
                return Decision(Step.FINISH, local.epoch)  # the swarm ended it a moment before we noticed
            return Decision(Step.CATCH_UP, view.epoch)
        if not fresh:
            others = view.others_now(now) if view is not None else 0.0
            reached = local.samples + others >= self.target_batch_size
            return Decision(Step.REFRESH if reached else Step.CONTINUE, local.epoch)
        reported = view.reported if view is not None else 0.0
        reached = local.samples + reported >= self.target_batch_size
        return Decision(Step.FINISH if reached else Step.CONTINUE, local.epoch)

    def assist(self, epoch: int, view: SwarmProgress | None, prepared_epoch: int) -> tuple[int, bool]:
        """An auxiliary peer's decision: (the epoch to be at, whether to join its round now)."""
        if view is None:
            return epoch, False
        if view.epoch > epoch and not self.awaited(epoch, view.epoch, prepared_epoch):
            epoch = view.epoch
        return epoch, view.reported >= self.target_batch_size or self.awaited(epoch, view.epoch, prepared_epoch)

    def seconds_until(self, share: float, local: LocalProgress, view: SwarmProgress | None,
                      now: float) -> float | None:
        """Estimated seconds until the swarm's samples reach `share` of the target (None: no estimate)."""
        if view is None:
            return None
        remaining = share * self.target_batch_size - local.samples - view.others_now(now)
        speed = max(view.samples_per_second + local.samples_per_second, local.samples_per_second * view.peers)
        if remaining <= 0:
            return 0.0
        return remaining / speed if speed > 0 else None

    def refresh_interval(self, local: LocalProgress, view: SwarmProgress | None, now: float) -> float:
        """Shorter as the epoch's end nears, so peers notice it together; never shorter than
        `final_refresh` of the swarm's size."""
        eta = self.seconds_until(NEAR_END, local, view, now)
        if eta is None or view is None:
            return self.refresh_period
        return max(final_refresh(view.shards), min(self.refresh_period, eta / 2))

    def preparation_due(self, local: LocalProgress, view: SwarmProgress | None, prepared_epoch: int,
                        matchmaking_seconds: float, now: float) -> bool:
        """This epoch's round has others to meet and is as near as the averager's matchmaking time."""
        if prepared_epoch >= local.epoch or not local.training or view is None or view.peers <= 1:
            return False
        eta = self.seconds_until(1.0, local, view, now)
        return eta is not None and eta <= matchmaking_seconds


def final_refresh(shards: int) -> float:
    """The shortest refresh period when progress is read from `shards` keys: FINAL_REFRESH for
    one key, longer for a larger swarm (each holder of a shard serves every reader of it, and of
    the many readers of a sample one sees the end about as soon), at most MAX_FINAL_REFRESH."""
    return min(MAX_FINAL_REFRESH, FINAL_REFRESH * shards)
