"""Train ``fmnist-pixart``: a tiny PixArt (adaLN-single for the timestep, cross-attention to caption
tokens) on Fashion-MNIST, with a vocabulary text encoder trained jointly.

Writes a diffusers pipeline directory that ``tide.models.load_backbone("fmnist-pixart")`` reads and
that ``diffusers.PixArtSigmaPipeline.from_pretrained`` loads too (no VAE: it works in pixel space):

    <out>/model_index.json
    <out>/transformer/   PixArtTransformer2DModel (EMA weights, float16)
    <out>/scheduler/     DPMSolverMultistepScheduler (PixArt's: linear betas, DPM-Solver++ order 2)
    <out>/text_encoder/  the vocabulary (vocab.json) and its embedding table (model.safetensors)
    <out>/prompt_embeds.safetensors   the ten bare class prompts (condition ids 0-9) and the null caption
    <out>/classifier/    the evaluation classifier (copied from fmnist-dit: the judge is shared)
    <out>/tide.json      class names, guidance, training record

Captions: each training image gets its class word (85% of the time) and each attribute word it was
labelled with (brightness dark/light, size small/large; per-class tertiles, see
tide.eval.attributes) with probability 1/2 each; 10% of captions are dropped to the null caption
(the empty prompt) for classifier-free guidance. The model is an epsilon-prediction DDPM with
PixArt's linear schedule.

    python experiments/train_fmnist_pixart.py --time-limit 36          # 2 CPU cores (the shipped model), in the background
    python experiments/train_fmnist_pixart.py --device cuda --time-limit 8
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tide.eval.attributes import WORDS, AttributeThresholds  # noqa: E402
from tide.eval.classifier import EvalClassifier  # noqa: E402
from tide.eval.fashion_mnist import CLASS_NAMES, DEFAULT_ROOT, load_fashion_mnist  # noqa: E402
from tide.models.vocabulary import Vocabulary  # noqa: E402
from train_embedded import pick_device, warmup_cosine_lr  # noqa: E402  (experiments/ is on sys.path when run as a script)

CLASS_WORDS = [n.lower() for n in CLASS_NAMES]
ALIASES = {"t-shirt": "t-shirt/top", "tshirt": "t-shirt/top", "top": "t-shirt/top", "trousers": "trouser",
           "pants": "trouser", "sweater": "pullover", "sandals": "sandal", "sneakers": "sneaker",
           "boot": "ankle boot", "ankle-boot": "ankle boot", "handbag": "bag", "bright": "light",
           "big": "large"}
GROUPS = list(WORDS)  # brightness, size
CAPTION_TOKENS = 1 + len(GROUPS) + 1  # class + attributes + end


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument("--steps", type=int, default=60000, help="optimiser steps (upper bound with --time-limit)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="minutes of training; the step count is fitted to it after a short timing")
    p.add_argument("--batch-size", type=int, default=96)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--min-snr-gamma", type=float, default=5.0,
                   help="Min-SNR loss weighting min(SNR, gamma)/SNR (Hang et al. 2023); 0 = plain MSE")
    p.add_argument("--p-null", type=float, default=0.1, help="caption dropout to the null caption (CFG)")
    p.add_argument("--p-class", type=float, default=0.85, help="probability a caption names the class")
    p.add_argument("--p-attribute", type=float, default=0.5, help="probability a caption names each labelled attribute")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--caption-channels", type=int, default=32)
    p.add_argument("--max-length", type=int, default=6, help="caption tokens a prompt may use at inference")
    p.add_argument("--guidance", type=float, default=3.0, help="default guidance scale written to tide.json")
    p.add_argument("--check-samples", type=int, default=20, help="samples per class for the final self-check")
    p.add_argument("--classifier", default=str(ROOT / "tide" / "assets" / "fmnist-dit" / "classifier"))
    p.add_argument("--out", default=str(ROOT / "tide" / "assets" / "fmnist-pixart"))
    p.add_argument("--init-from", default=None,
                   help="continue from a written model directory (its EMA weights and vocabulary table)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--data-dir", default=str(DEFAULT_ROOT))
    p.add_argument("--log-every", type=int, default=100)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------- model
def build_transformer(args):
    from diffusers import PixArtTransformer2DModel

    d = args.heads * args.head_dim
    model = PixArtTransformer2DModel(
        num_attention_heads=args.heads, attention_head_dim=args.head_dim, in_channels=1, out_channels=1,
        num_layers=args.layers, sample_size=28, patch_size=args.patch_size, cross_attention_dim=d,
        caption_channels=args.caption_channels, norm_type="ada_norm_single", norm_elementwise_affine=False,
        norm_eps=1e-6, attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        use_additional_conditions=False)
    # PixArt's initialisation: xavier linears, small timestep MLPs, zero cross-attention output and
    # zero final projection so every block starts near the identity.
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            nn.init.xavier_uniform_(mod.weight)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
    for lin in (model.adaln_single.emb.timestep_embedder.linear_1, model.adaln_single.emb.timestep_embedder.linear_2,
                model.adaln_single.linear):
        nn.init.normal_(lin.weight, std=0.02)
    for block in model.transformer_blocks:
        nn.init.zeros_(block.attn2.to_out[0].weight)
        nn.init.zeros_(block.attn2.to_out[0].bias)
    nn.init.zeros_(model.proj_out.weight)
    nn.init.zeros_(model.proj_out.bias)
    return model


def make_scheduler(kind: str):
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    common = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                  prediction_type="epsilon")
    if kind == "ddpm":
        return DDPMScheduler(**common, clip_sample=False)
    return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                       lower_order_final=True)


class Captioner(nn.Module):
    """The trainable text encoder: one embedding row per word and the end token (Vocabulary's table)."""

    def __init__(self, num_words: int, channels: int):
        super().__init__()
        self.table = nn.Embedding(num_words + 1, channels)
        nn.init.normal_(self.table.weight, std=1.0)

    def forward(self, ids_BL, mask_BL):
        return self.table(ids_BL) * mask_BL[..., None].to(self.table.weight.dtype)


def caption_ids(labels_B, attr_words: dict[str, torch.Tensor], word_index: dict[str, int], args, gen):
    """(B, CAPTION_TOKENS) token ids and mask: [class?, brightness?, size?] compacted to the front, then <end>."""
    b, device = labels_B.shape[0], labels_B.device
    end = len(word_index)
    class_ids = torch.tensor([word_index[w] for w in CLASS_WORDS], device=device)[labels_B]
    cand, present = [class_ids], [torch.rand(b, device=device, generator=gen) < args.p_class]
    for group in GROUPS:
        lo, hi = (word_index[w] for w in WORDS[group])
        w = attr_words[group]
        cand.append(torch.where(w == 1, hi, lo))
        present.append((w >= 0) & (torch.rand(b, device=device, generator=gen) < args.p_attribute))
    cand_BK, present_BK = torch.stack(cand, 1), torch.stack(present, 1)
    null = torch.rand(b, device=device, generator=gen) < args.p_null
    present_BK &= ~null[:, None]
    order = torch.argsort((~present_BK).int(), dim=1, stable=True)
    cand_BK, present_BK = cand_BK.gather(1, order), present_BK.gather(1, order)
    n_B = present_BK.sum(1)
    ids = torch.full((b, CAPTION_TOKENS), end, device=device)
    ids[:, :cand_BK.shape[1]] = torch.where(present_BK, cand_BK, end)
    mask = (torch.arange(CAPTION_TOKENS, device=device)[None] <= n_B[:, None]).long()
    return ids, mask


@torch.no_grad()
def sample(model, encode, prompts, guidance: float, steps: int, seed: int, device):
    """Images in [0, 1] from a plain DPM-Solver loop (a self-check; tide.sampling is the real sampler).
    ``encode`` is :meth:`Vocabulary.encode`."""
    embeds, mask = encode(prompts)
    null_e, null_m = encode([""])
    b = len(prompts)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(b, 1, 28, 28, generator=gen).to(device)
    sched = make_scheduler("dpm")
    sched.set_timesteps(steps)
    e = torch.cat([embeds, null_e.expand(b, -1, -1)]).to(device)
    m = torch.cat([mask, null_m.expand(b, -1)]).to(device)
    for t in sched.timesteps:
        out = model(torch.cat([x, x]), encoder_hidden_states=e, encoder_attention_mask=m,
                    timestep=t.to(device).expand(2 * b), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                    return_dict=False)[0]
        c, u = out.chunk(2)
        x = sched.step(u + guidance * (c - u), t, x).prev_sample
    return ((x.float() + 1) / 2).clamp(0, 1).cpu()


def train(args, device, train_x, train_y, attr_words, word_index):
    model = build_transformer(args).to(device)
    captioner = Captioner(len(word_index), args.caption_channels).to(device)
    if args.init_from:
        from diffusers import PixArtTransformer2DModel

        init = Path(args.init_from)
        model.load_state_dict(PixArtTransformer2DModel.from_pretrained(init / "transformer").float().state_dict())
        table = Vocabulary.load(init / "text_encoder").embeddings_VC
        captioner.table.weight.data.copy_(table)
        print(f"[pixart] initialised from {init}", flush=True)
    params = list(model.parameters()) + list(captioner.parameters())
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    ema_table = captioner.table.weight.detach().clone()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[pixart] {n_params / 1e6:.2f}M parameters, {model.config.num_layers} blocks, "
          f"{(28 // args.patch_size) ** 2} tokens", flush=True)
    abar = make_scheduler("ddpm").alphas_cumprod.to(device)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.999))
    use_bf16 = device.type == "cuda"
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    x_all = train_x * 2 - 1
    n = x_all.shape[0]
    planned = args.steps
    deadline = time.time() + args.time_limit * 60 if args.time_limit else None
    ema_params = list(ema.parameters())
    model_params = list(model.parameters())
    losses, loss_acc, loss_cnt = [], 0.0, 0
    t_start = time.time()
    t_mark = None
    step = 0
    model.train()

    def lr_at(s):
        return warmup_cosine_lr(s, args.lr, args.warmup, planned)

    while step < planned:
        idx = torch.randint(0, n, (args.batch_size,), device=device, generator=gen)
        x0, y = x_all[idx], train_y[idx]
        ids, mask = caption_ids(y, {g: w[idx] for g, w in attr_words.items()}, word_index, args, gen)
        t = torch.randint(0, 1000, (args.batch_size,), device=device, generator=gen)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            pred = model(xt, encoder_hidden_states=captioner(ids, mask), encoder_attention_mask=mask, timestep=t,
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        if args.min_snr_gamma > 0:
            snr = abar[t] / (1 - abar[t])
            weight = snr.clamp(max=args.min_snr_gamma) / snr
            loss = ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3)).mul(weight).mean()
        else:
            loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema_params, model_params, 1 - decay)
        ema_table.lerp_(captioner.table.weight.detach(), 1 - decay)
        loss_acc += loss.item()
        loss_cnt += 1
        step += 1
        if deadline is not None and step == 30:
            t_mark = time.time()
        if deadline is not None and step == 130:
            rate = 100 / (time.time() - t_mark)
            planned = min(args.steps, step + int(rate * (deadline - time.time()) * 0.97))
            print(f"[pixart] {rate:.2f} steps/s: planning {planned} steps for the time limit", flush=True)
        if step % args.log_every == 0 or step == planned:
            losses.append((step, loss_acc / loss_cnt))
            loss_acc, loss_cnt = 0.0, 0
            el = time.time() - t_start
            print(f"[pixart] step {step}/{planned} loss {losses[-1][1]:.4f} lr {lr_at(step):.2e} "
                  f"{step / el:.2f} it/s elapsed {el:.0f}s", flush=True)
        if deadline is not None and time.time() > deadline + 30:
            print("[pixart] time limit reached", flush=True)
            break
    wall = time.time() - t_start
    record = {"steps": step, "final_loss": losses[-1][1] if losses else None, "loss_curve": losses,
              "wall_time_s": round(wall, 1), "steps_per_s": round(step / wall, 3), "parameters": n_params,
              "images_seen": step * args.batch_size, "epochs": round(step * args.batch_size / n, 2)}
    return ema, ema_table, record


