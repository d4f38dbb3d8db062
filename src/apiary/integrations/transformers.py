"""Hugging Face `transformers` models trained by a swarm: `transformers.Trainer` with `apiary.Optimizer`.

    opt = apiary.Optimizer("my-run", model.parameters(), lambda p: torch.optim.AdamW(p, 1e-3),
                           target_batch_size=4096, initial_peers=[...])
    trainer = CollaborativeTrainer(model=model, args=TrainingArguments("out", lr_scheduler_type="constant"),
                                   train_dataset=data, swarm_optimizer=opt)
    trainer.train()
    opt.close()

The hand-off: Trainer runs forward and backward passes (gradient accumulation, bf16 autocast,
clipping of the local gradient) and calls its optimizer's `step()` once per accumulated batch;
`SwarmStep`, the optimizer Trainer is given, hands the samples of that batch to
`apiary.Optimizer.step`, which updates the model when the swarm's epoch ends. Trainer's
`zero_grad` after each step is what `apiary.Optimizer` expects. The learning rate follows the
swarm's epoch, not Trainer's local steps: `schedule` builds a torch scheduler on the wrapped
optimizer, stepped to the swarm's epoch (also after catching up with the swarm or resuming).
Trainer's checkpoints hold the optimizer's state with the swarm's epoch; resuming from one that
is ahead of this peer puts the optimizer back at that epoch. `SwarmProgressCallback` adds the
swarm's epoch, peers and samples per second to Trainer's logs and stops training at a swarm epoch.

Refused with a message (`check_arguments`): fp16 (a loss scaler, which this hand-off does not
carry: use bf16 or fp32), DeepSpeed and FSDP, several processes per peer (torchrun: run one
peer per process), `model_init`, `reuse_grad_buffers` (Trainer zeroes gradients every step), a
scheduler given to `apiary.Optimizer`, and Trainer's own schedule (`lr_scheduler_type` other
than "constant" or `warmup_steps`: they count local steps).

`task` is an entry point for `apiary trainer --task apiary.integrations.transformers:task`: a
causal language model built from a config (or loaded from a local `save_pretrained` directory;
nothing is downloaded) on the charlm task's byte-level corpus.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from apiary.optim import Optimizer
from apiary.tasks import Task, charlm

Schedule = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class SwarmStep:
    """The optimizer Trainer steps: one `apiary.Optimizer.step` per accumulated batch, with the
    samples `count` was told of since the last step."""

    def __init__(self, optimizer: Optimizer, schedule: Schedule | None = None):
        if not isinstance(optimizer, Optimizer):
            raise ValueError(f"swarm_optimizer must be an apiary.Optimizer, got {type(optimizer).__name__}")
        if optimizer.reuse_grad_buffers:
            raise ValueError("reuse_grad_buffers=True does not work with transformers.Trainer, which zeroes the "
                             "gradients after every step: make the apiary.Optimizer without it")
        if optimizer.rule.scheduler is not None:
            raise ValueError("give the learning-rate schedule to CollaborativeTrainer(schedule=...), not to "
                             "apiary.Optimizer(scheduler=...): it then follows the swarm's epoch")
        self.swarm = optimizer
        self.scheduler = schedule(optimizer.optimizer) if schedule is not None else None
        self.pending = 0  # samples of the batches since the last step

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.swarm.optimizer.param_groups

    def count(self, samples: int) -> None:
        self.pending += samples

    def step(self, closure: Callable[[], Any] | None = None) -> None:
        if closure is not None:
            raise ValueError("apiary.Optimizer takes no closure")
        if self.pending < 1:
            raise RuntimeError("step() without a counted batch: use CollaborativeTrainer, which counts each batch's "
                               "samples for apiary.Optimizer")
        samples, self.pending = self.pending, 0
        self.follow_epoch()  # the update at the epoch's end uses this epoch's learning rate
        self.swarm.step(samples)
        self.follow_epoch()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.swarm.zero_grad(set_to_none)

    def follow_epoch(self) -> None:
        """Steps the schedule to the swarm's epoch (once per epoch, more after catching up)."""
        if self.scheduler is None:
            return
        with warnings.catch_warnings():  # a jump (catching up, resuming) steps it before the optimizer stepped
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            while self.scheduler.last_epoch < self.swarm.epoch:
                self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state (parameters, statistics) and its epoch, for Trainer's checkpoints."""
        metadata, tensors = self.swarm.state()
        return {"apiary": {"epoch": self.swarm.epoch, "metadata": metadata,
                           "tensors": [t.detach().to("cpu", copy=True) for t in tensors]}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Takes a checkpoint's state when it is ahead of this peer (else the peer's newer state stays)."""
        saved = state.get("apiary") if isinstance(state, Mapping) else None
        if not isinstance(saved, Mapping) or not {"epoch", "metadata", "tensors"} <= saved.keys():
            raise ValueError("this optimizer state was not saved by apiary's CollaborativeTrainer "
                             "(no 'apiary' entry with epoch, metadata and tensors)")
        if int(saved["epoch"]) > self.swarm.epoch:
            self.swarm.load_state(saved["metadata"], saved["tensors"])
        self.follow_epoch()


class EpochSchedule:
    """The scheduler Trainer steps after every local step: it only keeps the schedule at the swarm's epoch."""

    def __init__(self, hand_off: SwarmStep):
        self.hand_off = hand_off

    def step(self) -> None:
        self.hand_off.follow_epoch()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.hand_off.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.hand_off.swarm.epoch}  # informative: the optimizer's state carries the epoch

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.hand_off.follow_epoch()


