"""Running the real scripts from tests: in-process for speed, as subprocesses for torchrun and signals."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

VQGAN_TEST_FLAGS = ["--preset=tiny", "--batch-size=4", "--warmup-steps=2", "--disc-start=2", "--eval-every=0",
                    "--eval-batch-size=50", "--log-every=1", "--lpips-random-backbone=true", "--flip=true"]
GPT_TEST_FLAGS = ["--preset=tiny", "--batch-size=8", "--warmup-steps=2", "--eval-every=0", "--log-every=1",
                  "--eval-batch-size=50", "--sample-count=4"]


def script_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def run_script(script: str, *args: str, nproc: int = 0, timeout: int = 300, check: bool = True,
               extra_torchrun: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`python script args` (nproc 0) or `torchrun --standalone --nproc_per_node=nproc script args`."""
    if nproc:
        command = [sys.executable, "-m", "torch.distributed.run", *(extra_torchrun or ("--standalone",)),
                   f"--nproc_per_node={nproc}", script, *args]
    else:
        command = [sys.executable, script, *args]
    # bytes, decoded here: text mode's universal newlines would turn a bar's \r into \n and hide it
    result = subprocess.run(command, cwd=ROOT, env=script_env(), capture_output=True, timeout=timeout)
    result.stdout, result.stderr = result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    # captured output is a log file, not a terminal: --progress auto writes whole lines, never a bar's \r
    if "--progress=true" not in args:
        assert "\r" not in result.stdout + result.stderr, f"{script}: carriage returns in a log"
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_state_dicts_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def overridden(base: list[str], extra: tuple[str, ...]) -> list[str]:
    """`base` flags (all --name=value) without those `extra` gives again, then `extra`: the scripts refuse a flag
    given twice."""
    names = {flag.split("=", 1)[0] for flag in extra if flag.startswith("--")}
    return [flag for flag in base if flag.split("=", 1)[0] not in names] + list(extra)


def vqgan_args(data, out, steps, *extra) -> list[str]:
    """train_resnet_vqgan.py flags of a tiny test run."""
    return [f"--data={data}", f"--out={out}", f"--max-steps={steps}", *overridden(VQGAN_TEST_FLAGS, extra)]


def gpt_args(tokens, out, steps, *extra) -> list[str]:
    """train_gpt.py flags of a tiny test run."""
    return [f"--tokens={tokens}", f"--out={out}", f"--max-steps={steps}", *overridden(GPT_TEST_FLAGS, extra)]


def train_records(run_dir) -> list[dict]:
    from vqgpt.runlog import read_metrics

    return [r for r in read_metrics(run_dir) if r["kind"] == "train"]


def tiny_models(perceptual=None):
    """The tiny VQGAN and a small discriminator, seeded, unwrapped (VQGANModels for the step functions)."""
    from models.discriminator import NLayerDiscriminator
    from models.vqgan import VQGAN, VQGAN_PRESETS
    from vqgpt.vqgan_step import VQGANModels

    torch.manual_seed(0)
    vqgan = VQGAN(VQGAN_PRESETS["tiny"])
    disc = NLayerDiscriminator(3, 16, 2)
    return VQGANModels(vqgan, disc, vqgan, disc, perceptual)


def run_shardify(argv: list[str]) -> int:
    """shardify.py in-process, as its `__main__` runs it: a user error is exit code 2 and one line."""
    import shardify
    from vqgpt.config import parse_config
    from vqgpt.settings import SHARDIFY_PRESETS, ShardifyConfig
    from vqgpt.errors import exit_on_user_error

    return exit_on_user_error(lambda: shardify.main(parse_config(ShardifyConfig, SHARDIFY_PRESETS, argv)), "shardify")


def spy_vqgan_memory_format(monkeypatch, script) -> list[str]:
    """Wrap a script's optimize_for_inference; the list gets the memory format of each VQGAN it prepared."""
    from models.vqgan import VQGAN

    real, formats = script.optimize_for_inference, []

    def spy(model, **options):
        prepared = real(model, **options)
        if isinstance(prepared, VQGAN):
            weight = prepared.decoder.conv_out.weight
            formats.append("channels_last" if weight.is_contiguous(memory_format=torch.channels_last)
                           and not weight.is_contiguous() else "contiguous")
        return prepared

    monkeypatch.setattr(script, "optimize_for_inference", spy)
    return formats
