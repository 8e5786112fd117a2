#!/usr/bin/env python3
"""Parity fixtures for crates/gen-optim (pinned: torch 2.9.1, adamp 0.3.0, galore-torch 1.0,
ista-daslab-optimizers 1.1.15, safetensors 0.8.0; `pip install --no-deps adamp==0.3.0
galore-torch==1.0 ista-daslab-optimizers==1.1.15` next to torch).

Runs the reference optimizers -- torch.optim.AdamW, torch.optim.SGD, adamp.AdamP, adamp.SGDP,
galore_torch.GaLoreAdamW (SVD projector, proj_type 'std') --
for a few steps on FIXED gradients (random, seeded, recorded in the file) and records the
parameters after every step. The Rust test `crates/gen-optim/tests/parity.rs` replays the
same gradients and compares.

Layout of crates/gen-optim/tests/fixtures/optim_parity.safetensors (every key starts with the
case name):
  {case}/meta/steps                 0-d i64   number of steps
  {case}/meta/max_grad_norm         0-d f64   clipping threshold (<= 0: no clipping)
  {case}/group{g}/{hp}              0-d f64   hyper-parameters of group g (lr, beta1, ...)
  {case}/param/{name}/group         0-d i64   group of the parameter
  {case}/param/{name}/init          initial value
  {case}/param/{name}/grad{k}       gradient fed at step k (absent: no gradient at that step)
  {case}/param/{name}/after{k}      value after step k
  {case}/param/{name}/proj{k}       0-d i64, AdamP/SGDP only: 0 no projection, 1 per-channel,
                                    2 whole-layer (decided by adamp's own _projection test)
  {case}/norm{k}                    0-d f64   global gradient norm before clipping at step k
  dct/basis{n}                      n×n f64   the reference's orthonormal DCT matrix, transposed
                                              so that its columns are the DCT-II basis vectors
  dct/g{i}, dct/idx{i}, dct/r{i}    gradient, the rank-4 column (row) indices the reference's
                                    FFTLowRankProjector (sim_type 'makhoul', L1 norm) picks,
                                    sorted, and the projected gradient in that index order

Run: /work/venv/bin/python scripts/fixtures_optim.py
"""
import importlib.metadata
import math
import os
import sys
import types

import torch
import adamp
from safetensors.torch import save_file

assert torch.__version__.startswith("2.9.1"), torch.__version__
# galore_torch's __init__ imports its 8-bit optimizer, which needs bitsandbytes (a CUDA
# package); we only use GaLoreAdamW, so a stub module stands in for it.
if "bitsandbytes" not in sys.modules:
    bnb = types.ModuleType("bitsandbytes")
    bnb.optim = types.ModuleType("bitsandbytes.optim")
    bnb.optim.optimizer = types.ModuleType("bitsandbytes.optim.optimizer")
    bnb.optim.optimizer.Optimizer2State = object
    sys.modules.update({"bitsandbytes": bnb, "bitsandbytes.optim": bnb.optim, "bitsandbytes.optim.optimizer": bnb.optim.optimizer})
import galore_torch  # noqa: E402
import warnings  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)

assert importlib.metadata.version("adamp") == "0.3.0"
assert importlib.metadata.version("ista-daslab-optimizers") == "1.1.15"
assert importlib.metadata.version("galore-torch") == "1.0"
assert importlib.metadata.version("safetensors") == "0.8.0"

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "gen-optim", "tests", "fixtures", "optim_parity.safetensors")
STEPS = 5
tensors = {}


def scalar(v, dtype=torch.float64):
    return torch.tensor(v, dtype=dtype)


def orthogonal_to(w, r, per_channel):
    """r with its component along w removed, per output channel or over the whole tensor."""
    if per_channel:
        wv, rv = w.reshape(w.shape[0], -1), r.reshape(r.shape[0], -1)
        coef = (wv * rv).sum(1, keepdim=True) / (wv * wv).sum(1, keepdim=True)
        return (rv - coef * wv).reshape(r.shape)
    coef = (w * r).sum() / (w * w).sum()
    return r - coef * w


