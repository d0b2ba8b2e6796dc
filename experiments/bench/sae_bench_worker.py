"""One implementation's TopK SAE training step, timed on command (spawned by sae_bench.py).

Reads one JSON command per line on stdin ({"aux": bool, "warmup": n, "steps": n}) and answers one JSON
line on stdout with the wall time of each timed step. Self-contained apart from the implementation
under test, so that it runs in the project's environment (tide, naive, matmul) or in the separate
benchmark environment (sae_lens, sparsify).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from importlib import metadata


def versions(*names: str) -> dict:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def make_data(torch, d: int, f: int, batch: int, dead_fraction: float, device, n_batches: int = 4):
    """The same rows and dead latents in every process (same seed, same torch version)."""
    g = torch.Generator().manual_seed(0)
    scale = 1.0 + torch.rand(d, generator=g) * 3.0  # anisotropic, like real activations
    xs = [(torch.randn(batch, d, generator=g) * scale + 0.5).to(device) for _ in range(n_batches)]
    dead = torch.zeros(f, dtype=torch.bool)
    dead[torch.randperm(f, generator=g)[: int(round(dead_fraction * f))]] = True
    return xs, dead.to(device)


# ---------------------------------------------------------------------------------------------- implementations
def tide_impl(torch, a, xs, dead, aux_row_stride=None):
    from tide.sae import SAE, SAEConfig
    from tide.train import TrainConfig
    from tide.train.objective import make_optimizer, train_step

    stride = TrainConfig.aux_row_stride if aux_row_stride is None else aux_row_stride
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=a.d, d_sae=a.f, k=a.k, sparsity="topk", conditioning="none", normalization="none")).to(a.device)
    opt = make_optimizer(sae.parameters(), 1e-4)
    t_B = torch.zeros(a.batch, device=a.device)
    dead_NF = dead[None]

    def step(x, aux: bool):
        train_step(sae, opt, x, t_B, dead_NF if aux else None, k_aux=a.k_aux, aux_coefficient=1 / 32,
                   aux_row_stride=stride)

    return step, {"k_aux": a.k_aux, "aux_coefficient": 1 / 32, "aux_row_stride": stride,
                  "optimizer": f"torch.optim.Adam (fused={bool(opt.defaults['fused'])})",
                  "step": "tide.train.objective.train_step (the trainer's step)"}


def naive_impl(torch, a, xs, dead):
    """Dense PyTorch TopK SAE: dense (B, F) codes, dense decode z @ W_dec, autograd for everything."""
    torch.manual_seed(0)
    W_dec = torch.randn(a.f, a.d, device=a.device)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    W_dec = torch.nn.Parameter(W_dec)
    W_enc = torch.nn.Parameter(W_dec.detach().clone())
    b_enc = torch.nn.Parameter(torch.zeros(a.f, device=a.device))
    b_dec = torch.nn.Parameter(torch.zeros(a.d, device=a.device))
    params = [W_enc, b_enc, W_dec, b_dec]
    opt = torch.optim.Adam(params, lr=1e-4)
    k_aux = a.k_aux

    def step(x, aux: bool):
        opt.zero_grad(set_to_none=True)
        pre = (x - b_dec) @ W_enc.T + b_enc
        vals, idx = pre.topk(a.k, dim=-1, sorted=False)
        z = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        x_hat = z @ W_dec + b_dec
        total_var = (x - x.mean(0)).pow(2).sum()
        loss = (x_hat - x).pow(2).sum() / total_var
        if aux:
            residual = (x - x_hat).detach()
            v, i = pre.masked_fill(~dead, float("-inf")).topk(min(k_aux, int(dead.sum())), dim=-1, sorted=False)
            e_hat = torch.zeros_like(pre).scatter(-1, i, torch.relu(v)) @ W_dec
            loss = loss + (e_hat - residual).pow(2).sum() / total_var / 32
        loss.backward()
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(-1, keepdim=True) * W_dec
        opt.step()
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=-1, keepdim=True))

    return step, {"k_aux": k_aux, "aux_coefficient": 1 / 32, "optimizer": "torch.optim.Adam"}


def sparsify_impl(torch, a, xs, dead):
    """EleutherAI sparsify's SparseCoder, stepped as its Trainer.fit does for the fvu loss (Adam)."""
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints which decoder it uses
        from sparsify import SparseCoder, SparseCoderConfig
    torch.manual_seed(0)
    sae = SparseCoder(a.d, SparseCoderConfig(num_latents=a.f, k=a.k), device=a.device, dtype=torch.float32)
    lr = 2e-4 / (sae.num_latents / (2**14)) ** 0.5  # its Adam default
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    did_fire = torch.zeros(a.f, dtype=torch.bool, device=a.device)
    auxk_alpha = 1 / 32

    def step(x, aux: bool):
        # Trainer.fit, one step, grad_acc_steps = micro_acc_steps = 1, loss_fn = "fvu", autoencoding
        sae.set_decoder_norm_to_unit_norm()
        dead_mask = dead if aux else None  # Trainer passes dead_mask only when auxk_alpha > 0
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=dead_mask, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        loss = out.fvu + (auxk_alpha if aux else 0.0) * out.auxk_loss + out.multi_topk_fvu / 8
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        did_fire.zero_()

    return step, {"k_aux": a.d // 2, "aux_coefficient": auxk_alpha, "optimizer": "torch.optim.Adam",
                  "decoder": "F.embedding_bag (its CPU path)", "step": "sparsify.Trainer.fit body, fvu loss",
                  "note": "sparsify's fused encoder ignores the gradient of pre_acts, so AuxK trains only W_dec"}


