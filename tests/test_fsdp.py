"""FSDP2, activation checkpointing, sharded checkpoints and the giant models (mae.train.fsdp).

The two-process runs go through torchrun on gloo with an explicit CPU device mesh; this file is
also the worker script of one of them (`torchrun tests/test_fsdp.py OUT`)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mae import MAE
from mae.checkpoints import sharded
from mae.checkpoints.files import CheckpointError, load_checkpoint
from mae.cli import main
from mae.models.image import MODEL_CONFIGS, resolve_config
from mae.models.video import VideoMAE
from mae.train import distributed, fsdp
from mae.train.optim import build_optimizer

# wide enough that the linear layers, which FSDP2 splits evenly, hold most of the bytes
CONFIG = {"img_size": 16, "patch_size": 4, "encoder_dim": 64, "encoder_layers": 2,
          "decoder_dim": 64, "decoder_layers": 1, "mask_ratio": 0.75}
STEPS, HALF, GLOBAL_BATCH, LR = 20, 10, 8, 1e-3
TINY = ["--model", "mae_vit_tiny_patch16", "--input-size", "16", "--patch-size", "4",
        "--batch-size", "4", "--dataset-size", "16", "--num-workers", "0", "--log-every", "2",
        "--blr", "1e-3", "--warmup-epochs", "1", "--quiet", "--device", "cpu"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def expected_parameters(config: dict) -> int:
    """The MAE's parameter count by hand: patch projection, cls token(s), both positional
    tables, per block 2 norms + qkv + proj + fc1 + fc2, the norms, decoder embed, mask token,
    head."""
    c = resolve_config(config)
    d, dd, p = c["encoder_dim"], c["decoder_dim"], c["patch_size"]
    tokens = (c["img_size"] // p) ** 2 + c["n_cls_tokens"]
    mlp = c["encoder_mlp_dim"] or int(d * c["mlp_ratio"])

    def block(dim, hidden):
        return 4 * dim + 3 * dim * dim + 3 * dim + dim * dim + dim + 2 * dim * hidden + hidden + dim

    pixels = p * p * c["in_chans"]
    return (d * pixels + d + c["n_cls_tokens"] * d + tokens * d
            + c["encoder_layers"] * block(d, mlp) + 2 * d
            + d * dd + dd + dd + tokens * dd + c["decoder_layers"] * block(dd, 4 * dd) + 2 * dd
            + dd * pixels + pixels)


def test_giant_models_have_their_published_sizes_counted_on_the_meta_device():
    # MAE's decoder (and Pixio's, MAE's with 8 cls tokens); CrossMAE's in test_decoder_models
    for name in [n for n, c in MODEL_CONFIGS.items() if c.get("decoder", "mae") == "mae"]:
        counts = fsdp.parameter_counts(name)  # built on "meta": nothing allocated
        assert counts["total"] == expected_parameters(MODEL_CONFIGS[name]), name
    giant = fsdp.parameter_counts("mae_vit_giant_patch14")
    gigantic = fsdp.parameter_counts("mae_vit_gigantic_patch14")
    # ViT-g/14 1011M and ViT-G/14 1843M encoders (Zhai et al.), plus the 8-block decoder
    assert giant["encoder"] == 1_011_202_432 and giant["total"] == 1_037_577_676
    assert gigantic["encoder"] == 1_842_775_680 and gigantic["total"] == 1_869_281_996
    with torch.device("meta"):
        model = MAE.from_name("mae_vit_giant_patch14")
    assert model.blocks[0].mlp.fc1.out_features == 6144
    assert model.decoder_blocks[0].mlp.fc1.out_features == 2048  # the decoder keeps ratio 4
    assert model.blocks[0].mlp.fc1.weight.is_meta
    with pytest.raises(ValueError, match="encoder_mlp_dim"):
        resolve_config({"encoder_mlp_dim": 6144.5})


def test_memory_estimate_counts_what_a_training_step_holds():
    """Its parts against the tensors real steps hold: weights, gradients and AdamW moments of
    one process; the buckets DDP reports; the unsharded gradients FSDP2 keeps between
    micro-batches of --accum-iter > 1 (+3.9 GiB per GPU for ViT-g). The two blocks FSDP
    gathers in flight are not counted here."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    def step(model, sync=True):
        imgs, noise = batch(0, getattr(model, "module", model))
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(sync)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(imgs, noise=noise).loss.backward()

    model, optimizer = fresh()
    step(model)
    optimizer.step()
    one = fsdp.memory_estimate(CONFIG, batch_per_gpu=0)
    assert one["weights"] == local_bytes(model.parameters())
    assert one["gradients"] == local_bytes(p.grad for p in model.parameters() if p.grad is not None)
    assert one["optimizer"] == local_bytes(v for s in optimizer.state.values()
                                           for k, v in s.items() if k != "step")
    assert one["buckets"] == one["gathered"] == one["unsharded_gradients"] == 0
    assert one["states"] == one["weights"] + one["gradients"] + one["optimizer"]
    fsdp.ensure_process_group(torch.device("cpu"))
    try:
        ddp = DistributedDataParallel(fresh()[0])
        step(ddp)
        buckets = ddp._get_ddp_logging_data()["bucket_sizes"]
        assert fsdp.memory_estimate(CONFIG, world_size=8, batch_per_gpu=0)["buckets"] == \
            sum(map(int, buckets.split(",")))
        sharded_model, _ = fresh()
        fsdp.shard_model(sharded_model, torch.device("cpu"), "bf16", compile_blocks=False)
        step(sharded_model, sync=False)  # a micro-batch before the accumulation boundary
        params = [p for m in sharded_model.modules() if isinstance(m, FSDPModule)
                  for group in [m._get_fsdp_state()._fsdp_param_group] if group is not None
                  for p in group.fsdp_params]
        kept = sum(p.unsharded_accumulated_grad.nbytes for p in params)
        assert fsdp.memory_estimate(CONFIG, fsdp=True, accum_iter=2, batch_per_gpu=0)[
            "unsharded_gradients"] == kept > 0
    finally:
        dist.destroy_process_group()
    giant = [fsdp.memory_estimate("mae_vit_giant_patch14", 8, True, True, 64, accum_iter=k)
             for k in (1, 2)]
    assert 3.6 < (giant[1]["total"] - giant[0]["total"]) / 2**30 < 3.9
    counts = fsdp.parameter_counts("mae_vit_base_patch16")
    trainable = counts["trainable"]
    config = counts["config"]
    full = fsdp.activation_bytes_per_image(config)
    ckpt = fsdp.activation_bytes_per_image(config, grad_checkpointing=True)
    # 196 patches: 12 encoder blocks of 49 + 1 tokens, 8 decoder blocks of 197, bf16, and
    # 9 * dim + 2 * mlp elements per token and block (with checkpointing: dim, plus one
    # decoder block's worth, the largest, recomputed)
    assert full == 2 * (12 * 50 * (9 * 768 + 2 * 3072) + 8 * 197 * (9 * 512 + 2 * 2048))
    assert ckpt == 2 * (12 * 50 * 768 + 8 * 197 * 512 + 197 * (9 * 512 + 2 * 2048))
    assert "mae_vit_gigantic_patch14 | 1869M" in fsdp.memory_table()
    # per step and GPU of 8: DDP's ring all-reduce of fp32 gradients, FSDP2's two bf16
    # all-gathers of every parameter and the fp32 reduce-scatter
    assert fsdp.communication_bytes("mae_vit_base_patch16", 8) == int(2 * 7 / 8 * 4 * trainable)
    assert fsdp.communication_bytes("mae_vit_base_patch16", 8, fsdp=True) == \
        int(7 / 8 * (2 * 2 * counts["total"] + 4 * trainable))


