"""The optimizer's options on one peer (embedded services, a run of its own): epochs, scheduler,
gradient scaler, delayed updates, state checks."""

from __future__ import annotations

import pytest
import torch

import apiary


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 1)


def _train(opt: apiary.Optimizer, model: torch.nn.Module, steps: int, batch: int = 8) -> list[bool]:
    generator = torch.Generator().manual_seed(1)
    advanced = []
    for _ in range(steps):
        x = torch.randn(batch, 4, generator=generator)
        ((model(x) - x.sum(1, keepdim=True)) ** 2).mean().backward()
        advanced.append(opt.step(batch))
        opt.zero_grad()
    return advanced


def test_alone_an_epoch_ends_every_target_batch_and_the_scheduler_follows_it():
    model = _model()
    with apiary.Optimizer("alone", model.parameters(), lambda p: torch.optim.SGD(p, lr=0.1), target_batch_size=32,
                          scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)) as opt:
        advanced = _train(opt, model, 12)
        assert advanced == [False, False, False, True] * 3
        assert opt.epoch == 3 and [h["samples"] for h in opt.history] == [32, 32, 32]
        assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_gradients_mode_applies_the_mean_gradient_of_the_epoch():
    model, reference = _model(), _model()
    with apiary.Optimizer("mean", model.parameters(), lambda p: torch.optim.SGD(p, lr=0.1),
                          target_batch_size=16) as opt:
        _train(opt, model, 2)
    # one SGD step on the mean loss of both batches together
    generator = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(8, 4, generator=generator) for _ in range(2)])
    ((reference(x) - x.sum(1, keepdim=True)) ** 2).mean().backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs)


def test_delayed_updates_are_applied_one_step_later():
    model = _model()
    initial = [p.detach().clone() for p in model.parameters()]
    with apiary.Optimizer("delayed", model.parameters(), lambda p: torch.optim.SGD(p, lr=0.1), target_batch_size=8,
                          delay_updates=True) as opt:
        _train(opt, model, 1)
        assert opt.epoch == 1
        _train(opt, model, 1)  # the first epoch's update lands now
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), initial))


def test_a_batch_with_overflowing_gradients_is_skipped_and_the_scale_drops():
    model = _model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    with apiary.Optimizer("scaled", model.parameters(), lambda p: torch.optim.SGD(p, lr=0.1),
                          target_batch_size=64) as opt:
        x = torch.randn(8, 4)
        scaler.scale(model(x).sum() * float("inf")).backward()
        assert opt.step(8, grad_scaler=scaler) is False
        assert opt.samples == 0 and scaler.get_scale() < 2.0**16
        scaler.scale(model(x).sum()).backward()
        opt.step(8, grad_scaler=scaler)
        assert opt.samples == 8
        assert torch.isfinite(opt.rule.accumulated[0]).all() and opt.rule.accumulated[0].abs().sum() > 0


def test_a_state_of_another_model_or_mode_is_refused_with_a_clear_error():
    model = _model()
    with apiary.Optimizer("state", model.parameters(), lambda p: torch.optim.Adam(p), target_batch_size=8) as opt:
        metadata, tensors = opt.state()
        with pytest.raises(ValueError, match="parameters do not match"):
            opt.load_state(metadata, [torch.zeros(3, 3)] + tensors[1:])
        with pytest.raises(ValueError, match="mode 'diloco'"):
            opt.load_state({**metadata, "mode": "diloco"}, tensors)
        opt.load_state({**metadata, "epoch": 7}, tensors)
        assert opt.epoch == 7


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "fancy"}, "mode must be one of"),
    ({"target_batch_size": 0}, "target_batch_size must be at least 1"),
    ({"mode": "diloco", "delay_updates": True}, "delay_updates applies to mode='gradients' only"),
    ({"dht_local": "127.0.0.1:1"}, "give both dht_local and averager_local"),
])
def test_bad_settings_are_refused(kwargs, message):
    settings = {"target_batch_size": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        apiary.Optimizer("bad", _model().parameters(), lambda p: torch.optim.SGD(p, lr=0.1), **settings)


def test_local_mode_steps_every_batch_and_ends_epochs_on_the_target():
    model = _model()
    seen = []
    with apiary.Optimizer("local", model.parameters(), lambda p: torch.optim.SGD(p, lr=0.05), target_batch_size=16,
                          mode="local") as opt:
        for _ in range(4):
            before = model.weight.detach().clone()
            advanced = _train(opt, model, 1)
            seen.append((not torch.equal(before, model.weight), advanced[0]))
        assert opt.epoch == 2
    assert seen == [(True, False), (True, True), (True, False), (True, True)]
