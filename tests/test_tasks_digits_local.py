"""digits_moe as the Compose bundle runs it: through the participant's dht service (its local
API, the trainer's APIARY_DHT_LOCAL), with the trainer's TLS setting; its passes reach the
expert server declared in that dht."""

from __future__ import annotations

import time

import pytest
import torch
from service_processes import ServiceProcesses

from apiary.tasks import load_task

pytestmark = pytest.mark.timeout(180)


def test_digits_moe_trains_with_experts_found_through_the_dht_service(monkeypatch: pytest.MonkeyPatch) -> None:
    with ServiceProcesses() as services:
        dht = services.start("dht", "--new-swarm").wait_until_up()
        assert dht.local_api is not None
        expert_server = services.start("expert-server", "--experts", "digits.[0:3].[0:4]", "--hidden-size", "32",
                                       "--dht-local", str(dht.local_api)).wait_until_up(until="experts served at: ")
        deadline = time.monotonic() + 60
        while not expert_server.get("/readyz").is_success:  # its experts are declared in the dht
            assert time.monotonic() < deadline, expert_server.get("/readyz").text
            time.sleep(0.5)
        monkeypatch.setenv("APIARY_DHT_LOCAL", str(dht.local_api))  # as the bundle's trainer has it
        monkeypatch.setenv("APIARY_TLS", "true")
        task = load_task("digits_moe", seed=0, timeout=10.0)
        optimizer = task.optimizer(task.model.parameters())
        losses = []
        for _ in range(8):
            loss = task.loss(task.model, next(task.batches))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
        assert expert_server.status()["updates"] > 0  # the backward passes trained its experts


def test_digits_moe_needs_exactly_one_way_to_the_swarm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APIARY_DHT_LOCAL", raising=False)
    with pytest.raises(ValueError, match="exactly one of dht_local"):
        load_task("digits_moe", seed=0)