@pytest.mark.parametrize("video", [False, True])
def test_activation_checkpointing_gives_the_same_gradients_bitwise(video, monkeypatch):
    import mae.models.image

    config = {"img_size": 16, "patch_size": 4, "encoder_dim": 32, "encoder_layers": 2,
              "decoder_dim": 32, "decoder_layers": 2}
    if video:
        model = VideoMAE({**config, "num_frames": 4, "tubelet_size": 2}).double()
        x = torch.randn(3, 3, 4, 16, 16, dtype=torch.float64)
    else:
        model = MAE(config).double()
        x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    noise = model.draw_noise(3, torch.Generator().manual_seed(1))

    def gradients():
        model.zero_grad(set_to_none=True)
        model(x, noise=noise).loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    calls = []
    real = mae.models.image.checkpoint
    monkeypatch.setattr(mae.models.image, "checkpoint",
                        lambda *a, **kw: calls.append(kw["use_reentrant"]) or real(*a, **kw))
    assert fsdp.set_grad_checkpointing(model) == 4
    checkpointed = gradients()
    assert calls == [False] * 4  # every block, non-reentrant
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for key in plain:
        assert torch.equal(plain[key], checkpointed[key]), key
    with torch.no_grad():  # nothing to recompute without a backward pass
        model(x, noise=noise)
    assert len(calls) == 4


