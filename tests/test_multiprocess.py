"""Several processes on CPU (gloo): real torchrun launches of the trainer, world size asserted every time.

Run as a script under torchrun (`torchrun ... tests/test_multiprocess.py OUT override...`), this file is the
worker: the trainer's own setup/train_loop with the data stream's sample keys recorded, and each rank's
view of the run dumped to OUT/rank<r>.json + OUT/rank<r>.safetensors for the tests to compare.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from runs import QUICK  # (this file also runs as a script in each process: `tests` is no package there)

from tiny_audio.plot import read_run

pytestmark = pytest.mark.slow  # every test starts 2-3 processes of the trainer

ROOT = Path(__file__).resolve().parent.parent
# The same samples in the same steps whatever the process count: rank r takes global indices r, r + N, ...
SAME_ORDER = ["data.shuffle=false", "data.bucket_batches=1"]


def torchrun(n: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args]


def launch(
    command: list[str], output_dir: Path, timeout: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a launcher and its workers to the end. A launch that outlives `timeout` (each takes well under a
    minute; pytest's own limit is 600 s per test) is killed with every process it started, and the test fails
    with the tail of what they printed, instead of pytest-timeout's bare stack of the waiting test."""
    env = {
        **os.environ,
        **(env or {}),
        "EXP": "tiny",
        "OUTPUT_DIR": str(output_dir),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    env["ACCELERATE_USE_CPU"] = "true"  # for accelerate launch; torchrun ignores it
    process = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the workers too, or they outlive the test holding their ports
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(command[:4])}... still running after {timeout:.0f}s:\n{(stdout + stderr)[-5000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_launch(n: int, *args: str) -> list[str]:
    """What docker/start.sh runs on a machine without GPUs (ACCELERATE_USE_CPU is set by `launch`), on a free
    port rather than accelerate's fixed 29500."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        f"--num_processes={n}",
        f"--main_process_port={free_port()}",
        *args,
    ]


def entrypoint(
    n: int, output_dir: Path, *overrides: str, launcher: str = "torchrun"
) -> subprocess.CompletedProcess[str]:
    script = [str(ROOT / "entrypoint.py"), "train", *QUICK, *overrides]
    if n == 1:
        command = [sys.executable, *script]
    else:
        command = accelerate_launch(n, *script) if launcher == "accelerate" else torchrun(n, *script)
    result = launch(command, output_dir)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert f"processes: {n} " in result.stdout, result.stdout[-3000:]  # the world size the run really had
    return result


def worker(n: int, output_dir: Path, *overrides: str, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    result = launch(torchrun(n, __file__, str(output_dir), *overrides), output_dir, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    views = [json.loads((output_dir / f"rank{r}.json").read_text()) for r in range(n)]
    assert [v["world_size"] for v in views] == [n] * n
    assert [v["rank"] for v in views] == list(range(n))
    return views


def projector(output_dir: Path, rank: int) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(output_dir / f"rank{rank}.safetensors"))


def losses(output_dir: Path) -> dict[int, float]:
    return dict(read_run(output_dir / "metrics.jsonl").train)


def test_two_processes_see_different_samples_and_keep_identical_projectors(tmp_path: Path) -> None:
    import torch

    views = worker(2, tmp_path, "training.max_steps=3", "training.batch_size=2")
    keys = [set(v["keys"]) for v in views]
    assert all(len(k) == 6 for k in keys)
    assert not keys[0] & keys[1]
    # every rank freed DDP's wrapper before destroying the process group, and destroyed it once
    assert [(v["wrapper"], v["wrapper_alive_at_destroy"]) for v in views] == [("DistributedDataParallel", [False])] * 2
    first, second = projector(tmp_path, 0), projector(tmp_path, 1)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_two_processes_of_batch_b_match_one_process_of_batch_2b(tmp_path: Path) -> None:
    import torch

    steps = ["training.max_steps=3", *SAME_ORDER]
    two = worker(2, tmp_path / "two", *steps, "training.batch_size=2")
    one = worker(1, tmp_path / "one", *steps, "training.batch_size=4")
    assert sorted(two[0]["keys"] + two[1]["keys"]) == sorted(one[0]["keys"])
    for step, loss in losses(tmp_path / "one").items():
        assert losses(tmp_path / "two")[step] == pytest.approx(loss, rel=1e-4), step
    a, b = projector(tmp_path / "two", 0), projector(tmp_path / "one", 0)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def test_moe_trains_under_ddp_while_experts_sit_idle(tmp_path: Path) -> None:
    import torch

    # Top-1 of 64 experts and one clip of at most 3 s (at most 37 tokens) per process and step: at least 27
    # experts get no token in every step on every rank. DDP fails a step in which a parameter has no gradient.
    moe = ["projector.type=moe", "projector.num_experts=64", "projector.top_k=1"]
    views = worker(2, tmp_path, *moe, "training.max_steps=3", "training.batch_size=1")
    assert [v["code"] for v in views] == [0, 0]
    steps = [m for m in map(json.loads, (tmp_path / "metrics.jsonl").open()) if "train/loss" in m]
    assert len(steps) == 3
    for m in steps:  # rank 0's expert loads in each step
        assert sum(m[f"moe/expert_{i}_load"] == 0 for i in range(64)) >= 27, m
    first, second = projector(tmp_path, 0), projector(tmp_path, 1)
    for name in first:  # every gradient was averaged: the ranks still hold one projector
        assert torch.equal(first[name], second[name]), name


def interrupted_after(output_dir: Path, step: int, steps: int) -> dict[int, float]:
    """A finished run made to look stopped at `step`: later checkpoints and metrics removed; the removed losses."""
    for path in (output_dir / "checkpoints").glob("step-*"):
        if int(path.name.removeprefix("step-")) > step:
            shutil.rmtree(path)
    full = losses(output_dir)
    assert sorted(full) == list(range(1, steps + 1))
    (output_dir / "metrics.jsonl").unlink()
    return {s: loss for s, loss in full.items() if s > step}


def test_a_two_process_checkpoint_resumes_in_two_processes_and_in_one(tmp_path: Path) -> None:
    first = tmp_path / "first"
    run = ["training.max_steps=6", "training.save_steps=3", "training.batch_size=2", "training.global_batch_size=4"]
    entrypoint(2, first, *run, launcher="accelerate")  # the image's launcher; the resume below uses torchrun
    resume_dir = first / "checkpoints" / "step-00000003" / "last-checkpoint"
    ranks = json.loads((resume_dir / "ranks.json").read_text())
    assert ranks["world_size"] == 2 and [d["layout"]["rank"] for d in ranks["data"]] == [0, 1]
    assert len(json.loads((resume_dir / "rng.json").read_text())["ranks"]) == 2
    expected = interrupted_after(first, 3, 6)

    one = tmp_path / "one"
    shutil.copytree(first, one)
    again = entrypoint(2, first, *run)
    assert "at step 3" in again.stdout
    got = losses(first)
    assert sorted(got) == [4, 5, 6]
    for step, loss in got.items():  # the same losses as the uninterrupted run: data position and RNG restored
        assert loss == pytest.approx(expected[step], rel=1e-6), step

    alone = entrypoint(1, one, *run)
    assert "at step 3" in alone.stdout and "accumulation 2 | global batch 4" in alone.stdout
    assert sorted(losses(one)) == [4, 5, 6]


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path: Path) -> None:
    import re
    import signal
    import time

    script = [str(ROOT / "entrypoint.py"), "train", *QUICK, "training.max_steps=500", "training.save_steps=400"]
    env = {**os.environ, "EXP": "tiny", "OUTPUT_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "log.txt"
    with log.open("w") as sink:
        proc = subprocess.Popen(torchrun(2, *script), env=env, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while "Step 3/500" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
            assert "processes: 2 " in log.read_text()
            workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            assert len(workers) == 2, workers
            os.kill(int(workers[-1]), signal.SIGTERM)  # one rank only: it must not leave the other one waiting
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = log.read_text()
    saved = [int(m) for m in re.findall(r"checkpoint step (\d+) saved", output)]
    last_logged = max(int(m) for m in re.findall(r"^Step (\d+)/500", output, re.MULTILINE))
    assert saved == [last_logged], output[-3000:]
    resume_dir = tmp_path / "checkpoints" / f"step-{saved[0]:08d}" / "last-checkpoint"
    assert json.loads((resume_dir / "ranks.json").read_text())["world_size"] == 2


def test_a_collapsed_launch_is_an_error(tmp_path: Path) -> None:
    env_command = [sys.executable, str(ROOT / "entrypoint.py"), "train", *QUICK, "training.max_steps=1"]
    result = subprocess.run(
        env_command,
        env={**os.environ, "EXP": "tiny", "OUTPUT_DIR": str(tmp_path), "TINY_AUDIO_WORLD_SIZE": "2"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "error: 2 processes were asked for but this run has 1" in result.stderr


def test_deepspeed_zero2_trains_resumes_and_its_projector_loads_without_it(tmp_path: Path) -> None:
    import torch

    from tiny_audio.export import load_trained

    # the first DeepSpeed start on a machine compiles a CPU op (~45 s, cached in ~/.cache/torch_extensions)
    run = ["training.deepspeed=zero2", "training.batch_size=2", "training.max_steps=5", "training.save_steps=3"]
    first = entrypoint(2, tmp_path, *run, launcher="accelerate")
    assert "DeepSpeed zero2" in first.stdout
    saved = torch.load(tmp_path / "checkpoints/step-00000003/last-checkpoint/optimizer.pt", weights_only=True)
    assert len(saved["deepspeed_ranks"]) == 2  # each rank's ZeRO partition
    expected = interrupted_after(tmp_path, 3, 5)

    again = entrypoint(2, tmp_path, *run)
    assert "at step 3" in again.stdout
    got = losses(tmp_path)
    assert sorted(got) == [4, 5]
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], rel=1e-6), step

    model, cfg = load_trained(tmp_path / "checkpoints/step-00000005", device=torch.device("cpu"))
    assert cfg.training.deepspeed == "zero2"
    weights = load_file_cpu(tmp_path / "checkpoints/step-00000005/last-checkpoint/projector.safetensors")
    for name, tensor in model.projector.state_dict().items():
        assert torch.equal(tensor, weights[name]), name


@pytest.mark.parametrize("deepspeed", [None, "zero2", "zero3"])
def test_the_lora_stage_trains_and_resumes_in_two_processes(tmp_path: Path, deepspeed: str | None) -> None:
    import torch
    from safetensors.torch import load_file

    from tiny_audio.export import load_trained

    run = ["lora.enabled=true", "lora.rank=4", "training.batch_size=2", "training.max_steps=4", "training.save_steps=2"]
    if deepspeed == "zero3":  # every weight sharded, the adapters too (the shipped file keeps small ones whole)
        config = json.loads((ROOT / "configs/deepspeed/zero3.json").read_text())
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        (tmp_path.parent / "zero3_all.json").write_text(json.dumps(config))
        deepspeed = str(tmp_path.parent / "zero3_all.json")
    run += [f"training.deepspeed={deepspeed}"] if deepspeed else []
    first = entrypoint(2, tmp_path, *run)
    assert "decoder   trainable" in first.stdout
    expected = interrupted_after(tmp_path, 2, 4)
    again = entrypoint(2, tmp_path, *run)
    assert "at step 2" in again.stdout
    got = losses(tmp_path)
    assert sorted(got) == [3, 4]
    for step, loss in got.items():  # the adapters, their optimizer state and every rank's position restored
        assert loss == pytest.approx(expected[step], rel=1e-6), step
    final = tmp_path / "checkpoints/step-00000004"
    model, _ = load_trained(final, device=torch.device("cpu"))
    from peft import get_peft_model_state_dict

    saved, loaded = load_file(str(final / "adapters.safetensors")), get_peft_model_state_dict(model.decoder)
    assert saved.keys() == loaded.keys() and any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key


def test_deepspeed_zero3_shards_every_weight_matches_ddp_resumes_and_its_projector_loads_without_it(
    tmp_path: Path,
) -> None:
    import torch

    from tiny_audio.export import load_trained

    # The shipped zero3.json keeps parameters under 100k elements whole on every rank, which is all of the tiny
    # models: with the threshold at 0 every weight is sharded, so each place that reads one outside its
    # module's forward (embedding RMS, the fused loss head, saving and loading the projector) must gather it.
    config = json.loads((ROOT / "configs/deepspeed/zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3_all.json").write_text(json.dumps(config))
    zero3 = f"training.deepspeed={tmp_path / 'zero3_all.json'}"
    run = ["training.batch_size=2", "training.max_steps=5", "training.save_steps=3"]
    sharded, ddp = tmp_path / "zero3", tmp_path / "ddp"
    first = entrypoint(2, sharded, zero3, *run, launcher="accelerate")
    assert "DeepSpeed" in first.stdout and "projector trainable       82,240" in first.stdout
    entrypoint(2, ddp, *run, launcher="accelerate")
    reference = losses(ddp)
    for step, loss in losses(sharded).items():
        assert loss == pytest.approx(reference[step], rel=1e-5), step
    saved = torch.load(sharded / "checkpoints/step-00000003/last-checkpoint/optimizer.pt", weights_only=True)
    assert len(saved["deepspeed_ranks"]) == 2
    expected = interrupted_after(sharded, 3, 5)

    again = entrypoint(2, sharded, zero3, *run)
    assert "at step 3" in again.stdout
    got = losses(sharded)
    assert sorted(got) == [4, 5]
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], rel=1e-6), step

    # whole weights (not one rank's slice), equal to what the same run under DDP trained
    model, _ = load_trained(sharded / "checkpoints/step-00000005", device=torch.device("cpu"))
    plain, _ = load_trained(ddp / "checkpoints/step-00000005", device=torch.device("cpu"))
    for (name, tensor), other in zip(
        model.projector.state_dict().items(), plain.projector.state_dict().values(), strict=True
    ):
        assert tensor.shape == other.shape and torch.allclose(tensor, other, atol=1e-5), name


def test_deepspeed_skips_a_non_finite_step_and_counts_it(tmp_path: Path) -> None:
    views = worker(
        1,
        tmp_path,
        "training.deepspeed=zero2",
        "training.max_steps=4",
        "training.batch_size=2",
        env={"POISON_STEPS": "2"},
    )
    (view,) = views
    assert view["code"] == 0 and view["skipped_steps"] == 1
    before = view["weights_before"]  # the projector as steps 1..4 start (step 1 runs at warm-up's LR 0)
    assert before[1] == before[2]  # step 2's NaN gradient changed nothing
    assert before[2] != before[3]  # step 3 updated again
    skipped = [
        m["train/skipped_steps"] for m in map(json.loads, (tmp_path / "metrics.jsonl").open()) if "train/loss" in m
    ]
    assert skipped == [0, 1, 1, 1]


def load_file_cpu(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


# --- the worker ------------------------------------------------------------------------------------------


def _work(output_dir: Path, overrides: list[str]) -> None:
    import dataclasses
    import gc
    import weakref

    import torch

    from tiny_audio.checkpoint.format import save_projector
    from tiny_audio.experiments import load_config
    from tiny_audio.train import cleanup, setup, train_loop

    cfg = load_config("tiny", [*QUICK, "training.resume=false", "training.save_steps=1000", *overrides])
    run = setup(cfg, output_dir=output_dir, token=None, target=None)
    keys: list[str] = []
    stream = run.stream

    # POISON_STEPS="2,3": NaN audio in those steps' batches (one micro-batch per step in these runs)
    poison = {int(s) for s in os.environ.get("POISON_STEPS", "").split(",") if s}
    weights_before: list[float] = []  # the projector's weight sum as each step starts

    class Recorder:
        def __next__(self) -> Any:
            weights_before.append(sum(float(p.detach().double().sum()) for p in run.raw.projector.parameters()))
            batch = next(stream)
            keys.extend(batch.keys)
            if len(weights_before) in poison:
                batch = dataclasses.replace(batch, audio=torch.full_like(batch.audio, float("nan")))
            return batch

        def __getattr__(self, name: str) -> Any:
            return getattr(stream, name)

    run.stream = Recorder()
    # Whether the DDP wrapper (and with it the C++ reducer that holds the process group) is still alive when
    # the group is destroyed: freed after it, it can hang the process at exit (see distributed.release_ddp).
    wrapper, wrapper_type = weakref.ref(run.model), type(run.model).__name__
    alive_at_destroy: list[bool] = []
    destroy = torch.distributed.destroy_process_group

    def watched_destroy(*args: Any, **kwargs: Any) -> None:
        gc.collect()
        alive_at_destroy.append(wrapper() is not None)
        destroy(*args, **kwargs)

    torch.distributed.destroy_process_group = watched_destroy
    try:
        code = train_loop(run)
    finally:
        cleanup(run)
        torch.distributed.destroy_process_group = destroy
    acc = run.accelerator
    view = {
        "rank": acc.process_index,
        "world_size": acc.num_processes,
        "keys": keys,
        "code": code,
        "skipped_steps": run.skipped_steps,
        "weights_before": weights_before,
        "wrapper": wrapper_type,
        "wrapper_alive_at_destroy": alive_at_destroy,
    }
    (output_dir / f"rank{acc.process_index}.json").write_text(json.dumps(view))
    save_projector(run.raw.projector, output_dir / f"rank{acc.process_index}.safetensors")  # copies ZeRO views out


if __name__ == "__main__":
    _work(Path(sys.argv[1]), sys.argv[2:])