def write_assets(out: Path, args, ema, vocab: Vocabulary, record) -> None:
    import diffusers

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / "model_index.json").write_text(json.dumps({
        "_class_name": "PixArtSigmaPipeline", "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "text_encoder": [None, None],
        "tokenizer": [None, None], "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "vae": [None, None]}, indent=2) + "\n")
    copy.deepcopy(ema).cpu().to(torch.float16).save_pretrained(tmp / "transformer", safe_serialization=True)
    make_scheduler("dpm").save_pretrained(tmp / "scheduler")
    vocab.save(tmp / "text_encoder")
    vocab.prompt_bank(CLASS_WORDS).save(tmp / "prompt_embeds.safetensors")
    shutil.copytree(args.classifier, tmp / "classifier")
    (tmp / "tide.json").write_text(json.dumps({
        "class_names": CLASS_NAMES, "pixel_scale": 1.0, "guidance_scale": args.guidance,
        "classifier": "classifier", "text_encoder": "text_encoder",
        "dataset": "Fashion-MNIST (Debian package dataset-fashion-mnist)",
        "conditions": "ids 0-9 are the bare class prompts in class order; the null caption is the empty prompt",
        "training": record}, indent=2) + "\n")
    for f in tmp.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    t0 = time.time()
    tr_x, tr_y = load_fashion_mnist("train", args.data_dir)
    train_x = torch.from_numpy(tr_x).float().div_(255).unsqueeze(1)
    train_y = torch.from_numpy(tr_y).long()
    thresholds = AttributeThresholds.fit(train_x, train_y, len(CLASS_NAMES))
    attr_words = thresholds.label(train_x, train_y)
    words = CLASS_WORDS + [w for g in GROUPS for w in WORDS[g]]
    word_index = {w: i for i, w in enumerate(words)}
    print(f"data: train {tuple(train_x.shape)}; labelled: " + ", ".join(
        f"{g} {(attr_words[g] >= 0).float().mean():.2f}" for g in GROUPS), flush=True)

    ema, table, record = train(args, device, train_x.to(device), train_y.to(device),
                               {g: w.to(device) for g, w in attr_words.items()}, word_index)
    vocab = Vocabulary(words=words, embeddings_VC=table.float().cpu(), max_length=args.max_length,
                       aliases=ALIASES, groups={"class": CLASS_WORDS, **{g: list(WORDS[g]) for g in GROUPS}},
                       attributes=thresholds.to_dict())

    check = {}
    if args.check_samples > 0:
        clf = EvalClassifier.load(args.classifier)
        model = ema.float().eval()
        prompts = [w for w in CLASS_WORDS for _ in range(args.check_samples)]
        labels = torch.arange(10).repeat_interleave(args.check_samples)
        for g in (1.0, args.guidance):
            t1 = time.time()
            imgs = sample(model, vocab.encode, prompts, g, 20, args.seed, device)
            agree = (clf.predict(imgs) == labels).float()
            per = agree.view(10, -1).mean(1)
            check[f"guidance_{g:g}"] = {"agreement": agree.mean().item(),
                                        "per_class": {CLASS_NAMES[k]: per[k].item() for k in range(10)},
                                        "seconds": round(time.time() - t1, 1)}
            print(f"[check] guidance {g}: agreement {agree.mean():.4f}, worst class "
                  f"{CLASS_NAMES[int(per.argmin())]} {per.min():.3f}", flush=True)

    record = {
        "model": {"class": "PixArtTransformer2DModel", "norm_type": "ada_norm_single", "sample_size": 28,
                  "patch_size": args.patch_size, "tokens": (28 // args.patch_size) ** 2, "num_layers": args.layers,
                  "num_attention_heads": args.heads, "attention_head_dim": args.head_dim,
                  "d_model": args.heads * args.head_dim, "caption_channels": args.caption_channels,
                  "parameters": record["parameters"], "stored_dtype": "float16 (EMA weights)"},
        "text_encoder": {"words": words, "max_length": args.max_length, "caption_dropout": args.p_null,
                         "p_class": args.p_class, "p_attribute": args.p_attribute,
                         "attribute_labels": "per-class tertiles of ink brightness and ink bounding-box area"},
        "objective": "epsilon prediction, DDPM forward process (linear betas 1e-4..0.02), uniform timesteps, MSE"
                     + (f" weighted by min(SNR, {args.min_snr_gamma:g})/SNR" if args.min_snr_gamma > 0 else ""),
        "sampling_scheduler": "DPMSolverMultistepScheduler(dpmsolver++, order 2)",
        "pixel_range": "[-1, 1]",
        "optimizer": {"name": "AdamW", "lr": args.lr, "warmup_steps": args.warmup,
                      "schedule": "linear warmup, cosine to 10%", "grad_clip": 1.0},
        "batch_size": args.batch_size, "ema_decay": args.ema_decay, "seed": args.seed,
        "time_limit_min": args.time_limit, "init_from": args.init_from, "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, **{k: v for k, v in record.items() if k != "parameters"},
        "self_check_dpm20": check, "total_wall_time_s": round(time.time() - t0, 1),
    }
    if args.init_from:  # the run this one continued, so the record covers the whole training
        record["previous_training"] = json.loads((Path(args.init_from) / "tide.json").read_text()).get("training")
    out = Path(args.out)
    write_assets(out, args, ema, vocab, record)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.2f} MB) in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