def saelens_impl(torch, a, xs, dead, sparse: bool = False):
    """SAELens's TopKTrainingSAE, stepped by SAETrainer.step (forward, aux loss, backward, clip, Adam)."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    # sparse activations fail in backward together with the default rescale_acts_by_decoder_norm=True
    # (a view of a sparse tensor), so the sparse variant turns the rescaling off
    cfg = TopKTrainingSAEConfig(d_in=a.d, d_sae=a.f, k=a.k, device=str(a.device), dtype="float32",
                                use_sparse_activations=sparse, rescale_acts_by_decoder_norm=not sparse)
    sae = TopKTrainingSAE(cfg)
    tcfg = SAETrainerConfig(total_training_samples=10**9, train_batch_size_samples=a.batch, lr=3e-4, lr_end=3e-4,
                            device=str(a.device), logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=iter(()))
    window = tcfg.dead_feature_window

    def step(x, aux: bool):
        # AuxK runs when the trainer's dead-neuron mask is non-empty: set the bookkeeping that defines it
        with torch.no_grad():
            trainer.n_forward_passes_since_fired.copy_(dead.float() * (window + 1) if aux else torch.zeros_like(dead, dtype=torch.float))
        trainer.step(x)
        trainer.n_training_steps += 1

    return step, {"k_aux": a.d // 2, "aux_coefficient": cfg.aux_loss_coefficient, "optimizer": "torch.optim.Adam (SAETrainer)",
                  "use_sparse_activations": sparse, "rescale_acts_by_decoder_norm": cfg.rescale_acts_by_decoder_norm,
                  "step": "sae_lens SAETrainer.step (includes clip_grad_norm_ and the dead-neuron bookkeeping)"}


def matmul_impl(torch, a, xs, dead):
    """The encoder's dense product alone (no bias), into a preallocated output: the roofline."""
    W = torch.randn(a.f, a.d, device=a.device)
    out = torch.empty(a.batch, a.f, device=a.device)

    def step(x, aux: bool):
        torch.mm(x, W.T, out=out)

    return step, {"flops_per_step": 2 * a.batch * a.f * a.d}


def tide_every_row_impl(torch, a, xs, dead):
    """tide with AuxK on every row of the batch (aux_row_stride 1), as the others run it."""
    return tide_impl(torch, a, xs, dead, aux_row_stride=1)


def tide_every_2nd_row_impl(torch, a, xs, dead):
    """tide with AuxK on every 2nd row of the batch (aux_row_stride 2)."""
    return tide_impl(torch, a, xs, dead, aux_row_stride=2)


IMPLS = {"tide": tide_impl, "tide_every_row": tide_every_row_impl, "tide_every_2nd_row": tide_every_2nd_row_impl, "naive": naive_impl, "sparsify": sparsify_impl, "saelens": saelens_impl,
         "saelens_sparse": lambda *args: saelens_impl(*args, sparse=True), "matmul": matmul_impl}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=sorted(IMPLS), required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--f", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--k-aux", type=int, default=128)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--dead-fraction", type=float, default=0.5)
    a = p.parse_args()

    if a.impl.startswith("tide"):
        import tide  # noqa: F401  (before torch, as in the `tide` command: it sets OMP_WAIT_POLICY)
    import torch

    torch.set_num_threads(a.threads)
    a.device = torch.device(a.device)
    xs, dead = make_data(torch, a.d, a.f, a.batch, a.dead_fraction, a.device)
    step, info = IMPLS[a.impl](torch, a, xs, dead)
    sync = torch.cuda.synchronize if a.device.type == "cuda" else (lambda: None)
    info["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY")
    hello = {"ready": a.impl, "info": info, "torch": torch.__version__, "threads": torch.get_num_threads(),
             "python": sys.version.split()[0], "packages": versions("torch", "sae-lens", "eai-sparsify", "tide")}
    print(json.dumps(hello), flush=True)
    n = 0
    for line in sys.stdin:
        cmd = json.loads(line)
        times = []
        for i in range(cmd["warmup"] + cmd["steps"]):
            x = xs[n % len(xs)]
            n += 1
            sync()
            start = time.perf_counter()
            step(x, cmd["aux"])
            sync()
            if i >= cmd["warmup"]:
                times.append(time.perf_counter() - start)
        print(json.dumps({"impl": a.impl, "aux": cmd["aux"], "times": times}), flush=True)


if __name__ == "__main__":
    main()
