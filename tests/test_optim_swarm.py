"""Collaborative training with `apiary trainer` processes: epochs, client peers, failures, newcomers."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from apiary.averaging.state import load_saved_state
from apiary.faults import CRASH_EXIT_CODE
from apiary.wire import Identity
from service_processes import APIARY, ServiceProcess, ServiceProcesses
from trainer_processes import SMALL_LM, TrainerSwarm, epoch_totals

pytestmark = pytest.mark.timeout(360)  # several trainer processes on 2 cores


def test_four_peers_with_one_client_reach_epoch_three_together_with_equal_parameters(tmp_path):
    target = 2048
    common = ["--target-batch-size", str(target), "--max-epochs", "3", "--average-state-every", "1",
              "--min-peers", "4"]
    with TrainerSwarm(tmp_path, "four", common) as swarm:
        swarm.start(seed=0)
        for seed in (1, 2):
            swarm.start(seed=seed)
        swarm.start(seed=3, extra=["--client-mode"])
        summaries = swarm.finish()
        assert all(s["epoch_end"] >= 3 for s in summaries.values()), summaries
        totals = epoch_totals(summaries)
        for epoch in (0, 1, 2):
            assert 1.0 * target <= totals[epoch] <= 1.2 * target, (epoch, totals)
        client = summaries[3]
        assert client["rounds"]["ok"] >= 3, client  # the client took part in the rounds
        reference = swarm.parameters(0)
        for index in (1, 2, 3):
            for mine, theirs in zip(swarm.parameters(index), reference):
                torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)


def test_a_killed_peer_does_not_stop_the_others_and_a_late_peer_loads_the_state(tmp_path):
    common = ["--target-batch-size", "128", "--max-epochs", "16", "--average-state-every", "1",
              "--min-peers", "3"]
    with TrainerSwarm(tmp_path, "churn", common) as swarm:
        swarm.start(seed=0)
        swarm.start(seed=1)
        doomed = swarm.start(seed=2, env={"APIARY_FAULTS": "trainer.epoch=2:crash"})  # dies without a goodbye
        assert doomed.process.wait(60) == CRASH_EXIT_CODE, doomed.stderr()
        late = swarm.start(seed=3)
        summaries = swarm.finish(indices=[0, 1, 3])
        assert all(s["epoch_end"] >= 16 for s in summaries.values()), summaries
        assert summaries[3]["epoch_start"] > 0, "the late peer did not load the swarm's state"
        assert summaries[3]["rounds"]["ok"] >= 1, summaries[3]
        for s in summaries.values():
            assert s["loss_end"] < s["loss_start"] if s["epoch_start"] == 0 else True
        for mine, theirs in zip(swarm.parameters(3), swarm.parameters(0)):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
        assert late.process.returncode == 0


def test_an_auxiliary_peer_reduces_in_every_round_without_training(tmp_path):
    common = ["--target-batch-size", "256", "--max-epochs", "4", "--average-state-every", "0", "--min-peers", "3"]
    with TrainerSwarm(tmp_path, "aux", common) as swarm:
        swarm.start(seed=0)
        swarm.start(seed=1)
        swarm.start(seed=2, extra=["--auxiliary"])
        summaries = swarm.finish()
        trainers, helper = [summaries[0], summaries[1]], summaries[2]
        assert all(s["epoch_end"] >= 4 for s in summaries.values()), summaries
        assert helper["rounds"]["ok"] >= 3 and helper["averaged_bytes"] > 0, helper
        assert all(record["samples"] == 0 for record in helper["history"])
        assert all(s["rounds"]["ok"] >= 3 for s in trainers), trainers
        for mine, theirs in zip(swarm.parameters(0), swarm.parameters(1)):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)


def test_trainers_use_their_participants_dht_and_averager_services(tmp_path):
    """The deployed shape: each participant runs `apiary dht`, `apiary averager --dht-local` and
    `apiary trainer --dht-local --averager-local`."""
    with ServiceProcesses() as services:
        first_dht = services.start("dht", "--new-swarm").wait_until_up()
        participants = [first_dht, services.start("dht", "--initial-peers", first_dht.initial_peers).wait_until_up()]
        averagers = [services.start("averager", "--run-id", "deployed", "--dht-local", str(dht.local_api),
                                    "--gather-seconds", "0.5", "--join-seconds", "1.5").wait_until_up()
                     for dht in participants]
        trainers = []
        for index, (dht, averager) in enumerate(zip(participants, averagers)):
            folder = tmp_path / str(index)
            trainers.append(services.start(
                "trainer", "--run-id", "deployed", "--seed", str(index), "--dht-local", str(dht.local_api),
                "--averager-local", str(averager.local_api), "--task-options", SMALL_LM, "--threads", "1",
                "--target-batch-size", "128", "--max-epochs", "3", "--average-state-every", "1", "--min-peers", "2",
                "--summary-path", str(folder / "summary.json"), "--checkpoint-dir", str(folder)))
        for trainer in trainers:
            assert trainer.process.wait(150) == 0, trainer.stderr()
        summaries = [json.loads((tmp_path / str(i) / "summary.json").read_text()) for i in range(2)]
        assert all(s["epoch_end"] >= 3 and s["rounds"]["ok"] >= 3 for s in summaries), summaries
        states = [load_saved_state(tmp_path / str(i) / "trainer.pt") for i in range(2)]
        for mine, theirs in zip(states[0].tensors, states[1].tensors):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
        assert averagers[0].status()["last_round"]["result"] == "ok"
        # the bytes each trainer reports are those its averager's rounds sent and received: per gradient
        # round of two equal peers, half of the parameters out and its mean back, the other half in and
        # its mean out (4 bytes a value), and more in the state rounds; at most what the averager counted
        numel = sum(t.numel() for t in states[0].tensors[:len(states[0].metadata["layout"])])
        for summary, averager in zip(summaries, averagers):
            counted = sum(averager_bytes(averager).values())
            assert 8 * numel * summary["rounds"]["ok"] <= summary["averaged_bytes"] <= counted, (summary, counted, numel)
            assert summary["averaged_bytes"] >= 0.9 * counted, (summary["averaged_bytes"], counted)


def averager_bytes(averager: ServiceProcess) -> dict[str, float]:
    """The all-reduce bytes an averager process counted, from its Prometheus metrics."""
    text = averager.get("/metrics").text
    return {sample.name: sample.value for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name in ("apiary_averager_sent_bytes_total", "apiary_averager_received_bytes_total")}


def test_trainers_of_a_private_run_over_tls_train_together_and_a_stranger_is_refused(tmp_path):
    def apiary(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*APIARY, *args], capture_output=True, text=True, timeout=60)

    authority_key = tmp_path / "authority.key"
    created = apiary("token", "authority", "--authority-key", str(authority_key), "--create")
    authority = re.search(r"run authority: (\S+)", created.stdout).group(1)
    for name in ("a", "b", "stranger"):
        Identity.generate().save(tmp_path / f"{name}.key")
    for name in ("a", "b"):
        peer_id = Identity.load(tmp_path / f"{name}.key").peer_id
        issued = apiary("token", "issue", "--authority-key", str(authority_key), "--peer-id", peer_id,
                        "--expires-in", "600", "--output", str(tmp_path / f"{name}.token"))
        assert issued.returncode == 0, issued.stderr

    def private(name: str, token: str) -> list[str]:
        return ["--identity", str(tmp_path / f"{name}.key"), "--tls", "--run-authority", authority,
                "--access-token", str(tmp_path / f"{token}.token")]

    common = ["--target-batch-size", "128", "--max-epochs", "3", "--average-state-every", "1", "--min-peers", "2"]
    with TrainerSwarm(tmp_path / "run", "private", common) as swarm:
        swarm.start(seed=0, extra=private("a", "a"))
        swarm.start(seed=1, extra=private("b", "b"), wait=False)
        # another peer's token on a stranger's key: refused by the run's DHT, the trainer stops at start
        stranger = swarm.start(seed=2, extra=private("stranger", "a"), wait=False)
        summaries = swarm.finish(indices=[0, 1])
        assert all(s["epoch_end"] >= 3 and s["rounds"]["ok"] >= 3 for s in summaries.values()), summaries
        for mine, theirs in zip(swarm.parameters(0), swarm.parameters(1)):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
        assert stranger.process.wait(120) != 0
        assert "apiary: error:" in stranger.stderr(), stranger.stderr()


def test_groups_form_while_the_peers_compute_so_the_round_at_the_end_skips_matchmaking(tmp_path):
    gather = 1.0  # a round whose group forms at the epoch's end waits at least this long
    rounds = json.dumps({"gather_seconds": gather, "join_seconds": 1.5, "sender_timeout": 5.0})
    common = ["--target-batch-size", "12288", "--max-epochs", "4", "--average-state-every", "0", "--min-peers", "3",
              "--averaging", rounds]  # epochs of a few seconds: longer than forming a group
    with TrainerSwarm(tmp_path, "early", common) as swarm:
        for seed in (0, 1, 2):
            swarm.start(seed=seed)
        summaries = swarm.finish()
        for index, summary in summaries.items():
            later = [record for record in summary["history"] if record["epoch"] >= 1]  # all peers train by then
            assert len(later) >= 3, summary["history"]
            assert all(record["group_size"] == 3 for record in later), (index, later)
            early = [record for record in later if record["formed_early"]]
            assert len(early) >= len(later) - 1, (index, later)
            assert all(record["round_seconds"] < gather / 2 for record in early), (index, early)
        for index in (1, 2):  # every round had the whole swarm
            for mine, theirs in zip(swarm.parameters(index), swarm.parameters(0)):
                torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)