def test_fsdp_bf16_policy_computes_in_bf16_and_keeps_fp32_masters():
    """One process: a group of one, every block its own FSDP2 unit; under --amp bf16 the
    blocks run on bf16 weights while the sharded masters and their gradients stay fp32."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    model, _ = fresh()
    try:
        fsdp.shard_model(model, torch.device("cpu"), "bf16", compile_blocks=False)
        seen = []
        model.blocks[0].mlp.fc1.register_forward_hook(
            lambda module, args, out: seen.append((module.weight.dtype, out.dtype)))
        imgs, noise = batch(0, model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(imgs, noise=noise).loss.backward()
        assert dist.get_world_size() == 1
        assert all(isinstance(m, FSDPModule) for m in [model, *model.blocks,
                                                       *model.decoder_blocks])
        assert seen == [(torch.bfloat16, torch.bfloat16)]
        weight = model.blocks[0].mlp.fc1.weight
        assert weight.dtype == weight.grad.dtype == torch.float32
    finally:
        dist.destroy_process_group()


def test_bad_combinations_are_one_error_line(tmp_path, capsys):
    code = main(["pretrain", *TINY, "--fsdp", "--amp", "fp16", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: --fsdp takes --amp bf16 or none")
    assert len(err.splitlines()) == 1 and not any(tmp_path.iterdir())
    code = main(["pretrain", *TINY, "--fsdp", "--online-probe", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err == ("error: --online-probe does not run under --fsdp: its "
                                 "evaluation calls the encoder on rank 0 alone, which a "
                                 "sharded model cannot do")


def batch(step: int, model):
    generator = torch.Generator().manual_seed(1000 + step)
    imgs = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=generator)
    return imgs, model.draw_noise(GLOBAL_BATCH, generator)


def train(model, optimizer, steps, rank=0, world_size=1):
    """AdamW steps on a fixed global batch per step, this rank's share of it; the mean loss
    over the ranks of each step."""
    import torch.distributed as dist

    share = GLOBAL_BATCH // world_size
    losses = []
    for step in steps:
        imgs, noise = batch(step, model)
        part = slice(rank * share, (rank + 1) * share)
        loss = model(imgs[part], noise=noise[part]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        if world_size > 1:
            dist.all_reduce(loss)
            loss /= world_size
        losses.append(float(loss))
    return losses


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def state_bytes(model, optimizer) -> int:
    moments = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]
    return local_bytes(model.parameters()) + local_bytes(moments)


def fresh():
    torch.manual_seed(0)
    model = MAE(CONFIG)
    return model, build_optimizer(model, LR, 0.05)


def worker(out: Path) -> None:
    """Each torchrun rank: FSDP2 over a 2-rank CPU mesh from the same initial weights, 20
    steps; then the 1-process run's sharded checkpoint of step 10 loaded (1 -> 2), steps 10-19
    again, and a sharded save (for 2 -> 1)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    assert init_device_mesh("cpu", (world_size,)).device_type == "cpu"
    model, _ = fresh()
    fsdp.shard_model(model, torch.device("cpu"), "none", compile_blocks=False)
    optimizer = build_optimizer(model, LR, 0.05)
    losses = train(model, optimizer, range(STEPS), rank, world_size)
    nbytes = state_bytes(model, optimizer)
    sharded.load_sharded(model, optimizer, out / "one-process-step-10")
    resumed = train(model, optimizer, range(HALF, STEPS), rank, world_size)
    sharded.save_sharded(model, optimizer, {"epoch": 0, "step": STEPS}, out / "two-processes")
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    if rank == 0:
        torch.save(full, out / "two-processes-full.pt")
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"losses": losses, "resumed": resumed, "bytes": nbytes,
         "sharded": type(model.blocks[0].attn.qkv.weight).__name__}))
    del model, optimizer, full  # for shutdown to free the group with them (see there)
    distributed.shutdown(synchronize=True)


