#!/usr/bin/env python
"""Attention processors of the DiffAE UNet: step time and peak memory, in one run.

Compares, on the same UNet, weights and inputs:

* ``eager`` -- diffusers ``AttnProcessor`` (explicit ``softmax(QK^T)V``), the baseline;
* ``sdpa`` -- diffusers ``AttnProcessor2_0`` (``torch.nn.functional.scaled_dot_product_attention``,
  our default);
* ``xformers`` -- ``enable_xformers_memory_efficient_attention()`` (only where it can run: CUDA
  and the xformers package; elsewhere it is reported as skipped).

For each processor it times a forward pass (inference, ``torch.no_grad``) and a training step
(forward + backward) and records peak memory: ``torch.cuda.max_memory_allocated`` on a GPU,
the peak resident-set growth of a fresh worker process on the CPU (each processor runs in its
own process so the numbers do not mix). Ratios are against ``eager`` measured in the same run;
the max |eps - eps_eager| confirms the processors compute the same function.

Presets: ``ffhq256`` is upstream's ``ffhq256_autoenc`` UNet (138 M parameters, 256x256,
attention at 16x16; the default on a GPU); ``cpu`` is a small UNet at 64x64 with attention at
32x32 and 16x16 (the default on a CPU, where the full model takes minutes per step).

Usage::

    python benchmarks/unet_attention.py                       # preset by device
    python benchmarks/unet_attention.py --preset ffhq256 --batch-size 8 --steps 10
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

PRESETS = {
    "ffhq256": dict(sample_size=256, batch_size=8),
    "cpu": dict(
        sample_size=64,
        model_channels=32,
        channel_mult=(1, 2, 2, 4),
        num_res_blocks=1,
        attention_resolutions=(32, 16),
        embed_channels=128,
        z_sem_channels=128,
        batch_size=4,
    ),
}
PROCESSORS = ("eager", "sdpa", "xformers")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(preset: str, processor: str, phase: str, steps: int, batch_size, device: str, dtype: str) -> dict:
    """Run in a worker process: time and peak memory of one processor in one phase.

    One process per (processor, phase) so that the CPU's peak RSS (which never goes down)
    belongs to that phase alone."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from ipl_diffusion.models import DiffAEUNetModel
    from ipl_diffusion.models.diffae_blocks import xformers_unavailable_reason

    config = dict(PRESETS[preset])
    batch = batch_size or config.pop("batch_size")
    config.pop("batch_size", None)
    torch.manual_seed(0)
    unet = DiffAEUNetModel(**config)
    with torch.no_grad():  # upstream zero-inits the output convs; give every layer real work
        for p in unet.parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(0.01)
    unet = unet.to(device=device, dtype=getattr(torch, dtype))
    if processor == "eager":
        unet.set_attn_processor(AttnProcessor())
    elif processor == "sdpa":
        unet.set_attn_processor(AttnProcessor2_0())
    else:
        reason = xformers_unavailable_reason()
        if reason:
            return {"processor": processor, "skipped": reason}
        unet.enable_xformers_memory_efficient_attention()

    size = config.get("sample_size", 256)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=generator).to(device, unet.dtype)
    z = torch.randn(batch, unet.config.z_sem_channels, generator=generator).to(device, unet.dtype)
    t = torch.randint(0, 1000, (batch,), generator=generator).to(device)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def forward():
        with torch.no_grad():
            return unet(x, t, z).sample

    def train_step():
        unet.zero_grad(set_to_none=True)
        unet(x, t, z).sample.float().square().mean().backward()

    fn = forward if phase == "forward" else train_step
    results = {"processor": processor, "batch": batch, "size": size}
    if phase == "forward":
        results["eps"] = forward().float().cpu().flatten()[:4096].tolist()  # to compare processors
    cpu_base = _rss_bytes()  # model, inputs and interpreter; the CPU peak is growth over this
    fn()  # warm-up (allocator, kernels)
    sync()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    results[f"{phase}_s"] = (time.perf_counter() - start) / steps
    if device.startswith("cuda"):
        results[f"{phase}_peak_mib"] = (torch.cuda.max_memory_allocated() - cuda_base) / 2**20
    else:  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        results[f"{phase}_peak_mib"] = max(0.0, peak - cpu_base) / 2**20
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="UNet size (default: by device)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed repetitions per phase (default 10 GPU, 2 CPU)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat all measurements, interleaved, and keep each one's minimum"
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="default: fp32 CPU, bf16 GPU")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        processor, phase = args.worker.split(":")
        print(json.dumps(measure(args.preset, processor, phase, args.steps, args.batch_size, args.device, args.dtype)))
        return 0

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = args.preset or ("ffhq256" if device.startswith("cuda") else "cpu")
    steps = args.steps or (10 if device.startswith("cuda") else 2)
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    print(f"DiffAE UNet attention processors: preset={preset} device={device} dtype={dtype} steps={steps}")
    if hasattr(os, "getloadavg"):  # timings on a shared machine: compare ratios, use --rounds
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    rows = {}
    for _ in range(max(1, args.rounds)):  # interleaved, so a burst of load on a shared machine hits all alike
        for processor in PROCESSORS:
            row = rows.setdefault(processor, {})
            if "skipped" in row:
                continue
            for phase in ("forward", "train_step"):
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"{processor}:{phase}", "--preset",
                       preset, "--steps", str(steps), "--device", device, "--dtype", dtype]
                if args.batch_size:
                    cmd += ["--batch-size", str(args.batch_size)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    row.update(skipped=f"worker failed: {done.stderr.strip()[-300:]}")
                    break
                new = json.loads(done.stdout.strip().splitlines()[-1])
                if "skipped" in new:
                    row.update(new)
                    break
                for key, value in new.items():
                    row[key] = min(row[key], value) if key.endswith(("_s", "_mib")) and key in row else value

    base = rows["eager"]
    if "skipped" in base:
        print(f"baseline failed: {base['skipped']}")
        return 1
    print(f"batch {base['batch']} x 3 x {base['size']} x {base['size']}")
    header = f"{'processor':<10} {'fwd ms':>9} {'x eager':>8} {'fwd MiB':>9} {'x eager':>8} {'train ms':>9} {'x eager':>8} {'train MiB':>10} {'x eager':>8} {'max|d eps|':>11}"
    print(header)
    print("-" * len(header))
    reference = torch.tensor(base["eps"])
    for processor, row in rows.items():
        if "skipped" in row:
            print(f"{processor:<10} skipped: {row['skipped']}")
            continue

        def ratio(key):
            return row[key] / base[key] if base[key] > 0 else float("nan")

        diff = (torch.tensor(row["eps"]) - reference).abs().max().item()
        print(
            f"{processor:<10} {row['forward_s'] * 1e3:9.1f} {ratio('forward_s'):8.2f} {row['forward_peak_mib']:9.1f} "
            f"{ratio('forward_peak_mib'):8.2f} {row['train_step_s'] * 1e3:9.1f} {ratio('train_step_s'):8.2f} "
            f"{row['train_step_peak_mib']:10.1f} {ratio('train_step_peak_mib'):8.2f} {diff:11.2e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
