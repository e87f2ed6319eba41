"""The training loop: resume after SIGKILL (between steps and inside a checkpoint write, in one and
two processes, with early stopping), data-parallel under torchrun, accumulation, early stopping,
precision, torch.compile, weight-decay groups and checkpoints."""

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
from clipcap.training.checkpoints import (BEST, STATE, TENSORS, Checkpoint, latest_checkpoint, list_checkpoints,
                                         load_checkpoint, rng_state, save_checkpoint)
from clipcap.config import TrainConfig
from clipcap.errors import ClipcapError
from clipcap.training.loop import decay_groups, mean_loss, train_model
from helpers import EOS, PAD, TINY_VOCAB, tiny_clipcap

JOB = Path(__file__).resolve().parents[1] / "jobs" / "train_tiny.py"


def run_job(out: Path, *args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    command = [*(launcher or [sys.executable]), str(JOB), str(out), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def torchrun(processes: int = 2) -> list[str]:
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(port)]


def final_weights(out: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"final-rank{rank}.safetensors"))


def work_done(out: Path, rank: int = 0) -> dict:
    """What the job's process of ``rank`` executed itself (counted by hooks, not restored)."""
    return json.loads((out / f"work-rank{rank}.json").read_text())


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def assert_same_weights(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys() and len(expected) > 20  # mapper and the fine-tuned LM
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def assert_resumed_from(resumed_out: Path, uninterrupted_out: Path, step: int, rank: int = 0) -> None:
    """The resumed process ran only what the uninterrupted one ran after checkpoint ``step``."""
    full, resumed = work_done(uninterrupted_out, rank), work_done(resumed_out, rank)
    assert resumed["optimizer_steps"] == full["optimizer_steps"] - step, "optimizer steps run after resuming"
    assert resumed["micro_batches"] == full["micro_batches"] - full["micro_batches_at_step"][step - 1], \
        "micro-batches run after resuming"


def resume_and_compare(out: Path, uninterrupted_out: Path, *args: str, ranks: tuple[int, ...] = (0,),
                       launcher: list[str] | None = None) -> None:
    """Resume the killed run in ``out``: it must continue from its newest complete checkpoint, run
    only the rest, and end with the weights and history of the uninterrupted run."""
    step = checkpoint_step(latest_checkpoint(out / "checkpoints"))
    resumed = run_job(out, "--resume", *args, launcher=launcher)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{step:08d}'} (step {step} of" in resumed.stderr
    for rank in ranks:
        assert_resumed_from(out, uninterrupted_out, step, rank)
        assert_same_weights(final_weights(uninterrupted_out, rank), final_weights(out, rank))
        history = json.loads((out / f"history-rank{rank}.json").read_text())
        assert history == json.loads((uninterrupted_out / f"history-rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run_job(out)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def uninterrupted_ddp(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("uninterrupted-ddp")
    result = run_job(out, launcher=torchrun())
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


# 10 optimizer steps per epoch (19 micro-batches, accumulation 2), checkpoints every 2 steps:
# step 13 dies mid-epoch 2 (resumes from step 12, 4 micro-batches into the epoch); step 21 dies
# one step after the epoch-end checkpoint of step 20.
@pytest.mark.parametrize("kill_at", [13, 21])
def test_resume_after_sigkill_ends_with_the_uninterrupted_weights(tmp_path, uninterrupted, kill_at):
    killed = run_job(tmp_path, "--kill-at-step", str(kill_at))
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "final-rank0.safetensors").exists()
    assert checkpoint_step(latest_checkpoint(tmp_path / "checkpoints")) < kill_at
    resume_and_compare(tmp_path, uninterrupted)


def test_kill_inside_a_checkpoint_write_resumes_from_the_previous_checkpoint(tmp_path, uninterrupted):
    # dies writing the epoch-end checkpoint of step 20: its tensors file is written, the rest not
    killed = run_job(tmp_path, "--kill-in-checkpoint-write", "20")
    assert killed.returncode == -signal.SIGKILL
    folder = tmp_path / "checkpoints"
    complete = list_checkpoints(folder)
    half_written = [p for p in folder.iterdir() if p.is_dir() and p not in complete]
    assert len(half_written) == 1 and "step-00000020" in half_written[0].name
    assert (half_written[0] / TENSORS).exists() and not (half_written[0] / STATE).exists()
    assert checkpoint_step(complete[-1]) == 18  # the previous complete one
    resume_and_compare(tmp_path, uninterrupted)
    assert [p for p in folder.iterdir() if p not in list_checkpoints(folder)] == []  # the leftover is gone


def test_two_process_ddp_on_cpu_with_gloo(uninterrupted_ddp, uninterrupted):
    out, result = uninterrupted_ddp
    rank0, rank1 = final_weights(out, 0), final_weights(out, 1)
    for key in rank0:  # gradients were all-reduced: the replicas never drifted apart
        assert torch.equal(rank0[key], rank1[key]), key
    single = final_weights(uninterrupted)
    assert any(not torch.equal(rank0[k], single[k]) for k in rank0)  # each rank trained on its half
    histories = [json.loads((out / f"history-rank{r}.json").read_text()) for r in (0, 1)]
    assert histories[0] == histories[1]  # losses are averaged over both processes
    assert len(histories[0]["steps"]) == 15  # 9 micro-batches per rank and epoch, 2 per step, 3 epochs
    assert work_done(out, 0) == work_done(out, 1)  # each rank ran every step on its own share
    assert work_done(out, 0)["optimizer_steps"] == len(histories[0]["steps"])
    assert result.stderr.count("parameters: ") == 1  # only rank 0 logs
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000014", "step-00000015"]


def test_two_process_resume_restores_each_rank_s_rng(tmp_path, uninterrupted_ddp):
    # 5 steps per epoch: step 7 dies in epoch 2, after the checkpoint of step 6 (one step into it)
    killed = run_job(tmp_path, "--kill-at-step", "7", launcher=torchrun())
    assert killed.returncode != 0
    assert not any(tmp_path.glob("final-rank*"))
    assert checkpoint_step(latest_checkpoint(tmp_path / "checkpoints")) == 6
    resume_and_compare(tmp_path, uninterrupted_ddp[0], ranks=(0, 1), launcher=torchrun())


def test_early_stopping_resumed_after_the_best_epoch_restores_it(tmp_path):
    uninterrupted_out, out = tmp_path / "uninterrupted", tmp_path / "killed"
    result = run_job(uninterrupted_out, "--early-stopping")
    assert result.returncode == 0, result.stderr[-2000:]
    history = json.loads((uninterrupted_out / "history-rank0.json").read_text())
    val = [e["val_loss"] for e in history["epochs"]]
    best_epoch, last_epoch = val.index(min(val)) + 1, len(val)
    assert history["stopped_early"] and best_epoch < last_epoch - 1  # an epoch-end checkpoint after the best
    assert "restored the weights of the best epoch" in result.stderr
    # die one step into the last epoch: the newest checkpoint is the end of a worse epoch than the best
    kill_at = next(s["step"] for s in history["steps"] if s["epoch"] == last_epoch)
    killed = run_job(out, "--early-stopping", "--kill-at-step", str(kill_at))
    assert killed.returncode == -signal.SIGKILL
    newest = latest_checkpoint(out / "checkpoints")
    assert checkpoint_step(newest) == kill_at - 1 and (newest / BEST).exists()
    resume_and_compare(out, uninterrupted_out, "--early-stopping")


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


@pytest.mark.parametrize("patience", [3, 0])
def test_a_run_that_ends_after_worse_epochs_ends_with_the_best_epoch_s_weights(patience):
    """Early stopping on (patience 3) but never reached in 3 epochs whose val loss is best after the first:
    the model ends with the best epoch's weights, not the last one's. Off (patience 0): the last epoch's."""
    snapshots = []  # the weights after each epoch, as validated

    def on_epoch(trained):
        snapshots.append({k: v.clone() for k, v in trained.weights().items()})
        return {}

    model = tiny_clipcap("mlp", finetune_lm=True)
    cfg = TrainConfig(seed=0, epochs=3, batch_size=4, lr=1e-2, warmup_steps=0, early_stopping_patience=patience,
                      device="cpu")
    history = train_model(model, _pairs(16, 0), _pairs(8, 1), cfg, pad_token_id=PAD, on_epoch=on_epoch)
    val_losses = [e["val_loss"] for e in history.epochs]
    assert len(val_losses) == 3 and not history.stopped_early
    best = val_losses.index(min(val_losses))
    assert best < 2 and val_losses[2] > val_losses[best]  # the last epoch is worse than an earlier one
    assert any(not torch.equal(snapshots[best][k], snapshots[2][k]) for k in snapshots[2])
    expected, final = snapshots[best] if patience else snapshots[2], model.weights()
    assert final.keys() == expected.keys() and len(final) > 20  # the mapper and the fine-tuned LM
    for key in final:
        assert torch.equal(final[key], expected[key]), key


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32),
                                              ("auto", torch.float32)])  # auto: bf16 on CUDA only
