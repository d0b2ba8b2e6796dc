"""Train the embedded model zoo: the evaluation classifier and a class-conditional DiT on Fashion-MNIST.

Writes a diffusers pipeline directory that ``tide.models.load_backbone("fmnist-dit")`` reads:

    <out>/model_index.json
    <out>/transformer/   config.json + diffusion_pytorch_model.safetensors (EMA weights, float16)
    <out>/scheduler/     DDIMScheduler config (same betas as training, clip_sample=False)
    <out>/classifier/    EvalClassifier (config.json + model.safetensors)
    <out>/tide.json      class names, pixel scale, classifier path, dataset, training record

The DiT is an epsilon-prediction DDPM (1000 steps) with classifier-free-guidance label dropout to
the null id (= number of classes), trained on images scaled to [-1, 1] with AdamW and an EMA of
the weights. Only torch, diffusers, numpy and safetensors are needed (no transformer_lens).

    python experiments/train_embedded.py --device cuda --time-limit 8
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tide.eval.classifier import EvalClassifier  # noqa: E402
from tide.eval.fashion_mnist import CLASS_NAMES, DEFAULT_ROOT, load_fashion_mnist  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--steps", type=int, default=60000, help="DiT optimiser steps (upper bound with --time-limit)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="minutes of DiT training; the step count is fitted to it after a short timing")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema-decay", type=float, default=0.9995)
    p.add_argument("--p-uncond", type=float, default=0.1, help="label dropout to the null id (CFG)")
    p.add_argument("--width-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--beta-schedule", default="squaredcos_cap_v2")
    p.add_argument("--train-timesteps", type=int, default=1000)
    p.add_argument("--clf-epochs", type=int, default=20)
    p.add_argument("--clf-batch-size", type=int, default=256)
    p.add_argument("--clf-lr", type=float, default=2e-3)
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT for training")
    p.add_argument("--check-samples", type=int, default=50, help="samples per class for the final check")
    p.add_argument("--out", default=str(ROOT / "tide" / "assets" / "fmnist-dit"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=str(DEFAULT_ROOT))
    p.add_argument("--log-every", type=int, default=500)
    return p.parse_args(argv)


def warmup_cosine_lr(step: int, lr: float, warmup: int, planned: int) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then a cosine to 10% of it over the planned run."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, planned - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_float(images_u8: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(images_u8).to(device).float().div_(255).unsqueeze(1)


# --------------------------------------------------------------------------------- classifier
def random_shift(x_BCHW: torch.Tensor, max_shift: int = 2) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero fill)."""
    b, _, h, w = x_BCHW.shape
    pad = F.pad(x_BCHW, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), device=x_BCHW.device)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), device=x_BCHW.device)
    rows = (dy[:, None] + torch.arange(h, device=x_BCHW.device)[None])  # (B, H)
    cols = (dx[:, None] + torch.arange(w, device=x_BCHW.device)[None])  # (B, W)
    idx_b = torch.arange(b, device=x_BCHW.device)[:, None, None]
    return pad[idx_b, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def train_classifier(args, device, train_x, train_y, test_x, test_y) -> tuple[EvalClassifier, dict]:
    t0 = time.time()
    mean, std = float(train_x.mean()), float(train_x.std())
    clf = EvalClassifier(num_classes=10, class_names=CLASS_NAMES, mean=mean, std=std).to(device)
    opt = torch.optim.AdamW(clf.parameters(), lr=args.clf_lr, weight_decay=5e-4)
    n = train_x.shape[0]
    steps_per_epoch = n // args.clf_batch_size
    total = steps_per_epoch * args.clf_epochs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.clf_lr, total_steps=total, pct_start=0.15)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    clf.train()
    for epoch in range(args.clf_epochs):
        perm = torch.randperm(n, device=device, generator=gen)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * args.clf_batch_size:(i + 1) * args.clf_batch_size]
            x = random_shift(train_x[idx])
            loss = F.cross_entropy(clf(x), train_y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item() if i % 50 == 0 else 0.0
        acc = (clf.predict(test_x) == test_y.cpu()).float().mean().item()
        print(f"[classifier] epoch {epoch + 1}/{args.clf_epochs} loss~{running / math.ceil(steps_per_epoch / 50):.3f} "
              f"test acc {acc:.4f}", flush=True)
    pred = clf.predict(test_x)
    acc = (pred == test_y.cpu()).float().mean().item()
    per_class = {CLASS_NAMES[k]: (pred[test_y.cpu() == k] == k).float().mean().item() for k in range(10)}
    info = {"test_accuracy": acc, "per_class_test_accuracy": per_class, "epochs": args.clf_epochs,
            "batch_size": args.clf_batch_size, "lr": args.clf_lr, "optimizer": "AdamW(wd=5e-4), one-cycle",
            "augmentation": "random translation up to 2 px", "label_smoothing": 0.05,
            "train_images": int(n), "device": str(device), "wall_time_s": round(time.time() - t0, 1)}
    clf.info = info
    return clf.eval(), info


# --------------------------------------------------------------------------------- DiT
def build_dit(args):
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(
        num_attention_heads=args.width_heads, attention_head_dim=args.head_dim, in_channels=1, out_channels=1,
        num_layers=args.layers, sample_size=28, patch_size=args.patch_size, num_embeds_ada_norm=10,
        norm_type="ada_norm_zero")
    # DiT initialisation (Peebles & Xie): xavier linears, small embeddings, adaLN-Zero and the
    # output layer start at zero so every block begins as the identity.
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(mod.weight)
            if mod.bias is not None:
                torch.nn.init.zeros_(mod.bias)
    for block in model.transformer_blocks:
        emb = block.norm1.emb
        torch.nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        torch.nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        torch.nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
        # tide drops labels itself (to the null id) instead of the embedder doing it in train mode
        emb.class_embedder.dropout_prob = 0.0
    for lin in (model.proj_out_1, model.proj_out_2):
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
    return model


def make_scheduler(args, kind: str):
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(num_train_timesteps=args.train_timesteps, beta_schedule=args.beta_schedule,
                  prediction_type="epsilon", clip_sample=False)
    if kind == "ddpm":
        return DDPMScheduler(**common)
    # "leading" spacing starts 50-step sampling at t=980. With squaredcos_cap_v2 the last training
    # step has alpha_bar ~ 2e-9, where DDIM's x0 estimate divides the noise error by ~5e-5 and
    # blows up ("trailing" spacing starts there); at t=980 alpha_bar ~ 1e-3 and sampling is clean.
    return DDIMScheduler(**common, timestep_spacing="leading", set_alpha_to_one=True)


@torch.no_grad()
def ddim_sample(model, scheduler, labels_B, guidance: float, steps: int, seed: int, device) -> torch.Tensor:
    """Images in [0, 1] from a plain DDIM loop (a self-check; tide.sampling is the real sampler)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    b = labels_B.shape[0]
    x = torch.randn(b, 1, 28, 28, generator=gen).to(device)
    scheduler.set_timesteps(steps)
    null = torch.full_like(labels_B, 10)
    for t in scheduler.timesteps:
        if guidance != 1.0:
            inp, lab = torch.cat([x, x]), torch.cat([labels_B, null])
        else:
            inp, lab = x, labels_B
        eps = model(inp, timestep=t.to(device).expand(inp.shape[0]), class_labels=lab, return_dict=False)[0]
        if guidance != 1.0:
            e_c, e_u = eps.chunk(2)
            eps = e_u + guidance * (e_c - e_u)
        x = scheduler.step(eps, t, x).prev_sample
    return ((x.float() + 1) / 2).clamp(0, 1)


def train_dit(args, device, train_x, train_y):
    model = build_dit(args).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[dit] {n_params / 1e6:.2f}M parameters", flush=True)
    ddpm = make_scheduler(args, "ddpm")
    abar = ddpm.alphas_cumprod.to(device)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            betas=(0.9, 0.999), fused=fused)
    fwd = model
    compiled = False
    if args.compile:
        fwd = torch.compile(model)
        compiled = True
    use_bf16 = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    x_all = train_x * 2 - 1  # [-1, 1]
    n = x_all.shape[0]
    planned = args.steps
    deadline = time.time() + args.time_limit * 60 if args.time_limit else None
    ema_params = list(ema.parameters())
    params = list(model.parameters())
    losses, loss_acc, loss_cnt = [], torch.zeros((), device=device), 0
    t_start = time.time()
    t_mark = None
    step = 0
    model.train()

    def lr_at(s):
        return warmup_cosine_lr(s, args.lr, args.warmup, planned)

    while step < planned:
        idx = torch.randint(0, n, (args.batch_size,), device=device, generator=gen)
        x0 = x_all[idx]
        y = train_y[idx]
        drop = torch.rand(args.batch_size, device=device, generator=gen) < args.p_uncond
        y = torch.where(drop, torch.full_like(y, 10), y)
        t = torch.randint(0, args.train_timesteps, (args.batch_size,), device=device, generator=gen)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            try:
                pred = fwd(xt, timestep=t, class_labels=y, return_dict=False)[0]
            except Exception as exc:  # a compile failure falls back to eager
                if not compiled:
                    raise
                print(f"[dit] torch.compile failed ({type(exc).__name__}: {exc}); training eagerly", flush=True)
                fwd, compiled = model, False
                pred = fwd(xt, timestep=t, class_labels=y, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema_params, params, 1 - decay)
        loss_acc += loss.detach()
        loss_cnt += 1
        step += 1
        if deadline is not None and step == 300:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_mark = time.time()
        if deadline is not None and step == 800:
            if device.type == "cuda":
                torch.cuda.synchronize()
            rate = 500 / (time.time() - t_mark)
            planned = min(args.steps, step + int(rate * (deadline - time.time()) * 0.97))
            print(f"[dit] {rate:.1f} steps/s: planning {planned} steps for the time limit", flush=True)
        if step % args.log_every == 0 or step == planned:
            mean_loss = (loss_acc / loss_cnt).item()
            losses.append((step, mean_loss))
            loss_acc.zero_()
            loss_cnt = 0
            el = time.time() - t_start
            print(f"[dit] step {step}/{planned} loss {mean_loss:.4f} lr {lr_at(step):.2e} "
                  f"{step / el:.1f} it/s elapsed {el:.0f}s", flush=True)
        if deadline is not None and time.time() > deadline + 30:
            print("[dit] time limit reached", flush=True)
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.time() - t_start
    record = {"steps": step, "final_loss": losses[-1][1] if losses else None, "loss_curve": losses,
              "wall_time_s": round(wall, 1), "steps_per_s": round(step / wall, 2), "compiled": compiled,
              "parameters": n_params}
    return ema, record


def write_assets(out: Path, args, ema, clf, record) -> None:
    import diffusers

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / "model_index.json").write_text(json.dumps({
        "_class_name": "DiTPipeline", "_diffusers_version": diffusers.__version__,
        "transformer": ["diffusers", "DiTTransformer2DModel"],
        "scheduler": ["diffusers", "DDIMScheduler"]}, indent=2) + "\n")
    ema_cpu = copy.deepcopy(ema).cpu().to(torch.float16)
    ema_cpu.save_pretrained(tmp / "transformer", safe_serialization=True)
    make_scheduler(args, "ddim").save_pretrained(tmp / "scheduler")
    clf.cpu().save(tmp / "classifier")
    (tmp / "tide.json").write_text(json.dumps({
        "class_names": CLASS_NAMES, "pixel_scale": 1.0, "classifier": "classifier",
        "dataset": "Fashion-MNIST (Debian package dataset-fashion-mnist)",
        "training": record}, indent=2) + "\n")
    for f in tmp.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t0 = time.time()
    tr_x, tr_y = load_fashion_mnist("train", args.data_dir)
    te_x, te_y = load_fashion_mnist("test", args.data_dir)
    train_x, test_x = to_float(tr_x, device), to_float(te_x, device)
    train_y, test_y = torch.from_numpy(tr_y).long().to(device), torch.from_numpy(te_y).long().to(device)
    print(f"data: train {tuple(train_x.shape)} test {tuple(test_x.shape)} on {device}", flush=True)

    clf, clf_info = train_classifier(args, device, train_x, train_y, test_x, test_y)
    print(f"[classifier] test accuracy {clf_info['test_accuracy']:.4f}", flush=True)

    ema, dit_record = train_dit(args, device, train_x, train_y)

    # a quick self-check of the EMA model with a plain DDIM loop (50 steps)
    check = {}
    if args.check_samples > 0:
        ema_chk = ema.float().eval()
        ddim = make_scheduler(args, "ddim")
        labels = torch.arange(10, device=device).repeat_interleave(args.check_samples)
        for g in (1.0, 3.0):
            t1 = time.time()
            imgs = ddim_sample(ema_chk, ddim, labels, g, 50, args.seed, device)
            pred = clf.to(device).predict(imgs)
            agree = (pred == labels.cpu()).float()
            per = agree.view(10, -1).mean(1)
            check[f"guidance_{g:g}"] = {"agreement": agree.mean().item(),
                                        "per_class": {CLASS_NAMES[k]: per[k].item() for k in range(10)},
                                        "seconds": round(time.time() - t1, 1)}
            print(f"[check] guidance {g}: agreement {agree.mean():.4f}, worst class "
                  f"{CLASS_NAMES[int(per.argmin())]} {per.min():.3f}", flush=True)

    record = {
        "model": {"class": "DiTTransformer2DModel", "norm_type": "ada_norm_zero", "sample_size": 28,
                  "patch_size": args.patch_size, "tokens": (28 // args.patch_size) ** 2,
                  "num_layers": args.layers, "num_attention_heads": args.width_heads,
                  "attention_head_dim": args.head_dim, "d_model": args.width_heads * args.head_dim,
                  "num_embeds_ada_norm": 10, "null_class_id": 10, "parameters": dit_record["parameters"],
                  "stored_dtype": "float16 (EMA weights)"},
        "objective": "epsilon prediction, DDPM forward process, MSE loss, uniform timesteps",
        "num_train_timesteps": args.train_timesteps, "beta_schedule": args.beta_schedule,
        "sampling_scheduler": "DDIMScheduler(clip_sample=False, timestep_spacing='leading')",
        "pixel_range": "[-1, 1]", "cfg_label_dropout": args.p_uncond,
        "optimizer": {"name": "AdamW", "lr": args.lr, "betas": [0.9, 0.999], "weight_decay": args.weight_decay,
                      "warmup_steps": args.warmup, "schedule": "linear warmup, cosine to 10%",
                      "grad_clip": 1.0},
        "batch_size": args.batch_size, "ema_decay": args.ema_decay, "seed": args.seed,
        "max_steps": args.steps, "time_limit_min": args.time_limit,
        "mixed_precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, **{k: v for k, v in dit_record.items() if k != "parameters"},
        "classifier": {k: v for k, v in clf_info.items() if k != "per_class_test_accuracy"},
        "self_check_ddim50": check,
        "total_wall_time_s": round(time.time() - t0, 1),
    }
    out = Path(args.out)
    write_assets(out, args, ema, clf, record)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB) in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