class SwarmProgressCallback(TrainerCallback):
    """Adds the swarm's progress to Trainer's logs; stops training once the swarm reaches `max_epochs` (0: never)."""

    def __init__(self, optimizer: Optimizer, max_epochs: int = 0):
        self.optimizer = optimizer
        self.max_epochs = max_epochs

    def progress(self) -> dict[str, float]:
        o = self.optimizer
        others = o.view.samples_per_second if o.view is not None else 0.0
        return {"swarm_epoch": o.swarm_epoch, "swarm_local_epoch": o.epoch, "swarm_peers": o.peers,
                "swarm_samples_per_second": round(o.samples_per_second + others, 1)}

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        progress = self.progress()
        if logs is not None:
            logs.update(progress)  # for the callbacks after this one (printers, trackers)
        if state.log_history:
            state.log_history[-1].update(progress)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if self.max_epochs and self.optimizer.swarm_epoch >= self.max_epochs:
            control.should_training_stop = True


def check_arguments(args: TrainingArguments, schedule: Schedule | None) -> None:
    """Raises ValueError naming the first TrainingArguments setting this integration does not support."""
    scheduler_type = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    refusals = [
        (args.fp16, "fp16=True needs a loss scaler, which apiary's hand-off does not carry: use bf16=True or fp32"),
        (bool(args.deepspeed) or bool(args.fsdp), "DeepSpeed and FSDP are not supported: apiary.Optimizer "
                                                  "updates the whole model on each peer"),
        (args.world_size > 1, f"{args.world_size} processes train one peer (torchrun): run one apiary peer per "
                              "process (apiary trainer --gpus for several local GPUs)"),
        (schedule is None and scheduler_type != "constant",
         f"lr_scheduler_type={scheduler_type!r} counts Trainer's local steps: set lr_scheduler_type='constant' "
         "and give CollaborativeTrainer(schedule=...), which follows the swarm's epoch"),
        (args.warmup_steps > 0, "warmup_steps counts Trainer's local steps: put the warmup in "
                                "CollaborativeTrainer(schedule=...), which counts the swarm's epochs"),
    ]
    for refused, message in refusals:
        if refused:
            raise ValueError(message)


def batch_samples(inputs: Mapping[str, Any]) -> int:
    """The samples of a batch: the length of its first tensor."""
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError(f"cannot count the samples of a batch with no tensor (keys: {', '.join(inputs)})")


