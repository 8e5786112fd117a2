#!/usr/bin/env python3
"""Parity fixtures for FRUGAL (crates/gen-optim/src/lowrank.rs), pinned: torch 2.9.1,
safetensors 0.8.0.

The reference (Zmushko et al. 2025, "FRUGAL") is not on PyPI, so this script re-implements its
update in PyTorch, written from a reading of the public code (mirrored in the fork
github.com/hungquangbui02022003/FRUGAL; nothing is copied):
  frugal/proj_optimizer_templates.py  @ 6d7bf46dfc079c3e2269df3f876538d673f1f3ba
      ProjOptimizer.step, _update_states_if_necessary, GaloreOptimizer/CoordOptimizer
      ._update_states and ._proj_params_update
  frugal/adamw.py                     @ 08f514226d1caf973c548d96e8305ee7266a4d71
      AdamW._init_state, AdamW._compute_update (the state-full rule), GaloreAdamW, CoordAdamW
  frugal/galore_projector.py          @ 08f514226d1caf973c548d96e8305ee7266a4d71
      GaLoreProjector (proj_side 'std', proj_type 'svd')
  frugal/coordinate_projector.py      @ 6d7bf46dfc079c3e2269df3f876538d673f1f3ba
      CoordinateProjector (coord_choice 'columns')
(The fork's later commit b512f87 adds optional dynamic rho / T, off by default; the default
path is unchanged.) Defaults used: proj_params_lr_scale 1, reset_statistics True,
_example_state_init False, correct_bias True.

What the reference does, step by step, for one optimizer step (`ref_step` below):
  1. for the projected group: if the first parameter has no state or its `step` is a multiple
     of update_gap, every parameter rebuilds its projector from the current gradient and its
     Adam state (step, exp_avg, exp_avg_sq) is zeroed (shape of the projected gradient);
  2. for every parameter: p *= 1 - lr * weight_decay; step += 1;
  3. regular parameters (here the 1-D bias): AdamW update
        denom = sqrt(v) / sqrt(1 - b2^step) + eps,  p += -(lr / (1 - b1^step)) * m / denom;
  4. projected parameters: g_down = project_down(g); Adam as in 3 on g_down (its own step,
     reset in 1), projected up; plus the state-free part on g - project_up(g_down):
     'sign_sgd': -lr * inactive_lr_scale * sign(.), 'sgd': -lr * inactive_lr_scale * (.),
     'no': nothing.
  SVD projector ('std' side): for m >= n, B = Vh[:r] (r x n), down G B^T, up R B; otherwise
  A = U[:, :r], down A^T G, up A R; r = round(density * side) (Python round: ties to even).
  Columns projector: r = int(n * density) random columns (torch.randperm), down G[:, idx],
  up: zeros with the columns filled.

Random columns: our implementation draws its columns from its own seeded generator (ChaCha8),
which cannot be reproduced here, and gen-optim has no way to inject a projector. So for the
columns cases this script runs the reference for EVERY possible choice of column subsets at
every re-projection (a 6x4 weight: C(4,2) = 6 subsets at density 0.5, 4 at 0.25, three
re-projections in 5 steps) and stores all trajectories; the Rust test reads the subsets its
optimizer chose (state slot `proj_idx`) and compares with the matching reference trajectory.
The script also runs the reference's own random path (torch.randperm) once and checks that it
lands on the enumerated trajectory of the subsets it drew.

Robustness checks (asserted): every residual entry fed to sign() has |x| > 1e-4 (so f32
rounding cannot flip a sign) and, for SVD, the singular-value gap at the rank cut is >= 5% of
the largest singular value (so the subspace is well conditioned).

Layout of crates/gen-optim/tests/fixtures/frugal_parity.safetensors (keys start with the case):
  {case}/hp/{lr,beta1,beta2,eps,weight_decay,density,update_gap,state_free_lr_scale}  0-d f64
  {case}/hp/kind        0-d i64  0 svd, 1 random columns
  {case}/hp/state_free  0-d i64  0 sign_sgd, 1 sgd, 2 no
  {case}/meta/steps     0-d i64
  {case}/param/{name}/init, /grad{k}        f32 (names: w 6x4, wide 4x6 (svd only), b 4)
  {case}/param/{name}/after{k}              f32, svd cases and the bias of columns cases
  {case}/subsets        i64 (S, r)  columns cases: the candidate column subsets (sorted)
  {case}/traj           f32 (S, S, S, steps, 6, 4)  columns cases: w after every step when
                        the subsets at re-projections 1, 2, 3 are subsets[i], [j], [k]

Run: /work/venv/bin/python scripts/fixtures_frugal.py
"""
import importlib.metadata
import itertools
import os

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "gen-optim", "tests",
                   "fixtures", "frugal_parity.safetensors")
STEPS = 5
GAP = 2
SIGN_MARGIN = 1e-4


