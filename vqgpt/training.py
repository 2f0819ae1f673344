"""What every trainer shares: run folder, resume policy, signals, NaN guard, precision, checkpoints.

A trainer owns its step function; `TrainingRun` owns everything around it, so the VQGAN and
GPT trainers behave the same on preemption, bad steps, resume and bad input.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import random
import secrets
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqgpt import checkpoint as ckpt
from vqgpt import distributed
from vqgpt.config import check_removed_settings, config_to_dict, field_defaults, format_config
from vqgpt.distributed import DistInfo
from vqgpt.errors import RunError, UserError, first_line
from vqgpt.files import atomic_write_bytes, atomic_write_json, remove_stale_temporaries, sha256_file
from vqgpt.fsdp import FullStateModel
from vqgpt.runlog import METRICS_NAME, read_metrics, read_run_config
from vqgpt.shards import ShardError

CONFIG_NAME = "config.json"
NONCE_NAME = ".nonce"   # rank 0's random word for this start: the ranks that read it share the run folder
SAMPLES_NAME = "samples"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """'auto': bf16 on CUDA (fp16 on GPUs without bf16, V100/T4), fp32 on CPU. fp16 needs `grad_scaler`."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise RunError(f"--precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    return table[precision]


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """A loss scaler under fp16 (its small gradients underflow without one); a pass-through otherwise."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def configure_backends(device: torch.device) -> None:
    if device.type == "cuda":
        # TF32 for the networks' fp32 matmuls and convs (the codebook lookup opts out). The legacy
        # flags only: after the new fp32_precision API these getters raise, and inductor reads them
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


@contextlib.contextmanager
def strict_fp32():
    """IEEE fp32 and cuDNN's deterministic algorithms inside, whatever configure_backends chose for training:
    for measurements (Inception's features) that must not change with the GPU generation or between runs."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic, matmul.allow_tf32
    cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic, matmul.allow_tf32 = False, False, True, False
    try:
        yield
    finally:
        cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic, matmul.allow_tf32 = saved


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and/or torch.compile wrappers (what checkpoints store)."""
    module = getattr(module, "module", module)
    return getattr(module, "_orig_mod", module)


class TrainingRun:
    """Run folder + resume policy + stop/NaN consensus + checkpoint writing for one trainer."""

    def __init__(self, cfg: Any, dist: DistInfo, stage: str, compatible_fields: tuple[str, ...]):
        self.cfg = cfg
        self.dist = dist
        self.stage = stage
        self.compatible_fields = compatible_fields
        self.run_dir = Path(cfg.out)
        self.stop_requested = False
        self.bad_steps_in_a_row = 0
        self.skipped_steps = 0
        self.steps_this_start = self.steps_skipped_this_start = 0
        self.networks: dict[str, torch.nn.Module] = {}
        self.stateful: dict[str, Any] = {}

    def track(self, networks: dict[str, torch.nn.Module], **stateful: Any) -> None:
        """What a checkpoint holds and a resume restores, by name: the networks (checked finite and equal on
        every rank before saving) and every other object with state_dict/load_state_dict (optimizers, loss
        scalers, the shard loader)."""
        self.networks, self.stateful = networks, stateful

    @property
    def gathered_to_main(self) -> bool:
        """Sharded networks (--fsdp): their full state exists on rank 0 only, when gathered to save."""
        return any(isinstance(network, FullStateModel) for network in self.networks.values())

    def load_resume_state(self) -> dict | None:
        """The checkpoint to continue from under `--resume` (auto | none | PATH), checked for compatibility.

        Rank 0 decides, and every rank checks that it sees the same run folder (a nonce rank 0 writes there)
        and the same checkpoint file (sha256): on a filesystem that shows ranks different files they would
        otherwise train from different steps. Any refusal stops every rank with the same line."""
        decision = {"error": None, "name": None, "nonce": None}
        if self.dist.is_main:
            try:
                path = self.choose_checkpoint()
                decision["name"] = None if path is None else self.shared_name(path)
                decision["nonce"] = self.write_nonce() if self.dist.is_distributed else None
            except UserError as err:
                decision["error"] = str(err)
        decision = distributed.broadcast_object(decision)
        if decision["error"] is not None:
            raise RunError(decision["error"])
        path = None if decision["name"] is None else self.local_path(decision["name"])
        if self.dist.is_distributed:
            self.check_ranks_agree(path, decision["nonce"])
        if path is None:
            return None
        state = ckpt.load_checkpoint(path, required_keys=("stage", "step", "config"))
        if state["stage"] != self.stage:
            raise RunError(f"{path}: is a {state['stage']} checkpoint, this trainer continues {self.stage} runs")
        check_removed_settings(state["config"], str(path))
        mine = config_to_dict(self.cfg)
        # a setting newer than the run was at its default when the run was made
        theirs = {**field_defaults(type(self.cfg)), **state["config"]}
        differing = [k for k in self.compatible_fields if theirs.get(k) != mine.get(k)]
        if differing:
            details = ", ".join(f"{k}: run has {theirs.get(k)!r}, you gave {mine.get(k)!r}" for k in differing)
            raise RunError(f"{path}: cannot resume with an incompatible config ({details}); "
                           "use the run's settings or another --out")
        state["path"] = str(path)
        return state

    def choose_checkpoint(self) -> Path | None:
        """Rank 0's choice under `--resume`: a checkpoint path, or None for a fresh run."""
        resume = self.cfg.resume
        self.check_run_folder()
        existing = ckpt.latest_checkpoint(self.run_dir)
        if resume == "none":
            if existing is not None:
                raise RunError(f"{self.run_dir}: already holds checkpoints ({existing.name}); "
                               "pass --resume auto to continue it or choose another --out")
            return None
        if resume == "auto":
            return existing
        path = ckpt.resolve_checkpoint(resume)
        if path.parent.resolve() != self.run_dir.resolve() and self.holds_a_run():
            # saving here would prune that run's checkpoints and overwrite its config and metrics
            raise RunError(f"--resume {resume} continues the run in {path.parent}, but --out {self.run_dir} "
                           "holds another run; pass --out to a new folder (or the checkpoint's own run folder)")
        return path

    def shared_name(self, path: Path) -> str:
        """How every rank finds `path`: its name when it is in the run folder (each rank looks in its own --out),
        else the path itself."""
        return path.name if path.parent.resolve() == self.run_dir.resolve() else str(path.resolve())

    def local_path(self, name: str) -> Path:
        return Path(name) if Path(name).is_absolute() else self.run_dir / name

    def write_nonce(self) -> str:
        """A fresh random word in RUN/.nonce: the ranks that read it back look at the same folder."""
        nonce = secrets.token_hex(16)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.run_dir / NONCE_NAME, nonce.encode())
        return nonce

    def check_ranks_agree(self, path: Path | None, nonce: str) -> None:
        """Every rank sees rank 0's run folder and checkpoint bytes, or every rank stops with one line."""
        try:
            seen_nonce = (self.run_dir / NONCE_NAME).read_text().strip()
        except OSError:
            seen_nonce = None
        try:
            digest = None if path is None else sha256_file(path)
        except OSError:
            digest = "missing"
        views = distributed.all_gather_object((seen_nonce == nonce, digest))
        other_folder = [rank for rank, (same, _) in enumerate(views) if not same]
        other_file = [rank for rank, (_, digest) in enumerate(views) if digest != views[0][1]]
        if other_folder or other_file:
            what = (f"rank(s) {other_folder} do not see the run folder rank 0 writes ({self.run_dir})"
                    if other_folder else "")
            if other_file:
                what += ("; " if what else "") + f"rank(s) {other_file} see another {path.name if path else 'file'} " \
                        "than rank 0"
            raise RunError(f"{what}: --out must be one folder on a filesystem every node shares, the same for all ranks")

    def holds_a_run(self) -> bool:
        return self.run_dir.is_dir() and (bool(ckpt.list_checkpoints(self.run_dir)) or any(
            (self.run_dir / name).exists() for name in (CONFIG_NAME, METRICS_NAME, ckpt.LATEST_NAME)))

    def check_run_folder(self) -> None:
        """Refuse links planted inside the run folder (writes would land elsewhere); clear dead writers' temporaries."""
        for name in (CONFIG_NAME, METRICS_NAME, ckpt.LATEST_NAME, SAMPLES_NAME, "tensorboard"):
            if (self.run_dir / name).is_symlink():
                raise RunError(f"{self.run_dir / name}: is a link; a run folder holds no links (remove it)")
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunError(f"--out {self.run_dir}: is a file, not a run folder")
        if self.run_dir.is_dir():   # damaged records stop the run here, before anything in the folder is rewritten
            read_run_config(self.run_dir, CONFIG_NAME)
            if (self.run_dir / METRICS_NAME).is_file():
                read_metrics(self.run_dir)
        if self.dist.is_main and self.run_dir.is_dir():
            remove_stale_temporaries(self.run_dir)   # a kill -9 mid-save leaves .step_XXXXXXXX.pt.PID.RANDOM.tmp
            if (self.run_dir / SAMPLES_NAME).is_dir():
                remove_stale_temporaries(self.run_dir / SAMPLES_NAME)

    def write_config(self, extra: dict | None = None) -> None:
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.run_dir / CONFIG_NAME, {"stage": self.stage, "config": config_to_dict(self.cfg),
                                                           "world_size": self.dist.world_size, **(extra or {})})
        distributed.barrier()

    def describe(self) -> str:
        return f"{self.stage} config:\n{format_config(self.cfg)}"

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT ask for a checkpoint at the end of the current step, then a clean exit."""
        def request_stop(signum, frame):
            self.stop_requested = True

        self._previous_handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore_signal_handlers(self) -> None:
        for sig, handler in getattr(self, "_previous_handlers", {}).items():
            signal.signal(sig, handler)

    def end_of_step_consensus(self, step_was_finite: bool, step: int = 0) -> tuple[bool, bool]:
        """(stop, skip) for the step just computed (0-based `step`), agreed by all ranks in one all-reduce."""
        stop_at = getattr(self.cfg, "stop_at_step", 0)
        stop_now = self.stop_requested or (stop_at > 0 and step + 1 == stop_at)
        flags = torch.tensor([float(stop_now), float(not step_was_finite)], device=self.dist.device)
        if self.dist.is_distributed:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        stop, skip = bool(flags[0].item()), bool(flags[1].item())
        self.steps_this_start += 1
        self.steps_skipped_this_start += skip
        if skip:
            self.bad_steps_in_a_row += 1
            self.skipped_steps += 1
            if self.bad_steps_in_a_row >= self.cfg.max_bad_steps:
                raise RunError(f"{self.bad_steps_in_a_row} non-finite steps in a row (loss or gradients NaN/inf); "
                               f"stopping. Lower --lr, raise --warmup-steps, or resume from an earlier checkpoint "
                               f"in {self.run_dir}")
        else:
            self.bad_steps_in_a_row = 0
        return stop, skip

    def save(self, step: int, modules: dict[str, dict], extra: dict) -> Path | None:
        """Checkpoint on rank 0 (with every rank's RNG), refusing non-finite weights; barrier after.

        Under DDP every rank checks its replica and all must agree (checksums). Under --fsdp no rank holds a
        replica: `modules` is the full state gathered to rank 0 ({} elsewhere), rank 0 checks it and every rank
        takes its verdict, and `rank_checksums` holds that full state's one checksum."""
        if not all(distributed.all_gather_object(ckpt.all_finite(modules))):   # every rank raises together
            raise RunError(f"weights became non-finite at step {step}; no checkpoint written, "
                           f"the last good one in {self.run_dir} is kept")
        rng_states = distributed.all_gather_object(ckpt.capture_rng_state())
        checksums = distributed.all_gather_object(parameters_checksum(modules))
        if self.gathered_to_main:
            checksums = checksums[:1]
        elif len(set(checksums)) > 1:   # DDP keeps replicas equal; a difference means a real bug
            raise RunError(f"ranks hold different weights at step {step} (checksums {checksums}); not saving")
        path = None
        if self.dist.is_main:
            state = {"stage": self.stage, "step": step, "config": config_to_dict(self.cfg),
                     "world_size": self.dist.world_size, "rng": rng_states, "rank_checksums": checksums,
                     **modules, **extra}
            path = ckpt.save_checkpoint(self.run_dir, step, state, keep_last=self.cfg.keep_last,
                                        keep_every=self.cfg.keep_every)
        distributed.barrier()
        return path

    def is_due(self, step: int, every: int) -> bool:
        """Every `every` steps (0: never) and always at the last step."""
        return bool(every and step % every == 0) or step == self.cfg.max_steps

    def checkpoint_if_due(self, step: int, stop: bool, log, **extra: Any) -> None:
        """Save the tracked objects (plus `extra`) every --ckpt-every steps, at the end, and when a stop was requested."""
        if self.is_due(step, self.cfg.ckpt_every) or stop:
            networks = {name: network.state_dict() for name, network in self.networks.items()}
            others = {name: obj.state_dict() for name, obj in self.stateful.items()}
            path = self.save(step, networks, {**others, "skipped_steps": self.skipped_steps, **extra})
            if stop:
                log.print(f"stop requested: saved {path} at step {step}; rerun the same command to continue")

    def finish(self, loader, log) -> int:
        loader.close()
        log.close()
        self.restore_signal_handlers()
        if self.steps_this_start and self.steps_skipped_this_start == self.steps_this_start:
            raise RunError(f"all {self.steps_this_start} steps of this run were non-finite and skipped: it learnt "
                           f"nothing. Lower --lr, raise --warmup-steps, or check the data")
        return 0

    def restore(self, resume: dict) -> int:
        """Load every tracked object from its saved state and continue the RNG streams; returns the step.
        A crafted or mismatched state is one CheckpointError. Optimizers keep their moments but take this
        run's settings (betas, weight decay, Muon's scale), the ones config.json records."""
        for name, obj in {**self.networks, **self.stateful}.items():
            if isinstance(obj, torch.amp.GradScaler) and not (obj.is_enabled() and resume.get(name)):
                continue   # fp32/bf16 keep no scale; a run resumed in fp16 from another precision starts its own
            if not isinstance(resume.get(name), dict):
                raise ckpt.CheckpointError(f"{resume['path']}: {name} should hold a state dict; "
                                           "not a checkpoint of this project")
            try:
                state = resume[name]
                obj.load_state_dict(with_hyperparameters(state, obj) if hasattr(obj, "param_groups") else state)
            except ShardError:   # the reader's own message (other data) is already one line
                raise
            except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
                raise ckpt.CheckpointError(f"{resume['path']}: its {name!r} state does not fit this run "
                                           f"({first_line(err)})") from None
        skipped = resume.get("skipped_steps", 0)
        self.skipped_steps = skipped if isinstance(skipped, int) else 0
        self.restore_rng(resume)
        return resume["step"]

    def restore_rng(self, state: dict) -> None:
        """Same world size: each rank continues its own streams exactly; otherwise derive fresh ones."""
        saved = state["rng"]
        if len(saved) == self.dist.world_size:
            ckpt.restore_rng_state(saved[self.dist.rank])
        else:
            seed_everything(self.cfg.seed + 1000003 * state["step"] + self.dist.rank)


def with_hyperparameters(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A saved optimizer state whose parameter groups carry this run's settings (betas, weight decay, Muon's
    scale, fused): merged before loading, since load_state_dict places the step counters by the groups it
    loads (a CPU run's unfused counters would stay on the CPU for a fused CUDA step)."""
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        return saved   # load_state_dict says what does not fit
    fresh = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    return {**saved, "param_groups": [{**group, **settings} for group, settings in zip(groups, fresh)]}


def parameters_checksum(module_states: dict[str, dict]) -> str:
    """sha256 over every floating tensor except normalisation running statistics (rank-local)."""
    digest = hashlib.sha256()
    for name, state_dict in sorted(module_states.items()):
        for key, tensor in sorted(state_dict.items()):
            if torch.is_tensor(tensor) and tensor.is_floating_point() and "running_" not in key:
                digest.update(key.encode())
                # reshape(-1): logical order whatever the memory format (a channels_last 1x1 kernel has stride(-1) > 1)
                digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def summary_line(record: dict) -> str:
    return json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in record.items()})