class CollaborativeTrainer(transformers.Trainer):
    """`transformers.Trainer` whose updates are the swarm's (see the module docstring). Takes
    Trainer's arguments and `swarm_optimizer` (an `apiary.Optimizer` of the model's parameters),
    `schedule` (a torch scheduler factory, stepped per swarm epoch) and `max_swarm_epochs`."""

    def __init__(self, *args: Any, swarm_optimizer: Optimizer, schedule: Schedule | None = None,
                 max_swarm_epochs: int = 0, **kwargs: Any):
        if kwargs.get("optimizers", (None, None)) != (None, None) or kwargs.get("optimizer_cls_and_kwargs"):
            raise ValueError("CollaborativeTrainer makes Trainer's optimizer and scheduler from swarm_optimizer: "
                             "do not pass optimizers or optimizer_cls_and_kwargs")
        if kwargs.get("model_init") is not None:
            raise ValueError("model_init is not supported: make the model, then apiary.Optimizer of its parameters")
        super().__init__(*args, **kwargs)
        check_arguments(self.args, schedule)
        self.hand_off = SwarmStep(swarm_optimizer, schedule)
        self.callback_handler.callbacks.insert(0, SwarmProgressCallback(swarm_optimizer, max_swarm_epochs))

    def create_optimizer(self, model: torch.nn.Module | None = None) -> Any:
        self.optimizer = self.hand_off
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        self.lr_scheduler = EpochSchedule(self.hand_off)
        return self.lr_scheduler

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        self.hand_off.count(batch_samples(inputs))
        return super().training_step(model, inputs, num_items_in_batch)


# ---- the task entry point


def build_model(config: Mapping[str, Any] | None = None, pretrained: str | Path | None = None) -> torch.nn.Module:
    """A causal language model: from `config` (its `model_type` and fields, new weights) or from
    `pretrained`, a local directory saved with `save_pretrained` (nothing is downloaded)."""
    if (config is None) == (pretrained is None):
        raise ValueError("give the model either as config ({'model_type': 'gpt2', ...}) or as pretrained "
                         "(a local directory saved with save_pretrained), not both or neither")
    if pretrained is not None:
        path = Path(pretrained)
        if not (path / "config.json").is_file():
            raise ValueError(f"pretrained {str(path)!r} is not a local directory saved with save_pretrained "
                             "(no config.json; models are not downloaded)")
        return transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    options = dict(config or {})
    model_type = options.pop("model_type", None)
    if not model_type:
        raise ValueError("config needs a model_type, such as 'gpt2' or 'llama'")
    try:
        settings = transformers.AutoConfig.for_model(model_type, **options)
        return transformers.AutoModelForCausalLM.from_config(settings)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"config of model_type {model_type!r}: {e}") from None


def task(seed: int = 0, model_seed: int = 0, config: Mapping[str, Any] | None = None,
         pretrained: str | None = None, batch_size: int = 8, context: int = 64, lr: float = 1e-3,
         eval_batches: int = 4) -> Task:
    """A `transformers` causal language model on the charlm corpus (bytes: the vocabulary needs 256
    tokens or more); `seed` picks this peer's windows, `model_seed` the initial weights of a config."""
    torch.manual_seed(model_seed)
    model = build_model(config, pretrained)
    vocabulary = model.get_input_embeddings().num_embeddings
    if vocabulary < charlm.VOCABULARY:
        raise ValueError(f"the model's vocabulary has {vocabulary} tokens; the byte-level corpus needs "
                         f"{charlm.VOCABULARY}")
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if positions is not None and context > positions:
        raise ValueError(f"context {context} is longer than the model's {positions} positions")
    data = charlm.corpus()
    split = int(len(data) * 0.95)
    train, held_out = data[:split], data[split:]
    evaluation = list(zip(range(eval_batches), charlm._windows(held_out, context - 1, 16, seed=12345)))

    def loss(m: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        tokens = batch.to(next(m.parameters()).device)
        return m(input_ids=tokens, labels=tokens).loss

    def evaluate(m: torch.nn.Module) -> float:
        with torch.no_grad():
            return sum(loss(m, batch).item() for _, batch in evaluation) / len(evaluation)

    return Task(model=model, batches=charlm._windows(train, context - 1, batch_size, seed), loss=loss,
                optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
                batch_size=batch_size, evaluate=evaluate)
