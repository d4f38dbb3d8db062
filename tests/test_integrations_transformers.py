"""Hugging Face `transformers.Trainer` with `apiary.Optimizer` (apiary.integrations.transformers):
two peers as real processes, the schedule per swarm epoch, checkpoints, the task entry point."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers", reason="the transformers extra is not installed (pip install apiary[transformers])")

import torch  # noqa: E402
import transformers  # noqa: E402

import apiary  # noqa: E402
from apiary.integrations.transformers import CollaborativeTrainer, build_model, task  # noqa: E402
from apiary.tasks import charlm  # noqa: E402
from apiary.tasks import load_task  # noqa: E402

pytestmark = pytest.mark.timeout(300)

CONFIG = {"model_type": "gpt2", "vocab_size": 256, "n_positions": 32, "n_embd": 32, "n_layer": 1, "n_head": 2,
          "bos_token_id": 0, "eos_token_id": 0}
QUICK_ROUNDS = {"gather_seconds": 0.5, "join_seconds": 1.5, "sender_timeout": 5.0}


def _dataset(seed: int, count: int = 2000) -> list[dict[str, torch.Tensor]]:
    windows = charlm._windows(charlm.corpus(), 31, 1, seed)
    return [{"input_ids": w[0], "labels": w[0]} for w in itertools.islice(windows, count)]


def _held_out_loss(model: torch.nn.Module) -> float:
    data = charlm.corpus()
    batch = next(charlm._windows(data[int(len(data) * 0.95):], 31, 64, seed=7))
    model.eval()
    with torch.no_grad():
        loss = float(model(input_ids=batch, labels=batch).loss)
    model.train()
    return loss


def _args(out: Path, **options: Any) -> transformers.TrainingArguments:
    settings = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2, "max_steps": 40,
                "lr_scheduler_type": "constant", "logging_steps": 4, "save_strategy": "no", "report_to": "none",
                "disable_tqdm": True, "use_cpu": True, "seed": 0, **options}
    return transformers.TrainingArguments(str(out), **settings)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(CONFIG)


def _halving(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5**epoch)


# ---- one peer's worker process (this file run as a script)


def _peer(options: dict[str, Any]) -> None:
    """Trains with CollaborativeTrainer until the swarm's epoch `epochs`; writes what it saw as JSON."""
    torch.set_num_threads(1)
    out = Path(options["out"])
    model = _model()
    loss_start = _held_out_loss(model)
    opt = apiary.Optimizer(options["run_id"], model.parameters(), lambda p: torch.optim.AdamW(p, 3e-3),
                           target_batch_size=64, initial_peers=options["initial_peers"], averaging=QUICK_ROUNDS,
                           average_state_every=1)
    try:
        (out / "address").write_text(opt.swarm.dht_address or "")
        deadline = time.monotonic() + 120
        while opt.peers < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        trainer = CollaborativeTrainer(model=model, args=_args(out, max_steps=400), train_dataset=_dataset(options["seed"]),
                                       swarm_optimizer=opt, max_swarm_epochs=options["epochs"])
        trainer.train()
        result = {"epoch": opt.epoch, "loss_start": loss_start, "loss_end": _held_out_loss(model),
                  "rounds": dict(opt.rounds), "logs": trainer.state.log_history,
                  "parameters": [p.detach().flatten()[:8].tolist() for p in model.parameters()]}
    finally:
        opt.close()
    (out / "result.json").write_text(json.dumps(result))