def test_precision_sets_the_dtype_the_model_computes_in_on_cpu(precision, dtype):
    model = tiny_clipcap("transformer")
    seen = []  # (training?, layer, output dtype) of every forward of a mapper and an LM Linear layer
    for name, layer in (("mapper", model.mapper.linear), ("lm", model.lm.get_output_embeddings())):
        layer.register_forward_hook(
            lambda module, inputs, out, name=name: seen.append((model.training, name, out.dtype)))
    cfg = TrainConfig(seed=0, epochs=3, batch_size=4, lr=3e-3, warmup_steps=0, precision=precision, device="cpu")
    history = train_model(model, _pairs(8, 0), _pairs(4, 1), cfg, pad_token_id=PAD)
    assert {(training, name) for training, name, _ in seen} == {(True, "mapper"), (True, "lm"), (False, "mapper"),
                                                                 (False, "lm")}  # training and validation
    assert {d for _, _, d in seen} == {dtype}
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in history.steps)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not a bf16 model


def _owner_kind(model: torch.nn.Module, name: str) -> str:
    """'decay' or 'no-decay' for parameter ``name``, from the kind of layer that owns it."""
    from transformers.pytorch_utils import Conv1D

    path, attr = name.rsplit(".", 1)
    owner = model.get_submodule(path)
    if isinstance(owner, (torch.nn.Embedding, torch.nn.LayerNorm)) or attr.endswith("bias") or attr == "prefix_const":
        return "no-decay"
    if (isinstance(owner, (torch.nn.Linear, Conv1D)) and attr == "weight") or attr == "in_proj_weight":
        return "decay"
    raise AssertionError(f"{name}: a parameter of a {type(owner).__name__} the test does not know")


