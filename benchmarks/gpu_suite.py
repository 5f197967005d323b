#!/usr/bin/env python
"""GPU suite (< 8 minutes): Diff-IPL Stage 2 on the full-size 256² DiffAE, plus StyleGAN2 1024.

Random weights (timing and memory do not depend on them). Each case runs in its own Python
process -- accelerate's mixed-precision state is a per-process singleton, and a fresh process
gives a clean ``torch.cuda.max_memory_allocated`` -- and the parent prints one table:

* Stage 2 iteration (``num_train_steps`` = 6 DDIM steps, batch 1, full chain = DiffusionCLIP's
  original fine-tuning) in fp32 and bf16 autocast; per-step mode and gradient checkpointing
  in bf16; SDPA vs xformers attention when xformers imports;
* the achieved FLOP rate of the bf16 full-chain iteration (FLOPs counted once with
  ``torch.utils.flop_counter``) as a fraction of the GPU's dense bf16 peak (a table of known
  GPUs below, or ``--peak-tflops``);
* the StyleGAN2 1024 Stage-2 step from ``benchmarks/stylegan_step.py --size 1024``,
  when that script is present.

All ratios are against the fp32 full-chain case measured in the same run.

    python benchmarks/gpu_suite.py                 # on a GPU machine
    python benchmarks/gpu_suite.py --tiny          # CPU smoke test (tiny config, seconds)
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets, without sparsity).
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
    "B200": 2250.0,
}

CASES = [
    # name, mixed precision, gradient mode, gradient checkpointing, attention
    ("fp32 full_chain", "no", "full_chain", False, "sdpa"),
    ("bf16 full_chain", "bf16", "full_chain", False, "sdpa"),
    ("bf16 per_step", "bf16", "per_step", False, "sdpa"),
    ("bf16 full_chain+gc", "bf16", "full_chain", True, "sdpa"),
    ("bf16 full_chain xformers", "bf16", "full_chain", False, "xformers"),
]


def peak_tflops(device_name, override=None):
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


def run_case(args):
    """Child process: one case, prints one JSON line."""
    sys.path.insert(0, HERE)
    sys.path.insert(0, ROOT)
    import torch

    import stage2_memory as bench

    device = torch.device(args.device)
    result = {"case": args.case}
    if args.attention == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except Exception as err:  # not installed, or built for another torch
            print(json.dumps({**result, "skipped": f"xformers unavailable: {type(err).__name__}"}))
            return
    # The paper's ViT-B/32 image tower (random weights); a toy one for --tiny.
    clip = (bench.small_clip() if args.tiny else bench.small_clip(224, 768, 12, 32)).to(device)
    trainer = bench.build_trainer(
        "tiny" if args.tiny else "ffhq256", args.mode, args.gc, device, batch_size=args.batch_size, num_images=2,
        train_steps=args.train_steps, mixed_precision=args.mixed_precision, clip=clip, attention=args.attention,
    )
    seconds, peak, kind = bench.measure(trainer, args.repeats, warmup=2)
    result.update(seconds=seconds, peak_bytes=peak, memory=kind)
    if args.count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            trainer.train_step(list(range(args.batch_size)))
        result["flops"] = counter.get_total_flops()
    if device.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name(device)
    print(json.dumps(result))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config for a CPU smoke test")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU dense bf16 peak, if not in the table")
    parser.add_argument("--skip-stylegan", action="store_true")
    parser.add_argument("--case-timeout", type=int, default=150)
    # child-process options
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mixed-precision", default="no", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="full_chain", help=argparse.SUPPRESS)
    parser.add_argument("--gc", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--attention", default="sdpa", help=argparse.SUPPRESS)
    parser.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.case is not None:
        return run_case(args)

    started = time.perf_counter()
    rows = []
    cases = CASES if args.device.startswith("cuda") else [c for c in CASES if c[1] != "bf16" or args.tiny]
    for name, mp, mode, gc, attention in cases:
        command = [sys.executable, __file__, "--case", name, "--mixed-precision", mp, "--mode", mode,
                   "--attention", attention, "--device", args.device, "--batch-size", str(args.batch_size),
                   "--train-steps", str(args.train_steps), "--repeats", str(args.repeats)]
        command += ["--gc"] if gc else []
        command += ["--tiny"] if args.tiny else []
        command += ["--count-flops"] if name == "bf16 full_chain" else []
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.case_timeout, cwd=ROOT)
            line = [l for l in done.stdout.splitlines() if l.startswith("{")]
            rows.append(json.loads(line[-1]) if line else {"case": name, "error": done.stderr.strip().splitlines()[-1:]})
        except subprocess.TimeoutExpired:
            rows.append({"case": name, "error": f"timed out after {args.case_timeout}s"})
        print(f"[{time.perf_counter() - started:6.1f}s] {json.dumps(rows[-1])}", flush=True)

    base = next((r for r in rows if r.get("case") == "fp32 full_chain" and "seconds" in r), None)
    device_name = next((r["device_name"] for r in rows if "device_name" in r), args.device)
    print(f"\nDiff-IPL Stage 2, DiffAE {'tiny' if args.tiny else 'ffhq256 (256², 138 M UNet)'}, "
          f"{args.train_steps} DDIM training steps, batch {args.batch_size}, on {device_name}")
    print(f"{'case':<28}{'s/iter':>9}{'time x':>8}{'peak MiB':>11}{'mem x':>7}")
    for r in rows:
        if "seconds" not in r:
            print(f"{r['case']:<28}  {r.get('skipped') or r.get('error')}")
            continue
        t_ratio = r["seconds"] / base["seconds"] if base else float("nan")
        m_ratio = r["peak_bytes"] / base["peak_bytes"] if base else float("nan")
        print(f"{r['case']:<28}{r['seconds']:>9.3f}{t_ratio:>8.2f}{r['peak_bytes'] / 2**20:>11.0f}{m_ratio:>7.2f}")
    flops_row = next((r for r in rows if "flops" in r and "seconds" in r), None)
    if flops_row:
        achieved = flops_row["flops"] / flops_row["seconds"] / 1e12
        peak = peak_tflops(device_name, args.peak_tflops)
        fraction = f"{achieved / peak:.1%} of {peak:.0f} TFLOP/s bf16 peak" if peak else "peak unknown (--peak-tflops)"
        print(f"bf16 full chain: {flops_row['flops'] / 1e12:.2f} TFLOP per iteration, {achieved:.1f} TFLOP/s = {fraction}")

    stylegan = os.path.join(HERE, "stylegan_step.py")
    if not args.skip_stylegan and os.path.isfile(stylegan):
        size = "64" if args.tiny else "1024"
        command = [sys.executable, stylegan, "--size", size, "--device", args.device]
        print(f"\nStyleGAN2 {size} Stage 2 ({' '.join(command[1:])}):", flush=True)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT)
            print(done.stdout.strip() or done.stderr.strip()[-2000:])
        except subprocess.TimeoutExpired:
            print("timed out after 240 s")
    print(f"\ntotal wall time {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
