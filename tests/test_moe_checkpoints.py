"""A restarted expert server resumes every expert from its checkpoint."""

from __future__ import annotations

import pytest
import torch

from apiary.moe.checkpoints import load_checkpoints, save_checkpoints
from apiary.moe.experts import Expert, ExpertSpec
from apiary.moe.training import ExpertTraining
from apiary.moe.server import ExpertServer


def make_expert(seed: int) -> Expert:
    torch.manual_seed(seed)
    return Expert(ExpertSpec("ffn.0.0", "ffn", 16), training=ExpertTraining(lr=1e-2))


def train_step(expert: Expert, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(8, 16, generator=generator)
    expert.backward([inputs], [torch.randn(8, 16, generator=generator)])


def same_parameters(a: Expert, b: Expert) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.module.state_dict().values(), b.module.state_dict().values()))


async def test_a_restarted_server_resumes_with_the_same_weights_and_optimizer_step(tmp_path) -> None:
    trained = make_expert(0)
    server = ExpertServer([trained], checkpoint_dir=tmp_path)
    await server.start()
    train_step(trained, 1)
    train_step(trained, 2)
    await server.close()  # saves

    restarted_expert = make_expert(99)  # other initial weights: everything must come from disk
    assert not same_parameters(restarted_expert, trained)
    restarted = ExpertServer([restarted_expert], checkpoint_dir=tmp_path)
    await restarted.start()
    try:
        assert same_parameters(restarted_expert, trained)
        assert restarted_expert.updates == trained.updates == 2
        # the optimizer continues exactly: one more identical step gives identical weights
        train_step(trained, 3)
        train_step(restarted_expert, 3)
        assert same_parameters(restarted_expert, trained)
    finally:
        await restarted.close()


def test_a_checkpoint_of_another_shape_is_refused_clearly(tmp_path) -> None:
    save_checkpoints({"ffn.0.0": make_expert(0)}, tmp_path)
    other = Expert(ExpertSpec("ffn.0.0", "ffn", 32))
    with pytest.raises(ValueError, match="hidden size 16, not ffn of 32"):
        load_checkpoints({"ffn.0.0": other}, tmp_path)


def test_without_a_checkpoint_the_expert_keeps_its_initial_weights(tmp_path) -> None:
    expert = make_expert(5)
    before = {k: v.clone() for k, v in expert.module.state_dict().items()}
    assert load_checkpoints({"ffn.0.0": expert}, tmp_path) == []
    assert all(torch.equal(before[k], v) for k, v in expert.module.state_dict().items())


def test_a_checkpoint_of_another_optimizer_is_refused_clearly(tmp_path) -> None:
    trained = make_expert(0)
    train_step(trained, 1)
    save_checkpoints({"ffn.0.0": trained}, tmp_path)
    with_sgd = Expert(ExpertSpec("ffn.0.0", "ffn", 16), training=ExpertTraining("sgd"))
    with pytest.raises(ValueError, match="written with the adam optimizer, not sgd"):
        load_checkpoints({"ffn.0.0": with_sgd}, tmp_path)


def test_a_frozen_expert_checkpoints_its_weights_without_optimizer_state(tmp_path) -> None:
    torch.manual_seed(0)
    frozen = Expert(ExpertSpec("ffn.0.0", "ffn", 16), training=ExpertTraining("none"))
    save_checkpoints({"ffn.0.0": frozen}, tmp_path)
    restored = Expert(ExpertSpec("ffn.0.0", "ffn", 16), training=ExpertTraining("none"))
    assert load_checkpoints({"ffn.0.0": restored}, tmp_path) == ["ffn.0.0"]
    assert same_parameters(restored, frozen)