def _start_peer(tmp_path: Path, index: int, initial_peers: list[str]) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / str(index)
    out.mkdir()
    options = {"out": str(out), "run_id": "hf-two", "seed": index, "epochs": 5, "initial_peers": initial_peers}
    process = subprocess.Popen([sys.executable, __file__, json.dumps(options)], stdout=subprocess.DEVNULL,
                               stderr=open(out / "stderr", "wb"), env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return process, out


def test_two_trainer_processes_reach_the_same_swarm_epoch_and_their_loss_falls(tmp_path):
    processes = []
    try:
        first, first_out = _start_peer(tmp_path, 0, [])
        processes.append(first)
        deadline = time.monotonic() + 120
        while not (first_out / "address").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (first_out / "address").exists(), (first_out / "stderr").read_text()[-3000:]
        second, second_out = _start_peer(tmp_path, 1, [(first_out / "address").read_text()])
        processes.append(second)
        for process, out in ((first, first_out), (second, second_out)):
            assert process.wait(240) == 0, (out / "stderr").read_text()[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    results = [json.loads((out / "result.json").read_text()) for out in (first_out, second_out)]
    assert [r["epoch"] for r in results] == [5, 5], results
    for r in results:
        assert r["rounds"]["ok"] >= 4, r["rounds"]  # the epochs' rounds found the other peer
        assert r["loss_end"] < r["loss_start"] - 0.3, (r["loss_start"], r["loss_end"])
        logged = [entry for entry in r["logs"] if "swarm_epoch" in entry and "loss" in entry]
        assert logged and max(entry["swarm_peers"] for entry in logged) == 2, logged
        assert all(entry["swarm_samples_per_second"] > 0 for entry in logged), logged
    torch.testing.assert_close(torch.tensor(results[0]["parameters"][0]), torch.tensor(results[1]["parameters"][0]),
                               rtol=0, atol=1e-5)


# ---- one peer in this process


def test_the_learning_rate_follows_the_swarm_epoch_not_trainers_steps(tmp_path):
    model = _model()
    with apiary.Optimizer("hf-schedule", model.parameters(), lambda p: torch.optim.SGD(p, lr=0.1),
                          target_batch_size=64) as opt:
        trainer = CollaborativeTrainer(model=model, args=_args(tmp_path, max_steps=16), train_dataset=_dataset(0),
                                       swarm_optimizer=opt, schedule=_halving)
        trainer.train()
        # 16 samples a step (8 x 2 accumulated), 64 an epoch: 4 epochs in 16 steps, the rate halved each
        assert opt.epoch == 4
        logged = [entry for entry in trainer.state.log_history if "learning_rate" in entry]
        assert [entry["learning_rate"] for entry in logged] == pytest.approx([0.1 * 0.5**e for e in (1, 2, 3, 4)])
        assert [entry["swarm_epoch"] for entry in logged] == [1, 2, 3, 4]
        # a jump of the epoch (catching up with the swarm, a checkpoint) moves the schedule with it
        state = trainer.optimizer.state_dict()
        state["apiary"]["epoch"] = 9
        state["apiary"]["metadata"]["epoch"] = 9
        trainer.optimizer.load_state_dict(state)
        assert opt.epoch == 9 and opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**9)


def test_a_checkpoint_keeps_the_swarm_epoch_and_resuming_puts_the_optimizer_back_at_it(tmp_path):
    """Also runs in bf16 autocast, the mixed precision the integration supports."""
    model = _model()
    with apiary.Optimizer("hf-save", model.parameters(), lambda p: torch.optim.AdamW(p, 3e-3),
                          target_batch_size=64) as opt:
        trainer = CollaborativeTrainer(model=model, args=_args(tmp_path, max_steps=12, save_strategy="steps",
                                                               save_steps=12, bf16=True),
                                       train_dataset=_dataset(0), swarm_optimizer=opt, schedule=_halving)
        trainer.train()
        assert opt.epoch == 3
        trained = [p.detach().clone() for p in model.parameters()]
    checkpoint = tmp_path / "checkpoint-12"
    assert (checkpoint / "optimizer.pt").is_file()

    model = _model()  # a new process would start here: fresh weights, a new optimizer at epoch 0
    with apiary.Optimizer("hf-resume", model.parameters(), lambda p: torch.optim.AdamW(p, 3e-3),
                          target_batch_size=64) as opt:
        trainer = CollaborativeTrainer(model=model, args=_args(tmp_path, max_steps=12), train_dataset=_dataset(0),
                                       swarm_optimizer=opt, schedule=_halving)
        trainer.train(resume_from_checkpoint=str(checkpoint))  # its 12 steps are done: it only loads
        assert opt.epoch == 3 and opt.optimizer.param_groups[0]["lr"] == pytest.approx(3e-3 * 0.5**3)
        for mine, theirs in zip(model.parameters(), trained):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
        trainer.args.max_steps = 16
        trainer.train(resume_from_checkpoint=str(checkpoint))  # four more steps: one more epoch
        assert opt.epoch == 4


@pytest.mark.parametrize("options", [{"mode": "diloco"}, {"delay_updates": True},
                                     {"offload_optimizer": True}], ids=str)
def test_the_optimizers_modes_and_memory_options_train_through_trainer(tmp_path, options):
    model = _model()
    with apiary.Optimizer("hf-modes", model.parameters(), lambda p: torch.optim.AdamW(p, 3e-3),
                          target_batch_size=32, **options) as opt:
        trainer = CollaborativeTrainer(model=model, args=_args(tmp_path, max_steps=16, gradient_accumulation_steps=1,
                                                               logging_steps=8),
                                       train_dataset=_dataset(0), swarm_optimizer=opt, schedule=_halving)
        trainer.train()
        assert opt.epoch == 4 and opt.optimizer.param_groups[0]["lr"] == pytest.approx(3e-3 * 0.5**4)
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        assert losses[-1] < losses[0], losses


# ---- the task entry point and the model


def test_the_integrations_package_itself_needs_no_torch():
    code = "import sys, apiary.integrations; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr


def test_apiary_trainer_runs_the_transformers_task_as_a_process(tmp_path):
    from trainer_processes import TrainerSwarm

    options = json.dumps({"config": CONFIG, "context": 32, "batch_size": 8, "eval_batches": 2, "lr": 3e-3})
    common = ["--task", "apiary.integrations.transformers:task", "--task-options", options,
              "--target-batch-size", "32", "--max-epochs", "4"]
    with TrainerSwarm(tmp_path, "hf-task", common) as swarm:
        swarm.start(seed=0)
        summary = swarm.finish(timeout=180)[0]
    assert summary["task"] == "apiary.integrations.transformers:task"
    assert summary["epoch_end"] == 4 and [h["epoch"] for h in summary["history"]] == [0, 1, 2, 3], summary
    assert summary["loss_end"] < summary["loss_start"], summary


def test_a_model_saved_locally_loads_through_from_pretrained_with_identical_weights(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "saved")
    loaded = load_task("apiary.integrations.transformers:task", pretrained=str(tmp_path / "saved"), context=32).model
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name


@pytest.mark.parametrize("settings, message", [
    ({}, "either as config"),
    ({"config": CONFIG, "pretrained": "x"}, "not both or neither"),
    ({"config": {"n_embd": 32}}, "needs a model_type"),
    ({"config": {"model_type": "no-such-model"}}, "no-such-model"),
    ({"pretrained": "/nonexistent/model"}, "not a local directory saved with save_pretrained"),
    ({"config": {**CONFIG, "vocab_size": 100}}, "needs 256"),
    ({"config": CONFIG, "context": 64}, "longer than the model's 32 positions"),
])
def test_a_task_that_cannot_be_built_says_why(settings, message):
    with pytest.raises(ValueError, match=message):
        task(**settings)


@pytest.mark.parametrize("arguments, trainer_options, message", [
    ({"lr_scheduler_type": "linear"}, {}, "lr_scheduler_type='linear' counts Trainer's local steps"),
    ({"warmup_steps": 10}, {"schedule": _halving}, "warmup_steps counts Trainer's local steps"),
    ({"fp16": True}, {}, "fp16=True needs a loss scaler"),
    ({}, {"optimizers": (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), None)},
     "do not pass optimizers"),
])
def test_settings_the_hand_off_does_not_support_are_refused(tmp_path, arguments, trainer_options, message):
    model = _model()
    with apiary.Optimizer("hf-misuse", model.parameters(), lambda p: torch.optim.SGD(p, lr=0.1),
                          target_batch_size=64) as opt:
        args = _args(tmp_path)
        for name, value in arguments.items():  # set after TrainingArguments' own checks (fp16 needs a GPU there)
            setattr(args, name, value)
        with pytest.raises(ValueError, match=message):
            CollaborativeTrainer(model=model, args=args, train_dataset=_dataset(0, 16), swarm_optimizer=opt,
                                 **trainer_options)


@pytest.mark.parametrize("options, message", [
    ({"reuse_grad_buffers": True}, "reuse_grad_buffers=True does not work with transformers.Trainer"),
    ({"scheduler": _halving}, "not to apiary.Optimizer"),
])
def test_an_optimizer_the_hand_off_cannot_drive_is_refused(tmp_path, options, message):
    model = _model()
    with apiary.Optimizer("hf-optimizer", model.parameters(), lambda p: torch.optim.SGD(p, lr=0.1),
                          target_batch_size=64, **options) as opt:
        with pytest.raises(ValueError, match=message):
            CollaborativeTrainer(model=model, args=_args(tmp_path), train_dataset=_dataset(0, 16), swarm_optimizer=opt)


if __name__ == "__main__":
    _peer(json.loads(sys.argv[1]))