@pytest.mark.slow
def test_fsdp_on_two_processes_matches_one_process_and_reshards_checkpoints(tmp_path):
    model, optimizer = fresh()
    first = train(model, optimizer, range(HALF))
    sharded.save_sharded(model, optimizer, {"epoch": 0, "step": HALF},
                         tmp_path / "one-process-step-10")
    second = train(model, optimizer, range(HALF, STEPS))
    one_process = first + second
    nbytes = state_bytes(model, optimizer)

    # a script's folder, not the checkout, heads its sys.path
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([*TORCHRUN, __file__, str(tmp_path)], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-10000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["sharded"] == "DTensor"
    torch.testing.assert_close(ranks[0]["losses"], one_process, rtol=1e-4, atol=1e-6)
    assert ranks[0]["losses"] == ranks[1]["losses"]
    for r in ranks:  # each rank holds about half the weights and AdamW moments
        assert 0.45 < r["bytes"] / nbytes < 0.55, (r["bytes"], nbytes)
    # 1 -> 2: the 1-process checkpoint of step 10 continues on two processes as it did on one
    torch.testing.assert_close(ranks[0]["resumed"], second, rtol=1e-4, atol=1e-6)

    # 2 -> 1: the two ranks' shards load into one plain model (DCP reshards), and continue
    two = tmp_path / "two-processes"
    assert sorted(p.name for p in two.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    reloaded, reloaded_optimizer = fresh()
    assert sharded.load_sharded(reloaded, reloaded_optimizer, two)["step"] == STEPS
    ended = torch.load(tmp_path / "two-processes-full.pt", weights_only=True)
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, ended[key]), key  # exactly what the two ranks held
        # and close to the 1-process run: AdamW moves a weight whose gradient is float noise
        # by up to lr per step, so the bound is a tenth of one step's update
        torch.testing.assert_close(value, model.state_dict()[key], rtol=1e-4, atol=LR / 10)
    assert reloaded_optimizer.state_dict()["state"].keys() == \
        optimizer.state_dict()["state"].keys()
    consolidated = load_checkpoint(two)
    for key, value in reloaded.state_dict().items():
        assert torch.equal(consolidated["model"][key], value), key


def test_a_sharded_save_killed_mid_way_leaves_the_previous_one(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    model, optimizer = fresh()
    path = sharded.save_sharded(model, optimizer, {"epoch": 0, "step": 4}, tmp_path / "ckpt")
    real_save = dcp.save

    def killed(state, checkpoint_id, **kwargs):
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"half a shard")
        raise KeyboardInterrupt

    monkeypatch.setattr(dcp, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        sharded.save_sharded(model, optimizer, {"epoch": 1, "step": 8}, path)
    assert sharded.read_extras(path)["step"] == 4
    assert torch.equal(load_checkpoint(path)["model"]["cls_token"], model.cls_token.detach())
    monkeypatch.setattr(dcp, "save", real_save)
    sharded.save_sharded(model, optimizer, {"epoch": 1, "step": 8}, path)  # clears the partial
    assert sharded.read_extras(path)["step"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_sharded_checkpoint_metadata_that_would_run_code_is_refused(tmp_path):
    import pickle

    model, optimizer = fresh()
    path = sharded.save_sharded(model, optimizer, {"epoch": 0, "step": 0}, tmp_path / "ckpt")
    assert sharded.read_extras(path)["step"] == 0
    assert not (tmp_path / ".ckpt.partial").exists()

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo ran > " + str(tmp_path / "pwned"),))

    (path / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="is not DCP metadata"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_fsdp_accumulation_reduce_scatters_at_the_boundary_only(tmp_path, monkeypatch):
    """--accum-iter 2 over 4 micro-batches: under --fsdp (a group of one) the gradients are
    reduce-scattered at the 2 boundaries, once per FSDP unit, and the run matches the plain
    one's losses and weights."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    reduced, units = [], []
    real_reduce, real_shard = _fsdp_param_group.foreach_reduce, fsdp.shard_model

    def shard_model(model, *args):
        units.append(sum(isinstance(m, FSDPModule) for m in real_shard(model, *args).modules()))
        return model

    monkeypatch.setattr(_fsdp_param_group, "foreach_reduce",
                        lambda *a, **kw: reduced.append(1) or real_reduce(*a, **kw))
    monkeypatch.setattr(fsdp, "shard_model", shard_model)
    runs = {}
    for name, extra in (("plain", []), ("fsdp", ["--fsdp"])):
        out = tmp_path / name
        try:
            assert main(["pretrain", *TINY, "--accum-iter", "2", "--epochs", "1",
                         "--output-dir", str(out), *extra]) == 0
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        records = [json.loads(line) for line in open(out / "log.jsonl")]
        runs[name] = ([r["loss"] for r in records if r.get("kind") == "step"],
                      load_checkpoint(out / ("checkpoint-0" + ".pth" * (not extra)))["model"])
    assert units[0] > 3 and len(reduced) == 2 * units[0]
    torch.testing.assert_close(runs["fsdp"][0], runs["plain"][0], rtol=1e-5, atol=1e-6)
    assert runs["fsdp"][1].keys() == runs["plain"][1].keys()
    for key, value in runs["plain"][1].items():
        torch.testing.assert_close(runs["fsdp"][1][key], value, rtol=1e-4, atol=1e-6)


def test_metadata_reaching_through_a_dcp_module_to_os_is_refused(tmp_path, monkeypatch):
    """Protocol 4 resolves a dotted name: (torch.distributed.checkpoint.metadata, os.system)
    is that module's `os`'s system."""
    import pickle

    model, optimizer = fresh()
    path = sharded.save_sharded(model, optimizer, {"epoch": 0, "step": 0}, tmp_path / "ckpt")
    calls = []

    def unicode(text: str) -> bytes:  # SHORT_BINUNICODE
        return b"\x8c" + bytes([len(text)]) + text.encode()

    cwd = os.getcwd()  # what the recording getcwd answers: pytest calls it too
    for name, args in (("getcwd", b")"), ("system", unicode("echo ran") + b"\x85")):
        monkeypatch.setattr(os, name, lambda *a, name=name: calls.append(name) or cwd)
        crafted = (b"\x80\x04" + unicode("torch.distributed.checkpoint.metadata")
                   + unicode(f"os.{name}") + b"\x93" + args + b"R.")  # STACK_GLOBAL, REDUCE
        (path / ".metadata").write_bytes(crafted)
        with pytest.raises(CheckpointError, match=f"{path}: its .metadata is not DCP metadata"
                                                  f" .*os.{name}"):
            sharded.read_extras(path)
        assert calls == []
        pickle.loads(crafted)  # what a plain unpickler does with it
        assert calls == [name]
        calls.clear()


def test_a_shard_whose_bytes_entry_would_run_code_is_refused(tmp_path, monkeypatch):
    """DCP's own planner torch.loads a shard's non-tensor entries (here the optimizer's lr)
    with weights_only=False."""
    import torch.distributed as dist
    import torch.distributed.checkpoint.state_dict as dcp_state_dict

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"echo ran > {marker}",))

    real = dcp_state_dict.get_state_dict

    def tampered(model, optimizer):
        model_state, optimizer_state = real(model, optimizer)
        optimizer_state["param_groups"][0]["lr"] = Payload()
        return model_state, optimizer_state

    model, optimizer = fresh()
    monkeypatch.setattr(dcp_state_dict, "get_state_dict", tampered)
    path = sharded.save_sharded(model, optimizer, {"epoch": 0, "step": 0}, tmp_path / "ckpt")
    monkeypatch.setattr(dcp_state_dict, "get_state_dict", real)
    for group in (False, True):  # DCP without a process group, and as --fsdp has one
        if group:
            fsdp.ensure_process_group(torch.device("cpu"))
        try:
            with pytest.raises(CheckpointError) as caught:
                sharded.load_sharded(*fresh(), path)
        finally:
            if group:
                dist.destroy_process_group()
        message = str(caught.value)
        assert message.startswith(f"--resume {path}: a shard's entry optimizer.param_groups"
                                  f".0.lr holds more than tensors and plain values")
        assert "system" in message and message.endswith("--unsafe-trust-checkpoint.")
        assert "\n" not in message and not marker.exists()
    sharded.load_sharded(*fresh(), path, trust=True)  # --unsafe-trust-checkpoint: DCP's planner
    assert marker.exists()


def test_a_save_killed_between_its_renames_keeps_the_previous_checkpoint(tmp_path,
                                                                         monkeypatch):
    import torch.distributed.checkpoint as dcp

    from mae.checkpoints.files import checkpoints_newest_first

    model, optimizer = fresh()
    last = sharded.save_sharded(model, optimizer, {"epoch": 0, "step": 4},
                                tmp_path / "checkpoint-last")
    real_replace, real_save = os.replace, dcp.save

    def killed_after_stepping_aside(source, target):
        real_replace(source, target)
        if Path(target).name == ".checkpoint-last.old":
            raise KeyboardInterrupt

    def crash_between_the_renames():
        monkeypatch.setattr(os, "replace", killed_after_stepping_aside)
        with pytest.raises(KeyboardInterrupt):
            sharded.save_sharded(model, optimizer, {"epoch": 1, "step": 8}, last)
        monkeypatch.setattr(os, "replace", real_replace)
        assert not last.exists() and (tmp_path / ".checkpoint-last.old").is_dir()

    crash_between_the_renames()
    assert checkpoints_newest_first(tmp_path) == [last]  # --resume auto finds it
    assert sharded.read_extras(last)["step"] == 4
    crash_between_the_renames()
    monkeypatch.setattr(dcp, "save", lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # killed again while writing: it is back in place
        sharded.save_sharded(model, optimizer, {"epoch": 1, "step": 8}, last)
    assert sharded.read_extras(last)["step"] == 4
    monkeypatch.setattr(dcp, "save", real_save)
    sharded.save_sharded(model, optimizer, {"epoch": 1, "step": 8}, last)
    assert sharded.read_extras(last)["step"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-last"]


@pytest.mark.slow
def test_torchrun_fsdp_pretrain_resumes_elsewhere_and_exports(tmp_path, capsys):
    """`torchrun -m mae.cli pretrain --fsdp --grad-checkpointing` on two CPU processes writes
    sharded checkpoints; one process resumes them with --fsdp (a group of one) and without;
    `mae export` consolidates one that `mae visualize` reads."""
    import numpy as np
    from PIL import Image

    from mae.checkpoints.pretrained import model_from_checkpoint

    out = tmp_path / "run"
    cmd = [*TORCHRUN, "-m", "mae.cli", "pretrain", *TINY, "--fsdp", "--grad-checkpointing",
           "--epochs", "2", "--output-dir", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("checkpoint-0", "checkpoint-1", "checkpoint-last"):
        assert sorted(p.name for p in (out / name).iterdir()) == [
            ".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pth"], name
    assert not list(out.glob("*.pth")) and not list(out.glob(".*"))
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["epoch"] for r in records if r.get("kind") == "epoch"] == [0, 1]

    # 2 -> 1 with --fsdp: --resume auto finds checkpoint-last/ and trains epoch 2
    assert main(["pretrain", *TINY, "--fsdp", "--epochs", "3", "--resume", "auto",
                 "--output-dir", str(out)]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert sharded.read_extras(out / "checkpoint-2")["step"] == 12  # 4 steps per epoch on one
    # and without --fsdp: the plain model continues the sharded run, saving .pth files
    plain = tmp_path / "plain"
    assert main(["pretrain", *TINY, "--epochs", "3", "--resume", str(out / "checkpoint-1"),
                 "--output-dir", str(plain)]) == 0
    assert load_checkpoint(plain / "checkpoint-2.pth")["step"] == 12

    direct, _ = model_from_checkpoint(out / "checkpoint-1")  # the directory itself
    exported = tmp_path / "consolidated.safetensors"  # the two ranks' checkpoint
    assert main(["export", "--checkpoint", str(out / "checkpoint-1"), "-o",
                 str(exported)]) == 0
    model, saved = model_from_checkpoint(exported)  # strict: every weight, no other
    consolidated = load_checkpoint(out / "checkpoint-1")
    for key, value in model.state_dict().items():
        assert torch.equal(value, consolidated["model"][key]), key
        assert torch.equal(value, direct.state_dict()[key]), key
    assert saved["fsdp"] and saved["grad_checkpointing"]
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((20, 20, 3), 100, np.uint8)).save(photo)
    assert main(["visualize", "--checkpoint", str(exported), "--image", str(photo), "-o",
                 str(tmp_path / "vis.png")]) == 0
    assert (tmp_path / "vis.png").exists()


def test_the_root_hooks_its_backward_and_the_sincos_tables_stay_fp32(monkeypatch):
    """FSDP2's root hooks its pre-backward (the backward's first prefetch) on the tensors the
    model returns, which it finds only in containers it knows (`Output`: a dataclass and a
    pytree node); under --amp bf16 the frozen sin-cos tables stay fp32, as DDP's autocast
    leaves them, where the policy would round them to bf16."""
    import torch.distributed as dist
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    hooked, real = [], FSDPState._pre_backward
    monkeypatch.setattr(FSDPState, "_pre_backward",
                        lambda self, grad: hooked.append(self) or real(self, grad))
    model, _ = fresh()
    tables = {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}
    assert sorted(tables) == ["decoder_pos_embed", "pos_embed"]
    try:
        fsdp.shard_model(model, torch.device("cpu"), "bf16", compile_blocks=False)
        seen = []
        model.blocks[0].register_forward_pre_hook(
            lambda *_: seen.append({k: getattr(model, k).detach().clone() for k in tables}))
        imgs, noise = batch(0, model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(imgs, noise=noise).loss.backward()
        assert model._get_fsdp_state() in hooked  # the root's, not only the blocks'
        assert len(set(map(id, hooked))) == 1 + len(model.blocks) + len(model.decoder_blocks)
        for key, table in seen[0].items():
            assert table.dtype == torch.float32 and torch.equal(table, tables[key]), key
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
