"""The optimizer's memory options without processes: gradients accumulated in `.grad`
(`reuse_grad_buffers`), the wrapped optimizer on CPU copies of the parameters
(`offload_optimizer`), state averaging with delayed updates, and the combinations refused."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from apiary.averaging.averager import STATE_ROUNDS
from apiary.optim import Optimizer
from apiary.optim.rules import GradientAveraging
from apiary.optim.state import load_run_state, run_state
from tests.test_optim_epochs import TARGET, MemorySwarm, Peers, view


def _model(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


def _loss(model: torch.nn.Module, seed: int, samples: int = 4) -> torch.Tensor:
    x = torch.randn(samples, 3, generator=torch.Generator().manual_seed(seed))
    return ((model(x) - 1) ** 2).mean()


def _adam(params: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=0.1)


def _close(a: torch.nn.Module | Sequence[torch.Tensor], b: torch.nn.Module | Sequence[torch.Tensor]) -> None:
    for x, y in zip(a.parameters() if isinstance(a, torch.nn.Module) else a,
                    b.parameters() if isinstance(b, torch.nn.Module) else b):
        torch.testing.assert_close(x, y)


def _epoch(rule: GradientAveraging, model: torch.nn.Module, epoch: int, zero: bool) -> None:
    """Two batches of 4 samples, then the epoch's end; `zero`: gradients zeroed between batches."""
    for seed in (2 * epoch + 1, 2 * epoch + 2):
        if zero:
            model.zero_grad()
        _loss(model, seed).backward()
        rule.on_batch(4)
    rule.finish_epoch(epoch, 8)


def test_reused_gradient_buffers_give_the_separate_buffers_update_for_equal_batches():
    separate, reused = _model(), _model()
    other = [torch.full_like(p, 0.5) for p in separate.parameters()]  # another peer's mean gradient, 8 samples
    plain = GradientAveraging(list(separate.parameters()), _adam(list(separate.parameters())), None,
                              Peers({0: [(other, 8)], 1: [(other, 8)]}))
    reuse = GradientAveraging(list(reused.parameters()), _adam(list(reused.parameters())), None,
                              Peers({0: [(other, 8)], 1: [(other, 8)]}), reuse_grad_buffers=True)
    assert reuse.accumulated == []  # no model-sized buffer of its own
    for epoch in (0, 1):
        _epoch(plain, separate, epoch, zero=True)
        _epoch(reuse, reused, epoch, zero=False)
        _close(reused, separate)
    assert all(p.grad is None for p in reused.parameters())  # cleared for the next epoch


def test_gradients_zeroed_between_steps_with_reused_buffers_are_detected():
    model, swarm = _model(), MemorySwarm()
    with Optimizer("reuse", model.parameters(), _adam, target_batch_size=TARGET, swarm=swarm, average_state_every=0,
                   reuse_grad_buffers=True) as opt:
        _loss(model, 1).backward()
        opt.step(4)
        _loss(model, 2).backward()
        _loss(model, 3).backward()  # two backward passes in one step
        opt.step(8)  # accumulated in .grad: fine
        with pytest.raises(RuntimeError, match="do not zero them"):
            opt.zero_grad()
        for set_to_none in (False, True):  # zeroed in place, then set to None (torch's default)
            model.zero_grad(set_to_none=set_to_none)
            _loss(model, 4).backward()
            with pytest.raises(RuntimeError, match="reset since the previous step"):
                opt.step(4)


def test_an_offloaded_optimizer_steps_cpu_copies_and_gives_the_on_device_update_and_state():
    on_device, offloaded = _model(), _model()
    masters = [p.detach().clone().requires_grad_(True) for p in offloaded.parameters()]  # the CPU copies
    plain = GradientAveraging(list(on_device.parameters()), _adam(list(on_device.parameters())), None, Peers())
    rule = GradientAveraging(list(offloaded.parameters()), _adam(masters), None, Peers(), masters=masters)
    for epoch in (0, 1):
        _epoch(plain, on_device, epoch, zero=True)
        _epoch(rule, offloaded, epoch, zero=True)
        _close(offloaded, on_device)
        _close(masters, on_device)
    (_, mine), (_, theirs) = run_state(rule, 2), run_state(plain, 2)
    _close(mine, theirs)  # parameters, then Adam's moments (kept on the CPU copies)

    newer = _model(5)
    metadata, tensors = run_state(plain, 7)
    tensors = [*newer.parameters(), *tensors[2:]]
    assert load_run_state(rule, metadata, tensors) == 7
    _close(offloaded, newer)
    _close(masters, newer)  # the optimizer's copies took the state too: its next step starts from it


def test_state_averaging_with_delayed_updates_runs_after_the_epochs_update_lands():
    swarm, model = MemorySwarm(), _model()
    with Optimizer("delayed", model.parameters(), _adam, target_batch_size=TARGET, swarm=swarm,
                   delay_updates=True, average_state_every=1) as opt:
        swarm.view = view(0, 0.0, peers=2)  # not alone: rounds are tried (and find no group here)
        opt.refresh()
        before = [p.detach().clone() for p in model.parameters()]
        _loss(model, 1).backward()
        assert opt.step(TARGET)
        assert [index for index, _ in swarm.rounds] == [0, STATE_ROUNDS + 1]
        assert not any(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # landed before the state round


@pytest.mark.parametrize("options, message", [
    ({"mode": "local", "reuse_grad_buffers": True}, "apply to mode='gradients' only"),
    ({"mode": "diloco", "offload_optimizer": True}, "apply to mode='gradients' only"),
    ({"delay_updates": True, "reuse_grad_buffers": True}, "cannot be combined with delay_updates"),
])
def test_memory_options_that_do_not_fit_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        Optimizer("refused", _model().parameters(), _adam, target_batch_size=TARGET, swarm=MemorySwarm(), **options)


def test_a_gradient_scaler_with_reused_buffers_is_refused():
    model = _model()
    with Optimizer("scaled", model.parameters(), _adam, target_batch_size=TARGET, swarm=MemorySwarm(),
                   average_state_every=0, reuse_grad_buffers=True) as opt:
        _loss(model, 1).backward()
        with pytest.raises(ValueError, match="grad_scaler cannot be combined"):
            opt.step(4, grad_scaler=torch.amp.GradScaler("cpu"))
