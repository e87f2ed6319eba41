"""The training loop: resume after SIGKILL, data-parallel under torchrun, accumulation, early
stopping, precision and checkpoints."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipcap.training.batches import CaptionPairs
from clipcap.training.checkpoints import latest_checkpoint, list_checkpoints
from clipcap.config import TrainConfig
from clipcap.errors import ClipcapError
from clipcap.training.loop import mean_loss, train_model
from helpers import EOS, PAD, TINY_VOCAB, tiny_clipcap

JOB = Path(__file__).resolve().parents[1] / "jobs" / "train_tiny.py"


def run_job(out: Path, *args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    command = [*(launcher or [sys.executable]), str(JOB), str(out), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def final_weights(out: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"final-rank{rank}.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run_job(out)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


# 10 optimizer steps per epoch (19 micro-batches, accumulation 2), checkpoints every 2 steps:
# step 13 dies mid-epoch 2 (resumes from step 12, 4 micro-batches into the epoch); step 21 dies
# one step after the epoch-end checkpoint of step 20.
@pytest.mark.parametrize("kill_at", [13, 21])
def test_resume_after_sigkill_ends_with_the_uninterrupted_weights(tmp_path, uninterrupted, kill_at):
    killed = run_job(tmp_path, "--kill-at-step", str(kill_at))
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "final-rank0.safetensors").exists()
    assert int(latest_checkpoint(tmp_path / "checkpoints").name.split("-")[1]) < kill_at

    resumed = run_job(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    expected, actual = final_weights(uninterrupted), final_weights(tmp_path)
    assert expected.keys() == actual.keys() and len(expected) > 20  # mapper and the fine-tuned LM
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    history = json.loads((tmp_path / "history-rank0.json").read_text())
    assert history == json.loads((uninterrupted / "history-rank0.json").read_text())


def test_two_process_ddp_on_cpu_with_gloo(tmp_path, uninterrupted):
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(port)]
    result = run_job(tmp_path, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = final_weights(tmp_path, 0), final_weights(tmp_path, 1)
    for key in rank0:  # gradients were all-reduced: the replicas never drifted apart
        assert torch.equal(rank0[key], rank1[key]), key
    single = final_weights(uninterrupted)
    assert any(not torch.equal(rank0[k], single[k]) for k in rank0)  # each rank trained on its half
    histories = [json.loads((tmp_path / f"history-rank{r}.json").read_text()) for r in (0, 1)]
    assert histories[0] == histories[1]  # losses are averaged over both processes
    assert len(histories[0]["steps"]) == 15  # 9 micro-batches per rank and epoch, 2 per step, 3 epochs
    assert result.stderr.count("parameters: ") == 1  # only rank 0 logs
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000014", "step-00000015"]


def _pairs(count: int, seed: int, length: int | None = None) -> CaptionPairs:
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(count, 16, generator=generator)
    captions = []
    for _ in range(count):
        n = length or int(torch.randint(2, 9, (1,), generator=generator))
        captions.append(torch.randint(2, TINY_VOCAB, (n,), generator=generator).tolist() + [EOS])
    return CaptionPairs(embeddings, list(range(count)), captions)


def test_gradient_accumulation_matches_one_large_batch():
    pairs = _pairs(4, 0, length=5)  # equal lengths: the mean of micro-batch means is the batch mean
    results = []
    for batch_size, accum in ((4, 1), (2, 2), (1, 4)):
        model = tiny_clipcap("transformer")
        cfg = TrainConfig(seed=0, epochs=1, batch_size=batch_size, grad_accum_steps=accum, lr=1e-2, warmup_steps=0,
                          device="cpu")
        history = train_model(model, pairs, None, cfg, pad_token_id=PAD)
        assert len(history.steps) == 1
        results.append((history.steps[0]["loss"], model.mapper.state_dict()))
    (loss, weights), others = results[0], results[1:]
    for other_loss, other_weights in others:
        assert other_loss == pytest.approx(loss, rel=1e-6)  # the step's loss is the mean over its micro-batches
        for key in weights:  # Adam's first step moves each weight by ~lr: 1e-4 is far below a real difference
            torch.testing.assert_close(other_weights[key], weights[key], rtol=0, atol=1e-4)


def test_early_stopping_keeps_the_best_epoch(tmp_path):
    train, val = _pairs(16, 0), _pairs(8, 1)  # unrelated random captions: memorising hurts val
    model = tiny_clipcap("mlp", finetune_lm=True)
    cfg = TrainConfig(seed=0, epochs=40, batch_size=4, lr=1e-2, warmup_steps=0, early_stopping_patience=2,
                      device="cpu")
    history = train_model(model, train, val, cfg, pad_token_id=PAD)
    val_losses = [e["val_loss"] for e in history.epochs]
    assert history.stopped_early and len(val_losses) < 40
    best = min(val_losses)
    assert val_losses.index(best) == len(val_losses) - 3  # two epochs without improvement
    from torch.utils.data import DataLoader
    from clipcap.training.batches import PadCollator

    restored = mean_loss(model, DataLoader(val, batch_size=4, collate_fn=PadCollator(PAD)), torch.device("cpu"))
    assert restored == pytest.approx(best, rel=1e-5)


def test_bf16_autocast_trains_on_cpu_when_asked():
    model = tiny_clipcap("transformer")
    cfg = TrainConfig(seed=0, epochs=3, batch_size=4, lr=3e-3, warmup_steps=0, precision="bf16", device="cpu")
    history = train_model(model, _pairs(8, 0), None, cfg, pad_token_id=PAD)
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in history.steps)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not a bf16 model


def test_half_written_checkpoint_is_ignored_and_foreign_one_refused(tmp_path):
    cfg = TrainConfig(seed=0, epochs=1, batch_size=4, lr=1e-3, warmup_steps=0, device="cpu")
    train_model(tiny_clipcap(), _pairs(8, 0), None, cfg, pad_token_id=PAD, checkpoint_dir=tmp_path, fingerprint="a")
    (tmp_path / ".step-00000099.partial").mkdir()  # what a kill during a checkpoint write leaves
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002"]
    with pytest.raises(ClipcapError, match="other parameters, data"):
        train_model(tiny_clipcap(), _pairs(8, 0), None, cfg, pad_token_id=PAD, checkpoint_dir=tmp_path,
                    resume=True, fingerprint="b")


def test_distributed_batches_split_one_order_between_ranks():
    from clipcap.training.batches import LengthGroupedBatches

    lengths = list(range(2, 23))
    one = list(LengthGroupedBatches(lengths, 2, seed=3))
    shares = [list(LengthGroupedBatches(lengths, 2, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 5  # 11 batches: equal shares, the odd one dropped
    assert shares[0] == one[0:10:2] and shares[1] == one[1:10:2]
    resumed = LengthGroupedBatches(lengths, 2, seed=3)
    resumed.set_epoch(0, skip=4)
    assert list(resumed) == one[4:]


@pytest.mark.pipeline  # compiling takes a while on 2 cores
def test_torch_compile_trains_like_eager():
    pairs = _pairs(8, 0)
    losses = []
    for compile_model in (False, True):
        cfg = TrainConfig(seed=0, epochs=2, batch_size=4, lr=3e-3, warmup_steps=0, compile=compile_model, device="cpu")
        losses.append([s["loss"] for s in train_model(tiny_clipcap(), pairs, None, cfg, pad_token_id=PAD).steps])
    eager, compiled = losses
    assert compiled == pytest.approx(eager, rel=1e-3)