def projection_kind(opt, p, g, group):
    """Which view adamp's own test picks (0 none, 1 channel, 2 layer); mirrors its _projection."""
    if p.dim() <= 1:
        return 0
    for kind, view in ((1, opt._channel_view), (2, opt._layer_view)):
        cos = opt._cosine_similarity(g, p.data, group["eps"], view)
        if cos.max() < group["delta"] / math.sqrt(view(p.data).size(1)):
            return kind
    return 0


def run_case(name, make_opt, params, groups, grad_fn, dtype, max_grad_norm=0.0, record_proj=False, hp_keys=()):
    """params: dict name -> initial tensor; groups: list of (names, hp dict)."""
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    ps = {k: torch.nn.Parameter(v.clone().to(dtype)) for k, v in params.items()}
    torch_groups = [dict(params=[ps[n] for n in names], **hp) for names, hp in groups]
    opt = make_opt(torch_groups)
    tensors[f"{name}/meta/steps"] = scalar(STEPS, torch.int64)
    tensors[f"{name}/meta/max_grad_norm"] = scalar(max_grad_norm)
    for gi, (names, hp) in enumerate(groups):
        for k in hp_keys:
            if k not in hp:
                continue
            v = hp[k]
            if k == "betas":
                tensors[f"{name}/group{gi}/beta1"] = scalar(v[0])
                tensors[f"{name}/group{gi}/beta2"] = scalar(v[1])
            else:
                tensors[f"{name}/group{gi}/{k}"] = scalar(float(v))
        for n in names:
            tensors[f"{name}/param/{n}/group"] = scalar(gi, torch.int64)
    for n, p in ps.items():
        tensors[f"{name}/param/{n}/init"] = p.detach().clone()
    for k in range(STEPS):
        grads = grad_fn(k, {n: p.detach() for n, p in ps.items()}, gen)
        for n, p in ps.items():
            g = grads.get(n)
            p.grad = None if g is None else g.to(dtype).clone()
            if g is not None:
                tensors[f"{name}/param/{n}/grad{k}"] = p.grad.clone()
        with_grad = [p for p in ps.values() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.double()) for p in with_grad]))
        tensors[f"{name}/norm{k}"] = norm.double().reshape(())
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(with_grad, max_grad_norm)
        if record_proj:
            for gi, group in enumerate(opt.param_groups):
                for p in group["params"]:
                    n = next(nm for nm, q in ps.items() if q is p)
                    if p.grad is not None:
                        tensors[f"{name}/param/{n}/proj{k}"] = scalar(projection_kind(opt, p, p.grad, group), torch.int64)
        opt.step()
        for n, p in ps.items():
            tensors[f"{name}/param/{n}/after{k}"] = p.detach().clone()


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def random_grads(shapes, skip=None, scale=None):
    """Gradient function: fresh gaussian gradients; `skip` = {step: [names without grad]}."""
    def f(k, params, gen):
        out = {}
        for n, shape in shapes.items():
            g = randn(gen, *shape)
            if scale:
                g = g * scale(k)
            if skip and n in skip.get(k, []):
                continue
            out[n] = g
        return out
    return f


def load_ista_dct():
    """The DCT pieces of ista-daslab-optimizers, loaded by file: the package's __init__ imports
    its CUDA/triton optimizers, which this CPU script does not need."""
    import importlib.util
    pkg = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "ista_daslab_optimizers")
    for name, sub in (("ista_daslab_optimizers", ""), ("ista_daslab_optimizers.utils", "utils"),
                      ("ista_daslab_optimizers.fft_low_rank", "fft_low_rank")):
        m = types.ModuleType(name)
        m.__path__ = [os.path.join(pkg, sub)]
        sys.modules.setdefault(name, m)

    def load(name, rel):
        spec = importlib.util.spec_from_file_location(name, os.path.join(pkg, rel))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod

    load("ista_daslab_optimizers.utils.global_cache", "utils/global_cache.py")
    dct = load("ista_daslab_optimizers.utils.dct", "utils/dct.py")
    proj = load("ista_daslab_optimizers.fft_low_rank.fft_projector", "fft_low_rank/fft_projector.py")
    return dct, proj


