"""The whole pipeline on the built-in shapes dataset, each stage under torchrun (what `make demo` runs).

    python demo.py                 # ~9 minutes on 2 CPU cores; a rerun skips finished stages
    python demo.py --nproc 1 --out demo-small --vqgan-steps 50 --gpt-steps 50

Works offline: without VGG16 weights in the torch hub cache, the VQGAN trains without the perceptual
term (said in the output and in the run's config); with them, with LPIPS.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ARGS_NAME = "demo_args.json"   # what the outputs in --out were made with: a rerun's skip checks rely on it
# wall-clock minutes of a whole default demo on 2 idle cores of the README's machine
EXPECTED_MINUTES = 9


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo", help="folder for every output (default: demo)")
    parser.add_argument("--nproc", type=int, default=2, help="processes per stage under torchrun (default: 2)")
    parser.add_argument("--images", type=int, default=4000, help="built-in images (default: 4000)")
    parser.add_argument("--vqgan-steps", type=int, default=None, help="VQGAN steps (default: the tiny preset's)")
    parser.add_argument("--gpt-steps", type=int, default=None, help="GPT steps (default: the tiny preset's)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="the trainers' --precision (auto: fp32 on CPU, where bf16 does not speed up these "
                             "tiny models, bf16 on CUDA)")
    args = parser.parse_args(argv)
    for name in ("nproc", "images", "vqgan_steps", "gpt_steps"):   # 0 steps would fall back to the preset's
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def minutes_and_seconds(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


class DemoError(Exception):
    """A stage failed (its own script said why) or --out was made with other arguments: one line, not a traceback."""


STAGE_SECONDS: dict[str, float] = {}   # where this run's time went, printed at the end


def run_stage(title: str, command: list[str], done: bool) -> None:
    if done:
        print(f"== {title}: already done, skipped", flush=True)
        return
    print(f"== {title}\n   $ {' '.join(command)}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    start = time.perf_counter()
    code = subprocess.run(command, cwd=ROOT, env=env).returncode
    STAGE_SECONDS[title.split(" (")[0].strip()] = time.perf_counter() - start
    if code != 0:
        raise DemoError(f"stage '{title.strip()}' failed (exit status {code}); see its message above, "
                          "then rerun `python demo.py` (finished stages are skipped)")


def finished_run(run_dir: Path, max_steps: int | None) -> bool:
    """A run is finished when its latest checkpoint reached its configured step count."""
    from vqgpt.errors import RunError
    from vqgpt.runlog import read_run_config

    if not (run_dir / "latest").is_file():
        return False
    try:
        config = read_run_config(run_dir)
    except RunError:   # damaged: the stage runs, and its trainer refuses the folder in one line
        return False
    if config is None:
        return False
    target = max_steps or config.get("config", {}).get("max_steps")
    if not isinstance(target, int):
        return False
    return (run_dir / "latest").read_text().strip() == f"step_{target:08d}.pt"


def torchrun(nproc: int, script: str, *args: str) -> list[str]:
    if nproc <= 1:
        return [sys.executable, script, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]


def check_same_arguments(out: Path, args: argparse.Namespace) -> None:
    """Finished stages are skipped on a rerun, so a rerun with other sizes would mix outputs: refuse it."""
    from vqgpt.files import atomic_write_json

    wanted = {"images": args.images, "vqgan_steps": args.vqgan_steps, "gpt_steps": args.gpt_steps,
              "precision": args.precision}
    stamp = out / ARGS_NAME
    if stamp.is_file():
        try:
            made = json.loads(stamp.read_text())
        except ValueError:
            made = None
        if made != wanted:
            raise DemoError(f"{out} was made with {made}, this run asks for {wanted}; rerun with the same "
                            "arguments, or pass another --out (or delete it)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stamp, wanted)


def main(argv=None) -> int:
    try:
        return run_demo(parse_args(argv))
    except DemoError as err:
        print(f"demo: error: {err}", file=sys.stderr, flush=True)
        return 2


def run_demo(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT))
    from models.perceptual import find_vgg_weights

    started = time.perf_counter()
    out = Path(args.out)
    check_same_arguments(out, args)
    default_size = args.images == 4000 and args.vqgan_steps is None and args.gpt_steps is None and args.nproc == 2
    if default_size:
        print(f"demo: expected about {EXPECTED_MINUTES} minutes on 2 CPU cores like the README's "
              "(a rerun skips finished stages)", flush=True)
    shards, tokens = out / "data" / "shapes", out / "data" / "shapes-tokens"
    vqgan_run, gpt_run = out / "runs" / "vqgan", out / "runs" / "gpt"
    samples, figures = out / "samples", out / "plots"
    steps = lambda n: [f"--max-steps={n}"] if n else []   # noqa: E731

    run_stage("1/6 built-in dataset -> image shards",
              [sys.executable, "shardify.py", "--builtin", "shapes", str(shards), "--size", "32",
               "--builtin-count", str(args.images), "--val-count", str(max(1, min(200, args.images // 10)))],
              done=(shards / "manifest.json").exists())

    lpips_flags = []
    if find_vgg_weights(None) is None:
        # LPIPS on a random backbone measures no perception and was half of each VQGAN step (BENCHMARKS.md)
        print("   LPIPS: no vgg16-397923af.pth in the torch hub cache, so the demo's VQGAN trains WITHOUT the "
              "perceptual term (--perceptual-weight 0): L1 + GAN. Place the file there for the real loss.")
        lpips_flags = ["--perceptual-weight=0"]
    else:
        print("   LPIPS: pretrained VGG16 backbone found in the torch hub cache")
    precision = f"--precision={args.precision}"
    run_stage("2/6 VQGAN (preset tiny)",
              torchrun(args.nproc, "train_resnet_vqgan.py", "--preset=tiny", f"--data={shards}", f"--out={vqgan_run}",
                       precision,
                       "--batch-size=8" if args.nproc > 1 else "--batch-size=16", *lpips_flags, *steps(args.vqgan_steps)),
              done=finished_run(vqgan_run, args.vqgan_steps))
    run_stage("3/6 image shards -> token shards",
              torchrun(args.nproc, "image_quantizer.py", f"--vqgan={vqgan_run}", f"--data={shards}", f"--out={tokens}",
                       "--flip"),   # mirrored training images double the GPT's data: it overfits the 3,800 originals
              done=False)   # the quantizer itself skips shards that are already done
    run_stage("4/6 GPT (preset tiny)",
              torchrun(args.nproc, "train_gpt.py", "--preset=tiny", f"--tokens={tokens}", f"--out={gpt_run}", precision,
                       "--batch-size=16" if args.nproc > 1 else "--batch-size=32", *steps(args.gpt_steps)),
              done=finished_run(gpt_run, args.gpt_steps))
    sample = [sys.executable, "sample.py", f"--gpt={gpt_run}"]
    run_stage("5/6 samples: blind, class-conditional with guidance, top-half completion",
              [*sample, "--n=16", f"--out={samples / 'blind'}"], done=(samples / "blind" / "grid.png").exists())
    run_stage("    class 0 (circle), guidance 3", [*sample, "--n=16", "--class=0", "--cfg=3", f"--out={samples / 'class0'}"],
              done=(samples / "class0" / "grid.png").exists())
    run_stage("    class 3 (star), guidance 3", [*sample, "--n=16", "--class=3", "--cfg=3", f"--out={samples / 'class3'}"],
              done=(samples / "class3" / "grid.png").exists())
    run_stage("    completion of the top half", [*sample, "--n=8", f"--complete={shards}", "--keep-rows=4",
                                                  f"--out={samples / 'completion'}"],
              done=(samples / "completion" / "completion.png").exists())
    run_stage("6/6 plots", [sys.executable, "-m", "plots", str(vqgan_run), str(gpt_run), "--out", str(figures)],
              done=False)

    took = ", ".join(f"{name} {minutes_and_seconds(seconds)}" for name, seconds in STAGE_SECONDS.items())
    print(f"\nDone in {minutes_and_seconds(time.perf_counter() - started)}" + (f" ({took})" if took else "")
          + ". Outputs:")
    for label, path in [("image shards", shards), ("VQGAN run (checkpoints, metrics.jsonl, samples/)", vqgan_run),
                        ("token shards (+ codebook_usage.png)", tokens), ("GPT run", gpt_run),
                        ("blind samples", samples / "blind" / "grid.png"),
                        ("class-conditional samples", samples / "class0" / "grid.png"),
                        ("top-half completions", samples / "completion" / "completion.png"), ("plots", figures)]:
        print(f"  {label:52s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
