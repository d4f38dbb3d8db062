"""The flagship task `moe_lm`: its experts on two expert servers that each host a share of the
tiny grid (`apiary expert-server --task moe_lm --num-experts N`), its corpus (the whole
standard library), its cached BPE tokenizer, the size of its `base` preset and `apiary up --task moe_lm`."""

from __future__ import annotations

import logging
import re
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from service_processes import APIARY, ServiceProcess, ServiceProcesses
from test_optim_moe_task import run_up
from tokenizers import Tokenizer

from apiary.tasks import Task, TaskError, charlm, corpus, load_task, task_expert_grid
from apiary.tasks.moe_lm import build_model, expert_grid

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch's threads fight the expert servers and other tests for the 2 cores: one is faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ready(server: ServiceProcess) -> None:
    deadline = time.monotonic() + 60
    while not server.get("/readyz").is_success:  # its experts are declared in the dht
        assert time.monotonic() < deadline, server.get("/readyz").text + server.stderr()
        time.sleep(0.3)


def _train(task: Task, steps: int) -> None:
    optimizer = task.optimizer(task.model.parameters())
    for _ in range(steps):
        loss = task.loss(task.model, next(task.batches))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_moe_lm_trains_through_two_expert_servers_sharing_the_grid(one_thread: None,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    grid = expert_grid("tiny")
    with ServiceProcesses() as services:
        dht = services.start("dht", "--new-swarm").wait_until_up()
        assert dht.local_api is not None
        servers = [services.start("expert-server", "--task", "moe_lm", "--num-experts", "16", "--dht-local",
                                  str(dht.local_api), "--lr", "0.003", "--declare-period", "2") for _ in range(2)]
        for server in servers:  # each claims 16 names the other has not declared
            server.wait_until_up(until="experts served at: ")
            _ready(server)
        hosted = [{e["name"] for e in server.status()["listed"]} for server in servers]
        assert len(hosted[0]) == len(hosted[1]) == 16 and not hosted[0] & hosted[1]
        assert {name.split(".")[0] for name in hosted[0] | hosted[1]} == {"lm1", "lm3"}
        assert servers[0].status()["hidden_size"] == grid.hidden_size

        monkeypatch.setenv("APIARY_TLS", "true")
        task = load_task("moe_lm", seed=0, model_seed=3, experts="remote", dht_local=str(dht.local_api),
                         timeout=10.0)
        local = load_task("moe_lm", seed=0, model_seed=3, experts="local")
        local_parameters = dict(local.model.named_parameters())
        for name, parameter in task.model.named_parameters():  # the trunk and the gates
            assert torch.equal(parameter, local_parameters[name]), name
        assert len(local_parameters) > len(dict(task.model.named_parameters()))  # and the local experts

        assert task.evaluate is not None
        start = task.evaluate(task.model)
        _train(task, 15)
        end = task.evaluate(task.model)
        assert end < start - 1.0, (start, end)
        assert all(server.status()["updates"] > 0 for server in servers)  # both trained experts of theirs


def test_expert_server_task_option_names_what_is_wrong() -> None:
    result = subprocess.run([*APIARY, "expert-server", "--task", "moe_lm:huge", "--dht-local", "127.0.0.1:1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "'--task': task 'moe_lm:huge': unknown moe_lm preset 'huge' (presets: tiny, base)" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(TaskError, match=r"task 'charlm' describes no expert grid \(built-in tasks that do: moe_lm\)"):
        task_expert_grid("charlm")


def test_bad_task_options_are_named() -> None:
    for options, expected in (({"preset": "huge"}, "unknown moe_lm preset 'huge' (presets: tiny, base)"),
                              ({"experts": "nowhere"}, "experts must be one of remote, local, dense, got 'nowhere'"),
                              ({"experts": "local", "k_best": 17}, "k_best must be between 1 and the 16 experts")):
        with pytest.raises(TaskError, match=re.escape(expected)):
            load_task("moe_lm", **options)


def test_the_corpus_is_the_whole_standard_library() -> None:
    text = corpus.stdlib()
    root = corpus.stdlib_root()
    assert (root / "zipfile.py").exists() or (root / "zipfile" / "__init__.py").exists()
    unread = (root / "zipfile.py") if (root / "zipfile.py").exists() else (root / "zipfile" / "__init__.py")
    assert "zipfile" not in charlm.MODULES and unread.read_bytes() in text
    assert (root / "json" / "decoder.py").read_bytes() in text  # and what charlm reads
    assert len(text) > 20 * len(charlm.corpus())
    assert all(path.suffix == ".py" and "site-packages" not in path.parts for path in corpus.stdlib_files())


def test_the_bpe_tokenizer_is_trained_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    text = corpus.modules(("json/decoder", "json/encoder", "textwrap"), minimum_bytes=10_000)
    tokens = corpus.bpe(text, 512)
    cached = sorted((tmp_path / "apiary").iterdir())
    assert [path.suffix for path in cached] == [".json", ".lock", ".pt"]
    tokenizer = Tokenizer.from_file(str(cached[0]))
    cached = [path for path in cached if path.suffix != ".lock"]
    assert tokenizer.get_vocab_size() <= 512 and int(tokens.max()) < 512
    assert tokenizer.decode(tokens.tolist()) == text.decode()  # the tokens are the text
    written = [path.stat().st_mtime_ns for path in cached]
    assert torch.equal(corpus.bpe(text, 512), tokens)
    assert [path.stat().st_mtime_ns for path in cached] == written  # read back, not trained again


def test_peers_starting_together_train_the_bpe_tokenizer_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    text = corpus.modules(("json/decoder", "json/encoder", "textwrap"), minimum_bytes=10_000)
    caplog.set_level(logging.INFO, logger="apiary.tasks.corpus")
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: corpus.bpe(text, 512), range(3)))
    assert all(torch.equal(result, results[0]) for result in results)
    assert sum("training a BPE tokenizer" in r.message for r in caplog.records) == 1, caplog.text


def test_the_base_preset_has_over_50_million_parameters_with_its_experts() -> None:
    grid = expert_grid("base")
    with torch.device("meta"):
        model = build_model("base", "local")
    experts = [m for name, m in model.named_modules() if name.endswith("mixture")]
    assert len(experts) == len(grid.patterns.split(",")) == 3
    assert sum(p.numel() for p in model.parameters()) >= 50_000_000


def test_up_trains_moe_lm_with_its_expert_servers() -> None:
    match, stdout = run_up("moe_lm", 1, 15, 32, timeout=200)
    assert float(match[2]) < float(match[1]) - 1.0 and int(match[4]) >= 1, stdout[-3000:]