def dct_fixtures(gen):
    dct, fp = load_ista_dct()
    for i, shape in enumerate(((20, 16), (6, 10))):
        n = min(shape)
        # dct3_matrix's rows are the DCT-II basis vectors; its transpose is what the reference
        # uses with sim_type 'makhoul' (and what our projector uses).
        q = dct.dct3_matrix(n, torch.float64, "cpu").t().contiguous()
        tensors[f"dct/basis{n}"] = q
        g = randn(gen, *shape)
        p = fp.FFTLowRankProjector(torch.zeros_like(g), rank=4, proj="dct", rotate_subspace=False, sim_type="makhoul")
        proj_out = p.change_subspace(q, g, None)
        idx = p.indices_crt.long()
        order = torch.argsort(idx)
        r = proj_out[:, order] if shape[0] >= shape[1] else proj_out[order, :]
        tensors[f"dct/g{i}"] = g
        tensors[f"dct/idx{i}"] = idx[order].contiguous()
        tensors[f"dct/r{i}"] = r.contiguous()


def main():
    g0 = torch.Generator().manual_seed(1234)
    # ---------------- AdamW ----------------
    adamw_hp = ("lr", "betas", "eps", "weight_decay")
    shapes = {"w": (5, 4), "b": (4,), "e": (3, 3)}
    init = {n: randn(g0, *s) for n, s in shapes.items()}
    run_case("adamw_groups", lambda g: torch.optim.AdamW(g),
             init, [(["w", "e"], dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)),
                    (["b"], dict(lr=5e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0))],
             random_grads(shapes, skip={2: ["b"]}), torch.float64, hp_keys=adamw_hp)
    run_case("adamw_f32_nowd", lambda g: torch.optim.AdamW(g),
             {"w": randn(g0, 6, 5)}, [(["w"], dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0))],
             random_grads({"w": (6, 5)}), torch.float32, hp_keys=adamw_hp)
    run_case("adamw_clip", lambda g: torch.optim.AdamW(g),
             {"w": randn(g0, 4, 4), "b": randn(g0, 4)},
             [(["w", "b"], dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01))],
             random_grads({"w": (4, 4), "b": (4,)}, scale=lambda k: 0.05 if k == 3 else 10.0),
             torch.float64, max_grad_norm=1.0, hp_keys=adamw_hp)
    # ---------------- SGD ----------------
    sgd_hp = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
    shapes = {"w": (4, 3), "b": (3,)}
    run_case("sgd_momentum", lambda g: torch.optim.SGD(g, lr=0.1),
             {n: randn(g0, *s) for n, s in shapes.items()},
             [(["w", "b"], dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2, nesterov=False))],
             random_grads(shapes, skip={0: ["b"], 3: ["w"]}), torch.float64, hp_keys=sgd_hp)
    run_case("sgd_nesterov", lambda g: torch.optim.SGD(g, lr=0.1),
             {n: randn(g0, *s) for n, s in shapes.items()},
             [(["w"], dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=True)),
              (["b"], dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False))],
             random_grads(shapes), torch.float64, hp_keys=sgd_hp)
    run_case("sgd_f32", lambda g: torch.optim.SGD(g, lr=0.1),
             {"w": randn(g0, 3, 3)},
             [(["w"], dict(lr=0.1, momentum=0.5, dampening=0.0, weight_decay=0.0, nesterov=False))],
             random_grads({"w": (3, 3)}), torch.float32, hp_keys=sgd_hp)
    # ---------------- AdamP / SGDP ----------------
    # conv_ch: gradient orthogonal to every output channel of the current weight (per-channel
    # test fires); conv_layer: orthogonal to the weight as a whole only (per-channel test
    # fails, whole-layer test fires); lin: random gradient (no projection); bias: 1-D.
    shapes = {"conv_ch": (8, 3, 3, 3), "conv_layer": (6, 4, 3, 3), "lin": (5, 7), "bias": (8,)}
    p_init = {n: randn(g0, *s) for n, s in shapes.items()}

    def si_grads(k, params, gen):
        out = {}
        for n, s in shapes.items():
            r = randn(gen, *s)
            if n == "conv_ch":
                r = orthogonal_to(params[n].double(), r, per_channel=True)
            elif n == "conv_layer":
                r = orthogonal_to(params[n].double(), r, per_channel=False)
            out[n] = r
        return out

    adamp_hp = ("lr", "betas", "eps", "weight_decay", "delta", "wd_ratio", "nesterov")
    for case, nesterov, wd, dtype in (("adamp", False, 1e-2, torch.float64), ("adamp_nesterov", True, 0.1, torch.float64),
                                      ("adamp_f32", False, 1e-2, torch.float32)):
        run_case(case, lambda g: adamp.AdamP(g), p_init,
                 [(list(shapes), dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd, delta=0.1, wd_ratio=0.1, nesterov=nesterov))],
                 si_grads, dtype, record_proj=True, hp_keys=adamp_hp)
    sgdp_hp = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "eps", "delta", "wd_ratio")
    for case, nesterov, damp in (("sgdp", False, 0.1), ("sgdp_nesterov", True, 0.0)):
        run_case(case, lambda g: adamp.SGDP(g, lr=0.1), p_init,
                 [(list(shapes), dict(lr=0.1, momentum=0.9, dampening=damp, weight_decay=1e-2, nesterov=nesterov, eps=1e-8, delta=0.1, wd_ratio=0.1))],
                 si_grads, torch.float64, record_proj=True, hp_keys=sgdp_hp)

    # ---------------- GaLore (reference AdamW: transformers form) ----------------
    # w: 12×6 (m >= n, right projection), v: 5×9 (left projection), b: 1-D in a plain group.
    galore_hp = ("lr", "betas", "eps", "weight_decay", "rank", "update_proj_gap", "scale")
    shapes = {"w": (12, 6), "v": (5, 9), "b": (6,)}
    g_init = {n: randn(g0, *s) for n, s in shapes.items()}

    def galore_groups(gap):
        return [(["w", "v"], dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, rank=3, update_proj_gap=gap, scale=0.25, proj_type="std")),
                (["b"], dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01))]

    # One projection (at the first step), the reference untouched.
    run_case("galore", lambda g: galore_torch.GaLoreAdamW(g), g_init, galore_groups(STEPS),
             random_grads(shapes), torch.float32, hp_keys=galore_hp)
    # Re-projection every 2 steps with moments carried over. Singular-vector signs are
    # arbitrary (LAPACK's choice) and change the carried moments, so here the reference's
    # basis gets the sign convention our projector uses: largest-|entry| of each vector > 0.
    original = galore_torch.galore_projector.GaLoreProjector.get_orthogonal_matrix

    def signed(self, weights, rank, type):
        q = original(self, weights, rank, type)
        vecs = q if type == "left" else q.t()  # columns are the singular vectors
        idx = vecs.abs().argmax(0)
        sign = torch.sign(vecs[idx, torch.arange(vecs.shape[1])])
        vecs = vecs * sign
        return vecs if type == "left" else vecs.t()

    galore_torch.galore_projector.GaLoreProjector.get_orthogonal_matrix = signed
    run_case("galore_reproject", lambda g: galore_torch.GaLoreAdamW(g), g_init, galore_groups(2),
             random_grads(shapes), torch.float32, hp_keys=galore_hp)
    galore_torch.galore_projector.GaLoreProjector.get_orthogonal_matrix = original

    dct_fixtures(torch.Generator().manual_seed(77))

    kinds = {}
    for key, t in tensors.items():
        if "/proj" in key:
            kinds.setdefault(key.split("/")[0], set()).add(int(t))
    for case, ks in kinds.items():
        assert ks == {0, 1, 2}, f"{case}: projection kinds exercised {ks}, expected none, channel and layer"
    tensors_c = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors_c, OUT, metadata={"generator": "scripts/fixtures_optim.py", "torch": torch.__version__})
    print(f"wrote {len(tensors_c)} tensors to {os.path.normpath(OUT)} ({os.path.getsize(OUT)} bytes); projection kinds {kinds}")


if __name__ == "__main__":
    main()