@pytest.mark.parametrize("mapper", ["mlp", "transformer"])
@pytest.mark.parametrize("finetune_lm", [False, True])
def test_weight_decay_applies_to_weight_matrices_only(mapper, finetune_lm):
    model = tiny_clipcap(mapper, finetune_lm=finetune_lm)
    decay, no_decay = decay_groups(model, 0.25)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.25, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = {"decay": [names[id(p)] for p in decay["params"]], "no-decay": [names[id(p)] for p in no_decay["params"]]}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(grouped["decay"] + grouped["no-decay"]) == sorted(trainable)  # each once, frozen ones in neither
    assert any(n.startswith("lm.") for n in trainable) == finetune_lm
    for kind, members in grouped.items():
        for name in members:
            assert _owner_kind(model, name) == kind, name
    named = set(grouped["no-decay"])  # the ones the docstring names
    assert {n for n in trainable if n.endswith(".bias")} <= named
    if mapper == "transformer":
        assert {"mapper.prefix_const", "mapper.norm.weight", "mapper.transformer.layers.0.norm1.weight"} <= named
        assert "mapper.transformer.layers.0.self_attn.in_proj_weight" in grouped["decay"]
    if finetune_lm:  # the tied LM head is the token embedding: not decayed either
        assert {"lm.transformer.wte.weight", "lm.transformer.wpe.weight", "lm.transformer.ln_f.weight"} <= named
        assert "lm.transformer.h.0.attn.c_attn.weight" in grouped["decay"]
    assert grouped["decay"] and grouped["no-decay"]


