"""Peak training memory per method on one model and batch: the sparse tuner's memory claim, measured.

Each method runs in its own fresh process (so one method's allocations cannot hide another's): build the model,
apply the method, record the memory in use, run `--steps` optimizer steps, record the peak. The table reports
peak - baseline = what training adds (activations, gradients, optimizer state, transient copies). CPU: RSS and
ru_maxrss (page-granular, blurred by the allocator's free lists); CUDA (`--device cuda`): torch.cuda
memory_allocated / max_memory_allocated, exact to the tensor, with `--amp` for bf16 autocast.
Methods:
  full         every parameter trained (AdamW)
  probe        head only
  sparse       sensitune sparse-only plan (structured="none") at --budget
  spt-lora     sensitune SPT plan with LoRA-8 at --budget
  naive-sparse the same sparse plan, but with the effective weight SAVED for backward (what SPT's official code
               and peft's SHiRA do: a full weight copy per tuned matrix kept alive until backward)
  peft-lora    peft LoRA on the attention/MLP Linear layers (ViT) or 1x1 convs (CNN), rank chosen so its
               trainable count is nearest the sparse plan's (equal budget)
Run with MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ set (see the command in the results file) so glibc does
not return freed memory to the OS between steps and RSS peaks are comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("full", "probe", "sparse", "spt-lora", "naive-sparse", "peft-lora")  # "plans": internal step


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> dict:
    import timm
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    kw = {"img_size": args.img_size} if "vit" in args.model else {}
    model = timm.create_model(args.model, num_classes=10, **kw)
    dev = torch.device(args.device)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, 10, (args.batch,))
    method = args.method
    if method == "plans":  # measured once, in its own process, so no method's baseline includes it
        from spt_core.api import SPT_RULE, allocate, measure_sensitivity

        sens = measure_sensitivity(model, [(x[:4], y[:4])], batches=1)
        for structured in ("none", "lora"):
            plan = allocate(sens, args.budget, **{**SPT_RULE, "structured": structured})
            plan.save(Path(args.plan_dir) / f"{structured}.json")
        return {}
    if method in ("sparse", "spt-lora", "naive-sparse"):
        from spt_core.api import Plan, apply_plan

        plan = Plan.load(Path(args.plan_dir) / ("lora.json" if method == "spt-lora" else "none.json"))
        apply_plan(model, plan)
        if method == "naive-sparse":  # keep W' alive for backward, as SPT's official sparse layers do
            import spt_core.tuners.host as host

            host._make_pack = lambda h, live: lambda t: t
    elif method == "peft-lora":
        from peft import LoraConfig, get_peft_model

        from spt_core.api import Plan

        # rank chosen so the LoRA count is nearest the sparse plan's count (equal budget)
        targets = ["qkv", "proj", "fc1", "fc2"] if "vit" in args.model else ["conv_pw", "conv_pwl"]
        per_rank = sum(
            m.in_features + m.out_features
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in targets
        ) or sum(
            m.in_channels + m.out_channels
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d) and n.split(".")[-1] in targets
        )
        budget = Plan.load(Path(args.plan_dir) / "none.json").trainable
        rank = max(1, round(budget / per_rank))
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
        for n, p in model.named_parameters():
            if n.split(".")[-2] in ("head", "classifier"):
                p.requires_grad_(True)
    elif method == "probe":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.get_classifier().parameters():
            p.requires_grad_(True)
    model.to(dev).train()
    x, y = x.to(dev), y.to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    import gc

    gc.collect()
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev) / 2**20 if cuda else _rss_mb()

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # first step: optimizer state, autotuning; in the peak, not in the time
    if cuda:
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize(dev)
    step_s = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else _peak_mb()
    frozen_grads = sum(1 for p in model.parameters() if not p.requires_grad and p.grad is not None)
    return {
        "method": method if method != "peft-lora" else f"peft-lora (r={rank})",
        "trainable": sum(p.numel() for p in params),
        "baseline_mb": round(base, 1),
        "peak_mb": round(peak, 1),
        "train_overhead_mb": round(peak - base, 1),
        "step_s": round(step_s, 4),
        "frozen_with_grad": frozen_grads,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--budget", default="1%")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu (peak RSS) | cuda (max_memory_allocated)")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast for the forward (as TrainConfig.amp)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/memory.md"))
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--plan-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method:
        print(json.dumps(child(args)))
        return
    rows = []
    plan_dir = tempfile.mkdtemp(prefix="sensitune-memory-")
    for m in ["plans", *args.methods]:
        cmd = [sys.executable, __file__, "--method", m, "--model", args.model, "--img-size", str(args.img_size),
               "--batch", str(args.batch), "--budget", args.budget, "--steps", str(args.steps),
               "--threads", str(args.threads), "--plan-dir", plan_dir, "--device", args.device]  # fmt: skip
        cmd += ["--amp"] if args.amp else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        if m != "plans":
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    full = next((r for r in rows if r["method"] == "full"), None)
    peft = next((r for r in rows if r["method"].startswith("peft-lora")), None)
    command = "MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 " + " ".join(
        ["python benchmarks/memory.py", *sys.argv[1:]]
    )
    if args.device.startswith("cuda"):
        import torch

        machine = (f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
                   f"{'bf16 autocast' if args.amp else 'fp32'} (torch.cuda.max_memory_allocated")  # fmt: skip
        peak_name = "peak CUDA MB"
    else:
        cpu = platform.processor() or platform.machine()
        machine = f"{cpu}, {os.cpu_count()} cores, {args.threads} threads, CPU (peak RSS"
        peak_name = "peak RSS MB"
    lines = [
        f"# Training memory per method: {args.model} @ {args.img_size}px, batch {args.batch}, budget {args.budget}",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine}, each method in a fresh process), 1 + {args.steps} AdamW steps (the first untimed).",
        "",
        f"| method | trainable | train overhead MB | × full FT | × peft LoRA | {peak_name} | s/step "
        "| frozen w/ .grad |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['train_overhead_mb'] / full['train_overhead_mb']:.2f}" if full else "-"
        ratio_p = f"{r['train_overhead_mb'] / peft['train_overhead_mb']:.2f}" if peft else "-"
        lines.append(
            f"| {r['method']} | {r['trainable']:,} | {r['train_overhead_mb']:.0f} | {ratio} | {ratio_p} | "
            f"{r['peak_mb']:.0f} | {r['step_s']:.3g} | {r['frozen_with_grad']} |"
        )
    lines += [
        "",
        "train overhead = peak memory during training - memory after building the model and batch (activations, "
        "gradients, optimizer state, transient weight copies). `naive-sparse` keeps the effective weight alive "
        "for backward, as the official SPT code does; `sparse` is sensitune's tuner (rebuilt on demand).",
    ]
    from spt_core.portable.io import write_bytes  # atomic: a killed run leaves the old table

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(args.out, ("\n".join(lines) + "\n").encode())
    print(args.out.read_text())


if __name__ == "__main__":
    main()