class SvdProjector:
    """GaLoreProjector, proj_side 'std', proj_type 'svd'."""

    def __init__(self, density, shape):
        self.right = shape[0] >= shape[1]
        self.rank = round((shape[1] if self.right else shape[0]) * density)
        self.mat = None

    def update(self, g):
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        r = self.rank
        if r < s.numel():
            gap = (s[r - 1] - s[r]).item() / s[0].item()
            assert gap >= 0.05, f"singular-value gap {gap} at rank {r}"
        self.mat = vh[:r, :] if self.right else u[:, :r]

    def down(self, g):
        return g @ self.mat.t() if self.right else self.mat.t() @ g

    def up(self, r):
        return r @ self.mat if self.right else self.mat @ r


class ColumnsProjector:
    """CoordinateProjector, coord_choice 'columns'; `chooser` gives the column indices."""

    def __init__(self, density, shape, chooser):
        self.shape = shape
        self.rank = int(shape[1] * density)
        self.chooser = chooser
        self.idx = None

    def update(self, g):
        self.idx = self.chooser(self.shape[1], self.rank)

    def down(self, g):
        return g[:, self.idx]

    def up(self, r):
        full = torch.zeros(self.shape, dtype=r.dtype)
        full[:, self.idx] = r
        return full


def adam_update(grad, st, lr, b1, b2, eps):
    """AdamW._compute_update with correct_bias: returns the additive update."""
    st["m"].mul_(b1).add_(grad, alpha=1.0 - b1)
    st["v"].mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
    denom = st["v"].sqrt()
    bc1 = 1.0 - b1 ** st["step"]
    bc2 = 1.0 - b2 ** st["step"]
    denom.div_(bc2 ** 0.5)
    denom.add_(eps)
    return st["m"] / denom * (-(lr / bc1))


def ref_run(hp, init, grads, make_projector):
    """Runs the reference for len(grads) steps; returns {name: [param after each step]}.

    `init`: {name: tensor}; 2-D names are the projected group, others the regular group.
    """
    params = {n: t.clone() for n, t in init.items()}
    proj_names = [n for n in params if params[n].dim() == 2]
    reg_names = [n for n in params if params[n].dim() != 2]
    state = {n: {} for n in params}
    out = {n: [] for n in params}
    lr, wd = hp["lr"], hp["weight_decay"]
    b1, b2, eps = hp["beta1"], hp["beta2"], hp["eps"]
    for g in grads:
        # Regular group first (the order of groups does not matter: they are independent).
        for n in reg_names:
            st = state[n]
            if not st:
                st.update(step=0, m=torch.zeros_like(params[n]), v=torch.zeros_like(params[n]))
            params[n].mul_(1 - lr * wd)
            st["step"] += 1
            params[n].add_(adam_update(g[n], st, lr, b1, b2, eps))
        # Projected group: re-projection check on the first parameter's step.
        first = state[proj_names[0]]
        if "step" not in first or first["step"] % hp["update_gap"] == 0:
            for n in proj_names:
                st = state[n]
                if "proj" not in st:
                    st["proj"] = make_projector(hp["density"], tuple(params[n].shape))
                st["proj"].update(g[n])
                down = st["proj"].down(g[n])
                st.update(step=0, m=torch.zeros_like(down), v=torch.zeros_like(down))
        for n in proj_names:
            st = state[n]
            params[n].mul_(1 - lr * wd)
            st["step"] += 1
            gd = st["proj"].down(g[n])
            upd = st["proj"].up(adam_update(gd, st, lr, b1, b2, eps))
            rule = hp["state_free"]
            if rule != "no":
                free = g[n] - st["proj"].up(gd)
                free_lr = lr * hp["state_free_lr_scale"]
                if rule == "sgd":
                    upd.add_(-free_lr * free)
                else:
                    nz = free.abs()[free != 0]
                    if nz.numel():
                        assert nz.min().item() > SIGN_MARGIN, f"residual entry {nz.min()} near 0"
                    upd.add_(-free_lr * free.sign())
            params[n].add_(upd)
        for n in params:
            out[n].append(params[n].clone())
    return out


def make_data(seed, shapes):
    gen = torch.Generator().manual_seed(seed)
    init = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    grads = [{n: torch.randn(s, generator=gen) for n, s in shapes.items()} for _ in range(STEPS)]
    return init, grads


RULE_ID = {"sign_sgd": 0, "sgd": 1, "no": 2}


