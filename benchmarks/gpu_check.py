"""The CUDA check: every door against the reference, the doors against fused AdamW, CUDA graphs.

    python benchmarks/gpu_check.py            # about 3-5 minutes on one GPU; one table
    python benchmarks/gpu_check.py --device cpu --quick   # the same checks on CPU (a dry run)

1. Parity, float32 and bfloat16: ``KoalaPP`` (default and ``impl="reference"``),
   ``torch.compile(opt.step, fullgraph=True)`` over a TensorDict, ``ensemble_step`` (E=3, and
   with ``inplace=True``) and the eager functional step, each run for STEPS steps on the same
   parameters, gradients and losses (given in the tested dtype) as the reference step run in
   float64. The error is
   ``max |theta - theta_ref64| / max |theta_ref64 - theta_0|`` (relative to how far the
   parameters moved); the yardstick is the same error of the eager reference step run in the
   tested dtype. A door passes within ``max(4 * yardstick, TOL[dtype])``.
2. Step time (ResNet-18 shapes; the ensemble: E=64 MLPs 64-64-64-10), medians of interleaved
   steps, against ``torch.optim.AdamW(fused=True)`` on the same parameters.
3. The CUDA-graph recipe: ``torch.compile(..., mode="reduce-overhead")`` around the functional
   step whose inputs are static buffers (``torch._dynamo.mark_static_address``; the outputs are
   copied back into them), and around ``KoalaPP.step``, with
   ``torch.compiler.cudagraph_mark_step_begin()`` before each step; parity with the plain door
   and step time. A recipe that Inductor ran without CUDA graphs says so (``cudagraph_skips``).

Without a CUDA device it prints a message and exits 0. ``--device cpu`` runs parts 1 and 2 on
the CPU instead (``--quick``: small shapes, few steps), so that the script itself is tested
where there is no GPU; CUDA graphs need CUDA.
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback

import torch

STEPS = 20
TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
BUDGET_S = 280  # stop starting new checks after this (the whole check stays under 5 minutes)
SMALL = [(32, 3, 3, 3), (32,), (32,), (64, 32 * 9), (64,), (10, 64), (10,)]


def _no_cuda() -> bool:
    if torch.cuda.is_available():
        return False
    print("gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing to check.")
    return True


def _rel(theta, ref, theta0) -> float:
    moved = max(float((r - t0).abs().max()) for r, t0 in zip(ref, theta0, strict=True))
    err = max(float((t.double() - r).abs().max()) for t, r in zip(theta, ref, strict=True))
    return err / max(moved, 1e-30)


def _td(x):
    """The TensorDict of a TensorDict or a tensorclass (the functional state)."""
    from tensordict import TensorDictBase

    return x if isinstance(x, TensorDictBase) else x._tensordict


def _leaves(x) -> list[torch.Tensor]:
    return list(_td(x).values(include_nested=True, leaves_only=True))


def _copy_into(dst, src) -> None:
    """Copy ``src``'s leaves into ``dst``'s tensors of the same keys, in one foreach op."""
    d, s = _td(dst), _td(src)
    keys = list(d.keys(include_nested=True, leaves_only=True))
    torch._foreach_copy_([d.get(k) for k in keys], [s.get(k) for k in keys])


class Check:
    """Collects the table's rows; each check runs guarded and within the time budget."""

    def __init__(self):
        self.rows: list[tuple[str, str, str, str, str]] = []
        self.start = time.perf_counter()

    def run(self, name, dtype, fn):
        dt = str(dtype).replace("torch.", "") if dtype is not None else ""
        if time.perf_counter() - self.start > BUDGET_S:
            self.rows.append((name, dt, "", "", "skipped: time budget"))
            return
        torch._dynamo.reset()
        try:
            value, against, verdict = fn()
        except Exception as e:  # one failed door does not hide the others
            last = traceback.extract_tb(e.__traceback__)[-1]
            msg = (str(e).splitlines() or [""])[0][:120]
            value, against = "", ""
            verdict = f"error: {type(e).__name__}: {msg} ({os.path.basename(last.filename)}"
            verdict += f":{last.lineno})"
        self.rows.append((name, dt, value, against, verdict))
        print(f"  {name} [{dt}]: {value} {against} {verdict}", flush=True)

    def table(self) -> str:
        lines = ["| check | dtype | measured | against | verdict |", "|---|---|---:|---|---|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run")
    p.add_argument("--quick", action="store_true", help="small shapes and few steps")
    args = p.parse_args(argv)
    if args.device == "cuda" and _no_cuda():
        return 0
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tensordict import TensorDict

    import koala_func as kf
    from benchmarks import harness
    from benchmarks.sets import ENSEMBLE_SIZES, SETS, grads_of, module_of

    dev = args.device
    cuda = torch.device(dev).type == "cuda"
    device_name = torch.cuda.get_device_name() if cuda else dev
    # large enough steps that bfloat16 parameters move by many of their ulps in STEPS steps
    lr, wd = 8.0, 5e-4
    print(f"gpu_check on {device_name}, torch {torch.__version__}", flush=True)
    chk = Check()

    def data(shapes, dtype, seed=0):
        """Initial parameters and STEPS (gradients, loss) in ``dtype`` on the GPU."""
        theta0 = [t.to(dtype) for t in module_of(shapes, seed=seed, device=dev).parameters()]
        steps = []
        for k in range(STEPS):
            gs = [g.to(dtype) for g in grads_of(shapes, seed=100 + k + 1000 * seed, device=dev)]
            steps.append((gs, torch.tensor(0.5 + 0.2 * math.sin(k), device=dev)))
        return [t.detach() for t in theta0], steps

    # v and h_prev in float32 for bfloat16 parameters, as docs/safety.md recommends (in
    # bfloat16 the filter's own state would be most of the error)
    sd = torch.float32

    def functional(impl=None, state_dtype=sd):
        kw = {"impl": impl} if impl else {}
        return kf.koala_pp(lr=lr, weight_decay=wd, state_dtype=state_dtype, **kw)

    def run_functional(theta0, steps, dtype, compiled=False, impl=None, cast=None):
        opt = functional(impl, None if cast == torch.float64 else sd)
        names = [f"p{i:03d}" for i in range(len(theta0))]
        params = TensorDict(
            {n: (t.to(cast) if cast else t.clone()) for n, t in zip(names, theta0, strict=True)}
        )
        params["num_batches_tracked"] = torch.tensor(0, device=dev)
        state = opt.init(params)
        step = torch.compile(opt.step, fullgraph=True) if compiled else opt.step
        for gs, loss in steps:
            grads = TensorDict(
                {n: (g.to(cast) if cast else g) for n, g in zip(names, gs, strict=True)}
            )
            params, state = step(params, grads, loss, state)
        return [params[n] for n in names]

    def ref64(theta0, steps):
        return run_functional(theta0, steps, torch.float64, impl="reference", cast=torch.float64)

    def run_koalapp(theta0, steps, **kw):
        ps = [torch.nn.Parameter(t.clone()) for t in theta0]
        opt = kf.KoalaPP(ps, lr=lr, weight_decay=wd, state_dtype=sd, **kw)
        for gs, loss in steps:
            harness._set_grads(ps, gs)
            opt.step(loss=loss)
        return [p.detach() for p in ps]

    def run_ensemble(dtype, members=3, inplace=False):
        per = [data(SMALL, dtype, seed=e) for e in range(members)]
        names = [f"p{i:03d}" for i in range(len(SMALL))]
        params = TensorDict(
            {n: torch.stack([per[e][0][i] for e in range(members)]) for i, n in enumerate(names)},
            batch_size=[members],
        )
        opt = kf.koala_pp(lr=lr, weight_decay=wd, state_dtype=sd)
        if inplace:
            params = kf.member_views(params)
        state = kf.ensemble_init(opt, params)
        step = kf.ensemble_step(opt, inplace=inplace)
        for k in range(STEPS):
            grads = TensorDict(
                {
                    n: torch.stack([per[e][1][k][0][i] for e in range(members)])
                    for i, n in enumerate(names)
                },
                batch_size=[members],
            )
            loss = torch.stack([per[e][1][k][1] for e in range(members)])
            params, state = step(params, grads, loss, state)
        errs = [
            _rel([params[n][e] for n in names], ref64(*per[e]), per[e][0]) for e in range(members)
        ]
        yard = max(
            _rel(run_functional(*per[e], dtype, impl="reference"), ref64(*per[e]), per[e][0])
            for e in range(members)
        )
        return max(errs), yard

    def verdict(err, yard, dtype):
        limit = max(4 * yard, TOL[dtype])
        ok = "pass" if err <= limit else "FAIL"
        if yard > 0.2:  # the dtype's own reference does not follow float64: nothing is tested
            ok = "FAIL (vacuous: the reference in this dtype does not track float64)"
        return f"{err:.2e}", f"ref64 (yardstick {yard:.1e})", f"{ok} (limit {limit:.1e})"

    # ---- 1. parity
    print("parity", flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        theta0, steps = data(SMALL, dtype)
        ref = ref64(theta0, steps)

        def yard(theta0=theta0, steps=steps, ref=ref, dtype=dtype):
            return _rel(run_functional(theta0, steps, dtype, impl="reference"), ref, theta0)

        y = yard()
        doors = {
            "KoalaPP": lambda t=theta0, s=steps: run_koalapp(t, s),
            'KoalaPP(impl="reference")': lambda t=theta0, s=steps: run_koalapp(
                t, s, impl="reference"
            ),
            "torch.compile(opt.step) over a TensorDict": lambda t=theta0, s=steps, d=dtype: (
                run_functional(t, s, d, compiled=True)
            ),
            "opt.step (eager functional)": lambda t=theta0, s=steps, d=dtype: run_functional(
                t, s, d
            ),
        }
        for name, fn in doors.items():
            chk.run(
                f"parity: {name}",
                dtype,
                lambda fn=fn, t=theta0, r=ref, y=y, d=dtype: verdict(_rel(fn(), r, t), y, d),
            )
        chk.run(
            "parity: ensemble_step (E=3, each member)",
            dtype,
            lambda d=dtype: verdict(*run_ensemble(d), d),
        )
        chk.run(
            "parity: ensemble_step(inplace=True) (E=3, each member)",
            dtype,
            lambda d=dtype: verdict(*run_ensemble(d, inplace=True), d),
        )

    # ---- 2. step time against AdamW(fused=True)
    print("step time", flush=True)
    reps = 5 if args.quick else 50

    def timed(cases, base):
        built = {
            k: harness.build_case(m, harness.STEP, shapes, wd, dev)
            for k, (m, shapes) in cases.items()
        }
        errors = {k: c.error for k, c in built.items() if c.error}
        fns = {k: c.fn for k, c in built.items() if c.fn is not None}
        ts = harness.time_interleaved(fns, reps, dev)
        med = {k: sorted(v)[len(v) // 2] for k, v in ts.items()}
        return med, errors

    def time_rows(cases, base, label):
        med, errors = timed(cases, base)
        for k in cases:
            if k in errors:
                chk.rows.append((f"time: {k}", "float32", "", label, f"error: {errors[k]}"))
            elif k != base:
                ratio = med[k] / med[base]
                chk.rows.append(
                    (
                        f"time: {k}",
                        "float32",
                        f"{med[k] * 1e3:.3f} ms",
                        f"{base} {med[base] * 1e3:.3f} ms",
                        f"{ratio:.2f}x",
                    )
                )
                print(f"  {k}: {chk.rows[-1][2]} ({ratio:.2f}x {base})", flush=True)

    r18 = SMALL if args.quick else SETS["resnet18"]()
    try:
        time_rows(
            {
                "AdamW(fused=True), ResNet-18": (harness.ADAMW, r18),
                "KoalaPP, ResNet-18": (harness.KOALA, r18),
                "torch.compile(opt.step), ResNet-18": (harness.FUNC, r18),
            },
            "AdamW(fused=True), ResNet-18",
            "AdamW",
        )
        e = 64
        time_rows(
            {
                f"AdamW(fused=True) over stacked [E={e}, ...]": (harness.ENS_ADAMW, []),
                f"ensemble_step, E={e} {'-'.join(map(str, ENSEMBLE_SIZES))}": (harness.ENS, []),
                f"ensemble_step(inplace=True), E={e}": (harness.ENS_INPLACE, []),
            },
            f"AdamW(fused=True) over stacked [E={e}, ...]",
            "AdamW",
        )
    except Exception as exc:
        chk.rows.append(("time", "float32", "", "", f"error: {type(exc).__name__}: {exc}"[:200]))

    if not cuda:  # CUDA graphs need CUDA
        print(f"\ngpu_check: {device_name}, {time.perf_counter() - chk.start:.0f} s")
        print(chk.table())
        return 0

    # ---- 3. CUDA graphs
    print("CUDA graphs", flush=True)
    from torch._dynamo.utils import counters

    def graph_functional():
        theta0, steps = data(r18, torch.float32)
        plain = run_functional(theta0, steps[:5], torch.float32, compiled=True)
        torch._dynamo.reset()
        opt = kf.koala_pp(lr=lr, weight_decay=wd)
        names = [f"p{i:03d}" for i in range(len(theta0))]
        params = TensorDict({n: t.clone() for n, t in zip(names, theta0, strict=True)})
        state = opt.init(params)
        grads = TensorDict({n: torch.empty_like(t) for n, t in zip(names, theta0, strict=True)})
        loss = torch.zeros((), device=dev)
        static = [*_leaves(params), *_leaves(grads), loss, *_leaves(state)]
        for t in static:
            torch._dynamo.mark_static_address(t)
        step = torch.compile(opt.step, mode="reduce-overhead", fullgraph=True)
        skips = counters["inductor"]["cudagraph_skips"]

        def one(gs, l):
            torch._foreach_copy_(_leaves(grads), gs)
            loss.copy_(l)
            torch.compiler.cudagraph_mark_step_begin()
            new_p, new_s = step(params, grads, loss, state)
            _copy_into(params, new_p)  # outputs live in the graph's pool: copy them back
            _copy_into(state, new_s)

        for gs, l in steps[:5]:
            one(gs, l)
        err = max(
            float((params[n] - p).abs().max()) / max(float(p.abs().max()), 1e-30)
            for n, p in zip(names, plain, strict=True)
        )
        gs, l = steps[0]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            one(gs, l)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / reps * 1e3
        skipped = counters["inductor"]["cudagraph_skips"] - skips
        note = "CUDA graphs skipped" if skipped else "CUDA graphs used"
        return f"{ms:.3f} ms/step", f"rel. diff {err:.1e} vs compiled door", note

    def graph_koalapp():
        theta0, steps = data(r18, torch.float32)
        plain = run_koalapp(theta0, steps[:5])
        ps = [torch.nn.Parameter(t.clone()) for t in theta0]
        opt = kf.KoalaPP(ps, lr=torch.tensor(lr, device=dev), weight_decay=wd)
        harness._set_grads(ps, steps[0][0])
        loss = torch.zeros((), device=dev)
        skips = counters["inductor"]["cudagraph_skips"]
        step = torch.compile(lambda: opt.step(loss=loss), mode="reduce-overhead")

        def one(gs, l):
            harness._set_grads(ps, gs)
            loss.copy_(l)
            torch.compiler.cudagraph_mark_step_begin()
            step()

        for gs, l in steps[:5]:
            one(gs, l)
        err = max(
            float((p.detach() - q).abs().max()) / max(float(q.abs().max()), 1e-30)
            for p, q in zip(ps, plain, strict=True)
        )
        gs, l = steps[0]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            one(gs, l)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / reps * 1e3
        skipped = counters["inductor"]["cudagraph_skips"] - skips
        note = "CUDA graphs skipped" if skipped else "CUDA graphs used"
        return f"{ms:.3f} ms/step", f"rel. diff {err:.1e} vs KoalaPP", note

    chk.run(
        "CUDA graphs: functional step, static buffers, ResNet-18", torch.float32, graph_functional
    )
    chk.run("CUDA graphs: KoalaPP.step, ResNet-18", torch.float32, graph_koalapp)

    print()
    print(
        f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"{time.perf_counter() - chk.start:.0f} s"
    )
    print(chk.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
