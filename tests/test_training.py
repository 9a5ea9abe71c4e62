"""Training on real photos with tiny models: the loss falls, resuming is exact, the export restores, gradients go
where the freezing choice says, bad input is named, and `accelerate launch` runs two CPU processes."""

import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from support import export_iresnet, farl_state_dict, run_bounded, tiny_context_config, tiny_restorer

from refface_core import RefFaceError
from refface_core.cli import main
from refface_core.faces import align_face, load_face_analysis
from refface_core.images import load_image
from refface_core.training.config import load_config
from refface_core.training.trainer import TrainingModel, build_dataset, step_draws, trainable_parameters

REPO = Path(__file__).resolve().parents[1]
FACES = Path(__file__).parent / "data" / "faces"
PEOPLE = {"macron": ["macron_1", "macron_2"], "ardern": ["ardern_1", "ardern_2"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny models (one with Composite Context), an ArcFace ONNX, FaRL weights, and two people's photos."""
    root = tmp_path_factory.mktemp("training")
    plain = tiny_restorer(seed=6)
    plain.save_pretrained(root / "plain")
    with_context = tiny_restorer(seed=6)
    with_context.add_composite_context(tiny_context_config())  # 128-d identity
    with_context.save_pretrained(root / "context")
    export_iresnet(root / "arcface.onnx", dim=128)
    save_file(farl_state_dict(), root / "farl.safetensors")
    for person, photos in PEOPLE.items():
        (root / "people" / person).mkdir(parents=True)
        for photo in photos:
            shutil.copy(FACES / f"{photo}.jpg", root / "people" / person)
    return root


def write_config(setup, tmp_path, **changes):
    config = {
        "model": str(setup / "context"), "output": str(tmp_path / "run"), "arcface": str(setup / "arcface.onnx"),
        "farl": str(setup / "farl.safetensors"), "freeze": "context", "steps": 6, "batch_size": 2, "lr": 1e-3,
        "warmup_steps": 1, "log_every": 1, "checkpoint_every": 3, "sample_every": 6, "sample_steps": 2,
        "data": {"layout": "folders", "root": str(setup / "people"), "cache": str(setup / "aligned"), "size": 32,
                 "workers": 0},
    }  # fmt: skip
    data = changes.pop("data", {})
    config |= changes
    config["data"] |= data
    path = tmp_path / "train.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def logged(run: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in (run / "logs").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values |= {e.step: e.value for e in accumulator.Scalars(tag)}
    return values


def test_loss_falls_and_the_export_restores_through_the_cli(setup, tmp_path, capsys):
    config = write_config(setup, tmp_path, model=str(setup / "plain"), freeze="full", steps=40, checkpoint_every=40,
                          sample_every=20, data={"num_refs": 2})  # fmt: skip
    assert main(["train", "--config", str(config)]) == 0
    run = tmp_path / "run"
    assert f"wrote {run / 'final'}" in capsys.readouterr().out
    eps = logged(run, "train/eps")
    assert sorted(eps) == list(range(1, 41))
    first, last = np.mean([eps[s] for s in range(1, 9)]), np.mean([eps[s] for s in range(33, 41)])
    assert last < 0.8 * first, (first, last)
    assert set(logged(run, "train/hid")) == set(eps)
    grids = sorted((run / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["step_0000020.png", "step_0000040.png"]
    assert Image.open(grids[0]).size == (4 * 32, 2 * 32)  # LQ | restored | HQ | reference, per sample
    assert [c.name for c in (run / "checkpoints").iterdir()] == ["step_0000040"]

    analysis = load_face_analysis()
    crops = []
    for name in ("macron_2", "macron_1"):
        photo = np.asarray(load_image(FACES / f"{name}.jpg"))
        crops.append(tmp_path / f"{name}_aligned.png")
        Image.fromarray(align_face(photo, analysis.main_face(photo, name).landmarks, 512)[0]).save(crops[-1])
    out = tmp_path / "restored.png"
    args = ["restore", "--model", str(run / "final"), "--aligned", "--input", str(crops[0]), "--ref", str(crops[1])]
    assert main([*args, "--out", str(out), "--steps", "2"]) == 0
    assert Image.open(out).size == (32, 32)


def test_resume_continues_exactly(setup, tmp_path):
    from refface_core.training.trainer import train

    whole = write_config(setup, tmp_path / "a")
    assert main(["train", "--config", str(whole)]) == 0
    resumed = write_config(setup, tmp_path / "b")
    checkpoint = tmp_path / "a" / "run" / "checkpoints" / "step_0000003"
    shutil.copytree(checkpoint, tmp_path / "b" / "run" / "checkpoints" / checkpoint.name)
    assert main(["train", "--config", str(resumed), "--resume"]) == 0
    a, b = logged(tmp_path / "a" / "run", "train/loss"), logged(tmp_path / "b" / "run", "train/loss")
    assert sorted(b) == [4, 5, 6] and all(a[s] == b[s] for s in (4, 5, 6)), (a, b)
    with pytest.raises(RefFaceError, match="already has checkpoints: continue with --resume"):
        train(load_config(resumed))
    changed = write_config(setup, tmp_path / "b", batch_size=1)
    (tmp_path / "b" / "run" / "final").rename(tmp_path / "b" / "run" / "final-earlier")  # see the test below
    with pytest.raises(RefFaceError, match="cannot resume .* exactly: the run changed \\(batch_size: 2 -> 1\\)"):
        train(load_config(changed), resume="latest")
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        first = load_file(tmp_path / "a" / "run" / "checkpoints" / "step_0000006" / name)
        second = load_file(tmp_path / "b" / "run" / "checkpoints" / "step_0000006" / name)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), name


def test_an_earlier_final_model_is_never_replaced(setup, tmp_path, monkeypatch, capsys):
    from refface_core import RefFaceRestorer
    from refface_core.training.trainer import export_whole, train

    config = write_config(setup, tmp_path, steps=2, checkpoint_every=2, sample_every=2)
    assert main(["train", "--config", str(config)]) == 0
    run = tmp_path / "run"
    earlier = (run / "final" / "model.safetensors").read_bytes()
    shutil.rmtree(run / "checkpoints")  # pruned: only the model is left
    logs = sorted((run / "logs").rglob("*"))
    with pytest.raises(RefFaceError, match="final holds the model of an earlier run.*move it away.*another output"):
        train(load_config(config))
    capsys.readouterr()
    assert main(["train", "--config", str(config)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "refface: error:" in error and "Traceback" not in error
    assert sorted((run / "logs").rglob("*")) == logs and not (run / "checkpoints").exists()  # refused up front
    assert (run / "final" / "model.safetensors").read_bytes() == earlier

    (tmp_path / "a_file").write_text("x")
    elsewhere = write_config(setup, tmp_path, output=str(tmp_path / "a_file" / "run"))
    assert main(["train", "--config", str(elsewhere)]) == 1
    assert "a_file is a file, not a folder" in capsys.readouterr().err  # before the model loads

    (run / "final").rename(run / "final-earlier")  # as the message says; then the run goes ahead
    more = write_config(setup, tmp_path, steps=4, checkpoint_every=2, sample_every=4)
    assert main(["train", "--config", str(more)]) == 0
    assert (run / "final" / "model.safetensors").read_bytes() != earlier
    assert (run / "final-earlier" / "model.safetensors").read_bytes() == earlier
    with pytest.raises(RefFaceError, match="final holds the model of an earlier run"):
        train(load_config(more), resume="latest")  # --resume as well

    model = RefFaceRestorer.from_pretrained(run / "final")
    target = tmp_path / "export" / "final"
    target.parent.mkdir()

    def broken(self, path):
        Path(path).mkdir()
        (Path(path) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(RefFaceRestorer, "save_pretrained", broken)
        with pytest.raises(RefFaceError, match=r"final.partial \(No space left on device\); .* again with --resume"):
            export_whole(model, target)
    assert not target.exists()  # whole or absent
    export_whole(model, target)  # the failed export's leftover goes
    assert [p.name for p in target.parent.iterdir()] == ["final"]
    exported = (target / "model.safetensors").read_bytes()
    assert RefFaceRestorer.from_pretrained(target).state_dict().keys() == model.state_dict().keys()
    with pytest.raises(RefFaceError, match="in place as .*final .*saved whole as .*final.partial"):
        export_whole(model, target)  # a folder that appeared during the run is kept as it was
    assert (target / "model.safetensors").read_bytes() == exported


@pytest.mark.parametrize("freeze", ["context", "context_attention", "full"])
def test_gradients_follow_the_freezing_choice(setup, tmp_path, freeze):
    from refface_core import RefFaceRestorer
    from refface_core.context.farl import load_farl
    from refface_core.training.identity import ArcFace

    config = load_config(write_config(setup, tmp_path, freeze=freeze))
    restorer = RefFaceRestorer.from_pretrained(config.model)
    with torch.no_grad():  # a context layer past its zero initialisation, so gradients reach the whole context path
        for name, p in restorer.named_parameters():
            if "to_out_ctx" in name:
                p.normal_(0, 0.05)
    params = trainable_parameters(restorer, freeze)
    model = TrainingModel(restorer, ArcFace.from_onnx(config.arcface), load_farl(config.farl), config)
    batch = torch.utils.data.default_collate([build_dataset(config)[i] for i in range(2)])
    draws = step_draws(config, 0, 0, 0, 2, (restorer.vq_config["latent_channels"], 16, 16))
    draws["keep_lq"] = draws["keep_context"] = torch.ones(2)
    losses = model(batch["hq"], batch["lq"], batch["refs"], draws)
    losses["loss"].backward()
    reached = {name for name, p in params.items() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(n.startswith("context_encoder.") for n in reached) and any("to_k_ctx" in n for n in reached)
    attention = {n for n, _ in restorer.unet.named_parameters(prefix="unet") if ".attentions." in n and "_ctx" not in n}
    assert attention <= reached if freeze != "context" else not attention & reached, sorted(attention - reached)[:5]
    assert ("unet.conv_in.weight" in reached) == (freeze == "full")
    frozen = [p for name, p in restorer.named_parameters() if name not in params]
    assert all(p.grad is None for p in frozen)  # the VQ, and whatever the choice leaves out


def test_bad_configs_and_a_non_finite_loss_are_named(setup, tmp_path):
    with pytest.raises(RefFaceError, match="unknown training config keys: data.sise"):
        load_config(write_config(setup, tmp_path, data={"sise": 32}))
    with pytest.raises(RefFaceError, match="freeze must be one of"):
        load_config(write_config(setup, tmp_path, freeze="everything"))
    with pytest.raises(RefFaceError, match="hid_weight > 0 needs `arcface:`"):
        load_config(write_config(setup, tmp_path, arcface=None))
    from refface_core.training.trainer import train

    with pytest.raises(RefFaceError, match="trains the Composite Context layers, which this model lacks"):
        train(load_config(write_config(setup, tmp_path, model=str(setup / "plain"))))
    broken = tiny_restorer(seed=6)
    broken.add_composite_context(tiny_context_config())
    with torch.no_grad():  # finite weights (a model with NaN in them is refused when loaded), an infinite loss
        broken.unet.conv_out.bias.fill_(1e38)
    broken.save_pretrained(tmp_path / "broken")
    with pytest.raises(RefFaceError, match=r"non-finite loss at step 1 \(here: samples \[.+, .+\], eps inf, loss"):
        train(load_config(write_config(setup, tmp_path, model=str(tmp_path / "broken"))))


def test_degrade_cli_writes_a_reproducible_test_set(tmp_path, capsys):
    hq = tmp_path / "hq"
    hq.mkdir()
    for name in ("macron_1", "ardern_1"):
        Image.open(FACES / f"{name}.jpg").resize((128, 128)).save(hq / f"{name}.png")
    for out in ("lq1", "lq2"):
        assert main(["degrade", "--input", str(hq), "--out", str(tmp_path / out), "--preset", "severe"]) == 0
    assert "wrote 2 images" in capsys.readouterr().out
    for name in ("macron_1.png", "ardern_1.png"):
        assert np.array_equal(
            np.asarray(Image.open(tmp_path / "lq1" / name)), np.asarray(Image.open(tmp_path / "lq2" / name))
        )
    assert main(["degrade", "--input", str(hq), "--out", str(tmp_path / "lq1")]) == 1  # never overwrites
    assert "refface: error:" in capsys.readouterr().err


LAUNCH_LIMIT = 300  # seconds: a two-process run takes 30-80 s on a loaded 2-core machine


def accelerate_launch(config: Path, *args: str, target: list[str]) -> str:
    """`accelerate launch` of two CPU processes over gloo: its multi-process launcher with ACCELERATE_USE_CPU (`--cpu`
    alone starts one process). FSDP goes through tests/fsdp_on_cpu.py, which lifts accelerate's accelerator-only gate
    for it. Returns the output."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "bf16", "--dynamo_backend", "no", *target,
        "--config", str(config), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true"}
    result = run_bounded(command, LAUNCH_LIMIT, env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:]
    return result.stdout


FSDP = ["--use_fsdp", "--fsdp_version", "2", "tests/fsdp_on_cpu.py"]

# The DDP run's target: `python -m refface_core.training`, with the race behind a hang at exit made certain. Rank 1
# destroys the process group with an all_reduce still in flight (rank 0 joins it 2 s later), so gloo's worker thread
# frees that tensor, which has a Python object, during the teardown. While DDP's reducer held the group's last
# reference, freeing it took the GIL and joined that thread, which waited for the GIL: rank 1 never ended.
RACING_TEARDOWN = """
import runpy, time
import torch, torch.distributed as dist
from accelerate import Accelerator

end_training = Accelerator.end_training

def racing_end_training(self):
    if self.process_index == 1:
        dist.all_reduce(torch.ones(4), async_op=True)
    else:
        time.sleep(2)
        dist.all_reduce(torch.ones(4))
    end_training(self)

Accelerator.end_training = racing_end_training
runpy.run_module("refface_core.training", run_name="__main__")
"""


def two_process_config(setup, folder: Path) -> Path:
    return write_config(setup, folder, freeze="full", steps=4, checkpoint_every=2, sample_every=4, batch_size=1,
                        mixed_precision="bf16", gradient_checkpointing=True)  # fmt: skip


@pytest.fixture(scope="module")
def ddp_run(setup, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    (folder / "racing_teardown.py").write_text(RACING_TEARDOWN)
    output = accelerate_launch(
        two_process_config(setup, folder), target=["--multi_gpu", str(folder / "racing_teardown.py")]
    )
    return folder / "run", output


def alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_hung_launch_fails_with_its_output_and_leaves_no_process():
    # a command that hangs, with a child in a session of its own, as torch starts `accelerate launch`'s workers
    code = (
        "import subprocess, sys, time; "
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True); "
        "print(child.pid, flush=True); time.sleep(600)"
    )
    start = time.monotonic()
    with pytest.raises(
        pytest.fail.Exception, match=r"ran past 10 s and was killed, with its processes:\n\d+"
    ) as failed:
        run_bounded([sys.executable, "-c", code], 10)  # time enough to start both, even on a loaded machine
    assert time.monotonic() - start < 40
    child = int(str(failed.value).splitlines()[-1])
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:  # SIGKILL was sent; it is gone within moments
        time.sleep(0.1)
    assert not alive(child)
    assert run_bounded([sys.executable, "-c", "print('done')"], 30).stdout == "done\n"


def checkpoint_tensors(run: Path, step: int) -> dict[str, torch.Tensor]:
    folder = run / "checkpoints" / f"step_{step:07d}"
    kinds = ("model", "ema", "optimizer")
    return {f"{kind}/{k}": v for kind in kinds for k, v in load_file(folder / f"{kind}.safetensors").items()}


def test_accelerate_launch_with_two_cpu_processes_in_bf16(ddp_run):
    run, stderr = ddp_run
    count = re.search(
        r"training ([\d,]+) parameters \(full\) on 2 process\(es\), MULTI_CPU; each process holds ([\d,]+)", stderr
    )
    assert count and count[1] == count[2]  # DDP: every process holds all of them
    assert sorted(c.name for c in (run / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
    assert (run / "final" / "model.safetensors").is_file()
    assert len(logged(run, "train/loss")) == 4 and all(np.isfinite(v) for v in logged(run, "train/loss").values())


def test_fsdp_trains_as_ddp_does_and_resumes_exactly(setup, tmp_path, ddp_run):
    from refface_core import RefFaceRestorer

    ddp, _ = ddp_run
    stderr = accelerate_launch(two_process_config(setup, tmp_path / "fsdp"), target=FSDP)
    held = re.search(
        r"training ([\d,]+) parameters \(full\) on 2 process\(es\), FSDP; each process holds ([\d,]+)", stderr
    )
    count, mine = (int(n.replace(",", "")) for n in held.groups())
    assert count / 2 <= mine < 0.6 * count  # sharded in two
    fsdp = tmp_path / "fsdp" / "run"
    assert logged(fsdp, "train/loss") == logged(ddp, "train/loss")
    sharded, replicated = checkpoint_tensors(fsdp, 4), checkpoint_tensors(ddp, 4)  # gathered whole from the shards
    assert sharded.keys() == replicated.keys()
    assert all(torch.equal(sharded[k], replicated[k]) for k in sharded)
    grids = [np.asarray(Image.open(r / "samples" / "step_0000004.png")) for r in (fsdp, ddp)]
    assert np.array_equal(*grids)  # sampled with the gathered weights

    exported = RefFaceRestorer.from_pretrained(fsdp / "final").state_dict()
    base = RefFaceRestorer.from_pretrained(setup / "context").state_dict()
    ema = {k.removeprefix("ema/"): v for k, v in sharded.items() if k.startswith("ema/")}
    assert all(torch.equal(exported[k], ema[k]) and not torch.equal(exported[k], base[k]) for k in ema)
    assert all(torch.equal(exported[k], base[k]) for k in base.keys() - ema.keys())

    resumed = tmp_path / "resumed" / "run"  # continue from step 2: the sharded state is put back exactly
    shutil.copytree(fsdp / "checkpoints" / "step_0000002", resumed / "checkpoints" / "step_0000002")
    accelerate_launch(two_process_config(setup, tmp_path / "resumed"), "--resume", target=FSDP)
    continued = checkpoint_tensors(resumed, 4)
    assert all(torch.equal(continued[k], sharded[k]) for k in sharded)


def test_fsdp_settings_the_trainer_cannot_honour_are_refused(monkeypatch):
    from refface_core.training.trainer import fsdp_plugin

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(RefFaceError, match="fsdp_version: 2"):
        fsdp_plugin([])
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(RefFaceError, match="offload is not supported"):
        fsdp_plugin([])
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "false")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    with pytest.raises(RefFaceError, match="gradient_checkpointing: true"):
        fsdp_plugin([])
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "false")
    plugin = fsdp_plugin([torch.nn.Linear(2, 2)])
    assert (
        plugin.fsdp_version == 2
        and plugin.auto_wrap_policy is None
        and plugin.mixed_precision_policy.param_dtype is None
    )


def test_gradient_checkpointing_gives_the_same_gradients(setup, tmp_path):
    from refface_core import RefFaceRestorer
    from refface_core.context.farl import load_farl
    from refface_core.training.identity import ArcFace

    grads = []
    for checkpointing in (False, True):
        config = load_config(write_config(setup, tmp_path, freeze="full", gradient_checkpointing=checkpointing))
        restorer = RefFaceRestorer.from_pretrained(config.model)
        params = trainable_parameters(restorer, config.freeze)
        model = TrainingModel(restorer, ArcFace.from_onnx(config.arcface), load_farl(config.farl), config)
        batch = torch.utils.data.default_collate([build_dataset(config)[i] for i in range(2)])
        draws = step_draws(config, 0, 0, 0, 2, (restorer.vq_config["latent_channels"], 16, 16))
        model(batch["hq"], batch["lq"], batch["refs"], draws)["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in params.values() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_bench_train_reports_a_step_per_freezing_choice(setup, tmp_path, capsys):
    counts = {}
    for freeze in ("context", "context_attention", "full"):
        out = tmp_path / f"{freeze}.json"
        args = ["bench", "--train", "--model", str(setup / "context"), "--farl", str(setup / "farl.safetensors")]
        assert main([*args, "--refs", "1", "--freeze", freeze, "--json", str(out)]) == 0
        assert f"freeze {freeze}" in capsys.readouterr().out
        result = yaml.safe_load(out.read_text())
        assert result["seconds_per_step"] > 0 and result["peak_mib"] > 0 and result["config"]["arcface"] == "stand-in"
        assert all(np.isfinite(v) for v in result["losses"].values())
        counts[freeze] = result["trainable_parameters"]
    assert 0 < counts["context"] < counts["context_attention"] < counts["full"]