def put_common(out, case, hp, kind, init, grads):
    for k in ["lr", "beta1", "beta2", "eps", "weight_decay", "density", "state_free_lr_scale"]:
        out[f"{case}/hp/{k}"] = torch.tensor(float(hp[k]), dtype=torch.float64)
    out[f"{case}/hp/update_gap"] = torch.tensor(float(hp["update_gap"]), dtype=torch.float64)
    out[f"{case}/hp/kind"] = torch.tensor(kind, dtype=torch.int64)
    out[f"{case}/hp/state_free"] = torch.tensor(RULE_ID[hp["state_free"]], dtype=torch.int64)
    out[f"{case}/meta/steps"] = torch.tensor(STEPS, dtype=torch.int64)
    for n, t in init.items():
        out[f"{case}/param/{n}/init"] = t.contiguous()
        for k, g in enumerate(grads):
            out[f"{case}/param/{n}/grad{k}"] = g[n].contiguous()


def hparams(density, rule, wd, scale=1.0):
    return dict(lr=0.02, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd, density=density,
                update_gap=GAP, state_free=rule, state_free_lr_scale=scale)


def svd_cases(out):
    cases = [
        ("svd_d25_sign_wd", hparams(0.25, "sign_sgd", 0.1)),
        ("svd_d50_sign", hparams(0.5, "sign_sgd", 0.0)),
        ("svd_d25_sgd", hparams(0.25, "sgd", 0.0)),
        ("svd_d50_sgd_wd_scale", hparams(0.5, "sgd", 0.1, 0.1)),
        ("svd_d50_no_wd", hparams(0.5, "no", 0.05)),
        # round(0.625 * 4) = round(2.5) = 2 in Python (ties to even).
        ("svd_d625_tie_sign", hparams(0.625, "sign_sgd", 0.0)),
    ]
    shapes = {"w": (6, 4), "wide": (4, 6), "b": (4,)}
    for i, (case, hp) in enumerate(cases):
        seed = 100 + i
        while True:
            init, grads = make_data(seed, shapes)
            try:
                traj = ref_run(hp, init, grads, SvdProjector)
                break
            except AssertionError as e:
                print(f"{case}: seed {seed} rejected ({e})")
                seed += 1000
        put_common(out, case, hp, 0, init, grads)
        for n, ts in traj.items():
            for k, t in enumerate(ts):
                out[f"{case}/param/{n}/after{k}"] = t.contiguous()
        print(f"{case}: seed {seed}")


def columns_cases(out):
    cases = [
        ("cols_d50_sign_wd", hparams(0.5, "sign_sgd", 0.1)),
        ("cols_d25_sgd", hparams(0.25, "sgd", 0.0)),
        # int(0.375 * 4) = int(1.5) = 1 column (the columns projector truncates).
        ("cols_d375_floor_sign", hparams(0.375, "sign_sgd", 0.0)),
    ]
    shapes = {"w": (6, 4), "b": (4,)}
    n_cols = shapes["w"][1]
    for i, (case, hp) in enumerate(cases):
        init, grads = make_data(200 + i, shapes)
        r = int(n_cols * hp["density"])
        subsets = [list(c) for c in itertools.combinations(range(n_cols), r)]
        s = len(subsets)
        traj = torch.zeros((s, s, s, STEPS) + shapes["w"])
        bias = None
        for a, b, c in itertools.product(range(s), repeat=3):
            picks = iter([subsets[a], subsets[b], subsets[c]])

            def chooser(n, rank, picks=picks):
                return torch.tensor(next(picks))

            res = ref_run(hp, init, grads,
                          lambda d, shape: ColumnsProjector(d, shape, chooser))
            traj[a, b, c] = torch.stack(res["w"])
            bias = res["b"]
        # The reference's own random choice lands on the enumerated trajectory.
        torch.manual_seed(7)
        drawn = []

        def randperm_chooser(n, rank):
            idx = torch.randperm(n)[:rank]
            drawn.append(subsets.index(sorted(idx.tolist())))
            return idx

        res = ref_run(hp, init, grads,
                      lambda d, shape: ColumnsProjector(d, shape, randperm_chooser))
        want = traj[drawn[0], drawn[1], drawn[2]]
        err = (torch.stack(res["w"]) - want).abs().max().item()
        assert err <= 1e-6, f"{case}: randperm run differs from the enumerated one by {err}"
        put_common(out, case, hp, 1, init, grads)
        out[f"{case}/subsets"] = torch.tensor(subsets, dtype=torch.int64)
        out[f"{case}/traj"] = traj.contiguous()
        for k, t in enumerate(bias):
            out[f"{case}/param/b/after{k}"] = t.contiguous()
        print(f"{case}: {s} subsets of {r} columns, {s ** 3} trajectories; randperm drew {drawn}")


def main():
    torch.set_num_threads(1)
    print("torch", torch.__version__, "safetensors", importlib.metadata.version("safetensors"))
    out = {}
    svd_cases(out)
    columns_cases(out)
    tmp = OUT + ".tmp"
    save_file(out, tmp)
    os.replace(tmp, OUT)
    print("wrote", os.path.normpath(OUT), os.path.getsize(OUT), "bytes")


if __name__ == "__main__":
    main()
