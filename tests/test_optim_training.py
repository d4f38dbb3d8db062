"""What collaborative training must match: large-batch training, and DiLoCo's savings."""

from __future__ import annotations

import subprocess

import pytest

from service_processes import APIARY
from trainer_processes import TrainerSwarm

FAST_ROUNDS = '{"gather_seconds": 0.3, "join_seconds": 1.0, "sender_timeout": 5.0}'

pytestmark = pytest.mark.timeout(360)  # several trainer processes on 2 cores


def test_two_peers_averaging_gradients_match_one_peer_with_the_same_global_batch(tmp_path):
    epochs = 30
    common = ["--target-batch-size", "16", "--max-epochs", str(epochs), "--average-state-every", "0",
              "--averaging", FAST_ROUNDS]
    with TrainerSwarm(tmp_path / "one", "alone", common) as swarm:
        swarm.start(seed=0)
        alone = swarm.finish()[0]
    with TrainerSwarm(tmp_path / "two", "pair", [*common, "--min-peers", "2"]) as swarm:
        swarm.start(seed=0)
        swarm.start(seed=1)
        pair = swarm.finish()
    assert alone["epoch_end"] == epochs and all(s["epoch_end"] >= epochs for s in pair.values())
    assert pair[0]["rounds"]["ok"] >= 0.8 * epochs, pair[0]["rounds"]  # the pair did average
    # both runs took `epochs` steps of 16 samples: the held-out loss agrees within 3%
    assert abs(pair[0]["loss_end"] - alone["loss_end"]) <= 0.03 * alone["loss_end"], (alone, pair)
    assert alone["loss_end"] < alone["loss_start"] - 1.0
    # the same run accumulating in .grad (one batch per epoch: the same mean gradient) and stepping
    # the optimizer from CPU copies (here on CPU already) reaches the same loss
    with TrainerSwarm(tmp_path / "reused", "reused", [*common, "--reuse-grad-buffers", "--offload-optimizer"]) as swarm:
        swarm.start(seed=0)
        reused = swarm.finish()[0]
    assert reused["epoch_end"] == epochs
    assert abs(reused["loss_end"] - alone["loss_end"]) <= 1e-3 * alone["loss_end"], (alone, reused)


def test_diloco_matches_synchronous_training_with_h_times_fewer_bytes(tmp_path):
    peers, batch, h, outer_epochs = 4, 8, 8, 5
    samples_per_round = peers * batch
    sync_common = ["--target-batch-size", str(samples_per_round), "--max-epochs", str(h * outer_epochs),
                   "--average-state-every", "0", "--averaging", FAST_ROUNDS, "--min-peers", str(peers)]
    diloco_common = ["--target-batch-size", str(samples_per_round * h), "--max-epochs", str(outer_epochs),
                     "--average-state-every", "0", "--averaging", FAST_ROUNDS, "--min-peers", str(peers),
                     "--mode", "diloco", "--outer-lr", "0.7", "--outer-momentum", "0.5"]  # a short run: less momentum
    results = {}
    for name, common in (("sync", sync_common), ("diloco", diloco_common)):
        with TrainerSwarm(tmp_path / name, name, common) as swarm:
            for seed in range(peers):
                swarm.start(seed=seed)
            results[name] = swarm.finish()
    sync, diloco = results["sync"], results["diloco"]
    sync_loss = min(s["loss_end"] for s in sync.values())
    diloco_loss = min(s["loss_end"] for s in diloco.values())
    assert diloco_loss <= 1.05 * sync_loss, (sync_loss, diloco_loss)
    sync_bytes = sum(s["averaged_bytes"] for s in sync.values())
    diloco_bytes = sum(s["averaged_bytes"] for s in diloco.values())
    sync_rounds = sum(s["rounds"]["ok"] for s in sync.values())
    diloco_rounds = sum(s["rounds"]["ok"] for s in diloco.values())
    # rounds of the same size, H times fewer of them: exactly H times fewer bytes when every round
    # is held; a round the synchronous run loses on a loaded machine costs it nothing, hence 0.9
    per_round_sync, per_round_diloco = sync_bytes / sync_rounds, diloco_bytes / diloco_rounds
    assert abs(per_round_sync - per_round_diloco) <= 0.05 * per_round_sync, (per_round_sync, per_round_diloco)
    assert sync_rounds >= 0.9 * h * diloco_rounds and sync_bytes >= 0.9 * h * diloco_bytes, (sync_bytes, diloco_bytes)


@pytest.mark.parametrize("args, expected", [
    (["--task", "no_such_package.tasks:factory"], "cannot import 'no_such_package.tasks'"),
    (["--task", "apiary.tasks:missing"], "has no callable 'missing'"),
    (["--task-options", '{"bogus": 1}'], "does not take these settings"),
    (["--mode", "fancy"], "mode must be one of gradients, local, diloco"),
    (["--target-batch-size", "0"], "--target-batch-size"),
    (["--dht-local", "127.0.0.1:1"], "give both dht_local and averager_local"),
    (["--mode", "local", "--reuse-grad-buffers"], "reuse_grad_buffers"),
])
def test_bad_tasks_and_settings_stop_the_trainer_with_one_line(args, expected):
    result = subprocess.run([*APIARY, "trainer", "--run-id", "bad", "--new-swarm", *args], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("apiary: error:") and expected in lines[0], result.stderr


def test_diloco_pseudo_gradients_travel_compressed_to_float16(tmp_path):
    common = ["--target-batch-size", "64", "--max-epochs", "3", "--average-state-every", "0", "--min-peers", "2",
              "--mode", "diloco", "--averaging", '{"gather_seconds": 0.3, "join_seconds": 1.0, "codec": "float16"}']
    with TrainerSwarm(tmp_path, "compressed", common) as swarm:
        swarm.start(seed=0)
        swarm.start(seed=1)
        summaries = swarm.finish()
        numel = sum(t.numel() for t in swarm.parameters(0))
    for summary in summaries.values():
        assert summary["rounds"]["ok"] >= 2, summary
        # per round a peer sends and receives its partner's half and the averaged half back:
        # 2 x numel values, 2 bytes each in float16 (8 bytes per value-pair in float32)
        per_round = summary["averaged_bytes"] / summary["rounds"]["ok"]
        assert 0.9 * 4 * numel <= per_round <= 1.1 * 4 * numel, (per_round, numel)


def test_a_restarted_trainer_resumes_from_its_checkpoint(tmp_path):
    common = ["--target-batch-size", "32", "--average-state-every", "0"]
    with TrainerSwarm(tmp_path, "resume", common) as swarm:
        swarm.start(seed=0, extra=["--max-epochs", "3"])
        first = swarm.finish()[0]
    with TrainerSwarm(tmp_path, "resume", common) as swarm:  # same folder: the same checkpoint
        swarm.start(seed=0, extra=["--max-epochs", "5"])
        second = swarm.finish()[0]
    assert first["epoch_end"] == 3 and second["epoch_start"] == 3 and second["epoch_end"] == 5, (first, second)
    assert second["loss_start"] == pytest.approx(first["loss_end"], abs=1e-4)