def test_half_written_checkpoint_is_ignored_and_foreign_one_refused(tmp_path):
    cfg = TrainConfig(seed=0, epochs=1, batch_size=4, lr=1e-3, warmup_steps=0, device="cpu")
    train_model(tiny_clipcap(), _pairs(8, 0), None, cfg, pad_token_id=PAD, checkpoint_dir=tmp_path, fingerprint="a")
    (tmp_path / ".step-00000099.partial").mkdir()  # what a kill during a checkpoint write leaves
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002"]
    with pytest.raises(ClipcapError, match="other parameters, data"):
        train_model(tiny_clipcap(), _pairs(8, 0), None, cfg, pad_token_id=PAD, checkpoint_dir=tmp_path,
                    resume=True, fingerprint="b")


def test_checkpoint_keeps_every_rank_s_rng_state(tmp_path):
    model = tiny_clipcap()
    optimizer = torch.optim.AdamW(model.trainable_parameters())
    states = []
    for rank in (0, 1):
        torch.manual_seed(rank)
        states.append(rng_state())
    checkpoint = Checkpoint(model.weights(), optimizer.state_dict(), states, {"step": 3})
    loaded = load_checkpoint(save_checkpoint(tmp_path, checkpoint)).rng
    assert len(loaded) == 2 and not torch.equal(loaded[0]["cpu"], loaded[1]["cpu"])
    for rank in (0, 1):
        assert loaded[rank].keys() == states[rank].keys()
        assert all(torch.equal(loaded[rank][k], states[rank][k]) for k in states[rank])


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
    from torch._dynamo.utils import counters

    pairs = _pairs(8, 0)
    losses, graphs, breaks = [], [], []
    for compile_model in (False, True):
        torch._dynamo.reset()  # nothing compiled before (by another test) is reused
        counters.clear()
        cfg = TrainConfig(seed=0, epochs=2, batch_size=4, lr=3e-3, warmup_steps=0, compile=compile_model, device="cpu")
        losses.append([s["loss"] for s in train_model(tiny_clipcap(), pairs, None, cfg, pad_token_id=PAD).steps])
        graphs.append(counters["stats"]["unique_graphs"])  # graphs dynamo captured and compiled
        breaks.append(sum(counters["graph_break"].values()))
    eager, compiled = losses
    assert graphs[0] == 0 and graphs[1] > 0  # the flag compiled the model, and only the flag did
    assert breaks[1] == 0  # one graph for the whole loss: a break (data-dependent shapes) costs speed on a GPU
    assert compiled == pytest.approx(eager, rel=1e-3)  # padding to multiples of 8 changes no loss


def test_on_epoch_adds_to_each_epoch_record_without_changing_training():
    """The learning curve's hook: called once per epoch on the trained model, its values join the
    epoch record (with the step the epoch ended at), and the weights are those of a run without it."""
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-3, warmup_steps=1, seed=3)
    seen = []

    def on_epoch(model):
        seen.append(model.training)
        return {"val_CIDEr": 0.1 * len(seen)}

    plain, hooked = tiny_clipcap("mlp", finetune_lm=True), tiny_clipcap("mlp", finetune_lm=True)
    train_model(plain, _pairs(12, 0), _pairs(4, 1), cfg, pad_token_id=PAD)
    history = train_model(hooked, _pairs(12, 0), _pairs(4, 1), cfg, pad_token_id=PAD, on_epoch=on_epoch)
    assert [e["val_CIDEr"] for e in history.epochs] == [0.1, 0.2] and len(seen) == 2
    assert [e["step"] for e in history.epochs] == [3, 6] and all("val_loss" in e for e in history.epochs)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, hooked.state_dict()[key]), key
