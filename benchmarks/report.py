"""Regenerate docs/benchmarks.md, docs/benchmarks.json, docs/img/benchmarks.png and the README's
benchmark figures in one command.

    python -m benchmarks.report                 # the full run (about 10 minutes on 2 cores)
    python -m benchmarks.report --reps 5 --sets tiny500 --compile-tensors 10 --no-readme  # quick

Every door a user calls (``KoalaPP``, ``torch.compile(opt.step)`` over a TensorDict,
``ensemble_step``) is timed side by side with ``torch.optim.Adam(fused=True)`` and an eager loop
shaped like the authors' optimizer, interleaved in one process; medians. Cold compile times come
from fresh processes with empty inductor caches (benchmarks/cold_compile.py); the sharded doors
(FSDP2's DTensor parameters) run beside ``Adam(fused=True)`` on 2 gloo ranks
(benchmarks/sharded.py).
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import os
import re
import statistics
import time
from pathlib import Path

import torch

from . import cold_compile, fresh_pages, harness, sharded
from .harness import (
    ADAM,
    ADAM_LOOP,
    AUTHORS,
    COPY,
    ENS,
    ENS_ADAM,
    ENS_INPLACE,
    ENS_LOOP,
    FUNC,
    KOALA,
    KOALA_EAGER,
    KOALA_REF,
    KOALA_REPLACED,
    STEP,
    TRAIN,
)

ROOT = Path(os.path.abspath(__file__)).parents[1]
DEFAULT_SETS = ("resnet18", "transformer", "tiny500", "ensemble")
DOOR_LABELS = {"KoalaPP": KOALA, "functional": FUNC, "ensemble": "ensemble_step (E members each)"}
README_BEGIN = "<!-- benchmark figures: written by python -m benchmarks.report -->"
README_END = "<!-- end of benchmark figures -->"
OPS = {"<=": operator.le, ">=": operator.ge, "=": operator.eq}

FULL_PLAN = [(m, STEP) for m in harness.METHODS] + [(m, TRAIN) for m in harness.TRAIN_METHODS]
WD0_PLAN = [(ADAM, STEP), (KOALA, STEP), (COPY, STEP), (ADAM, TRAIN), (KOALA, TRAIN)]
SET_PLAN = [(m, STEP) for m in harness.METHODS]
ENSEMBLE_PLAN = [(m, STEP) for m in (ENS, ENS_INPLACE, ENS_ADAM, ENS_LOOP)]


def groups_for(set_name: str, full: bool) -> list[tuple[float, list]]:
    """``(weight decay, plan)`` pairs: ResNet-18 gets both modes and weight_decay=0 too."""
    if set_name == "ensemble":
        return [(5e-4, ENSEMBLE_PLAN)]
    if full or set_name == "resnet18":
        return [(5e-4, FULL_PLAN), (0.0, WD0_PLAN)]
    return [(5e-4, SET_PLAN)]


def measure(args, log=print) -> dict:
    torch.manual_seed(0)
    started = time.perf_counter()
    out: dict = {"machine": harness.machine(), "reps": args.reps, "members": args.members}
    out["ensemble_reps"] = args.ensemble_reps
    out["compile_members"] = args.compile_members
    rows = []
    for s in args.sets:
        # the ensemble's calls take milliseconds: more rounds for the same noise, in seconds
        reps = args.ensemble_reps if s == "ensemble" else args.reps
        for wd, plan in groups_for(s, args.full_plan):
            rows += harness.run_group(s, wd, plan, reps, members=args.members, log=log)
    out["steps"] = rows
    # Rounds over every door and size, so that a slow period of the machine hits all sizes
    # alike; a row is the median of its rounds (cold_compile.combine).
    samples: dict[tuple[str, int], list[dict]] = {}
    timed_out: dict[str, int] = {}
    for k in range(args.compile_samples):
        for door in args.compile_doors:
            for n in sorted(args.compile_tensors):
                if door in timed_out and n >= timed_out[door]:
                    # a larger set would time out too: keep the run short
                    why = f"skipped (timed out at {timed_out[door]})"
                    r = {"door": door, "tensors": n, "error": why}
                else:
                    log(f"[cold compile] {door}, {n} tensors (fresh process, round {k + 1})")
                    cm = args.compile_members if door == "ensemble" else args.members
                    threads = torch.get_num_threads()
                    r = cold_compile.measure(door, n, args.compile_timeout, threads, cm)
                    if "no result within" in r.get("error", ""):
                        timed_out[door] = n
                log("  " + (r.get("error") or f"{r['compile_s']:.1f} s, {r['graphs']} graph(s)"))
                samples.setdefault((door, n), []).append(r)
    out["compile_samples"] = args.compile_samples
    out["compile"] = [cold_compile.combine(rs) for rs in samples.values()]
    log("[recompiles] graphs over 20 steps, backend='eager'")
    out["recompiles"] = {}
    for label, variant in cold_compile.RECOMPILE_VARIANTS.items():
        try:
            out["recompiles"][label] = cold_compile.graphs_over_steps(variant)
        except Exception as e:  # reported, not fatal
            out["recompiles"][label] = f"failed: {type(e).__name__}: {e}"[:200]
    out["fresh_pages"] = []
    for s in args.fresh_pages_sets:
        for config in fresh_pages.CONFIGS:
            log(f"[fresh pages] {s}, {config} (fresh process)")
            r = fresh_pages.measure(s, config, args.fresh_pages_methods, min(args.reps, 10))
            out["fresh_pages"].append({"set": s, **r})
            if "error" in r:
                log("  " + r["error"])
    out["sharded"] = None
    if args.sharded_reps:
        log(f"[sharded] {sharded.WORLD} gloo ranks (torchrun)")
        out["sharded"] = sharded.measure(args.sharded_reps)
        if "error" in out["sharded"]:
            log("  " + out["sharded"]["error"])
    if args.passes:
        from . import bench_passes

        log("[passes] what bounds the step")
        out["passes"] = bench_passes.run(reps=20)
        out["passes"]["reuse"] = bench_passes.reuse(reps=20)
        out["passes"]["split"] = bench_passes.split(reps=20)
    out["minutes"] = (time.perf_counter() - started) / 60
    out["targets"] = targets(out)
    out["readme_figures"] = readme_figures(out)
    return out


# ----------------------------------------------------------------------------- figures
def find(rows, set_name, wd, method, mode=STEP):
    for r in rows:
        if (r["set"], r["weight_decay"], r["method"], r["mode"]) == (set_name, wd, method, mode):
            return r if r["median_s"] else None
    return None


def paired(a: dict, b: dict) -> float:
    """Median over the rounds both took part in of ``time a / time b`` (the calls of one round
    are adjacent in time, so a slow period of a shared machine cancels out)."""
    return statistics.median(x / y for x, y in zip(a["times_s"], b["times_s"], strict=False))


def ratio(rows, set_name, wd, method, base, mode=STEP):
    a, b = find(rows, set_name, wd, method, mode), find(rows, set_name, wd, base, mode)
    return None if a is None or b is None else paired(a, b)


def compile_row(res, door, n):
    for r in res["compile"]:
        if r["door"] == door and r["tensors"] == n and "error" not in r:
            return r
    return None


def targets(res) -> list[dict]:
    """The targets of issue 10 that this run measures: what, measured, target, met."""
    rows, out = res["steps"], []

    def add(what, value, fmt, op, limit, note=""):
        met = None if value is None else bool(OPS[op](value, limit))
        out.append(
            {
                "target": what,
                "measured": None if value is None else fmt.format(value),
                "value": value,
                "goal": f"{op} {limit:g}" + ("x" if "x" in fmt else ""),
                "met": met,
                "note": note,
            }
        )

    r18 = "resnet18"
    add(
        f"ResNet-18, wd 5e-4: {KOALA} / {ADAM}",
        ratio(rows, r18, 5e-4, KOALA, ADAM),
        "{:.2f}x",
        "<=",
        2.2,
    )
    add(
        f"ResNet-18, wd 5e-4: {AUTHORS} / {KOALA}",
        ratio(rows, r18, 5e-4, AUTHORS, KOALA),
        "{:.2f}x",
        ">=",
        3.5,
    )
    add(
        f"ResNet-18, wd 0: {KOALA} / {ADAM}",
        ratio(rows, r18, 0.0, KOALA, ADAM),
        "{:.2f}x",
        "<=",
        1.5,
    )
    e = res.get("members", 64)
    add(
        f"ensemble E={e}: {ENS} / {ENS_ADAM}",
        ratio(rows, "ensemble", 5e-4, ENS, ENS_ADAM),
        "{:.2f}x",
        "<=",
        2.0,
    )
    add(
        f"ensemble E={e}: {ENS_INPLACE} / {ENS_ADAM}",
        ratio(rows, "ensemble", 5e-4, ENS_INPLACE, ENS_ADAM),
        "{:.2f}x",
        "<=",
        2.0,
        "the same door with inplace=True: the results written into the given params and state",
    )
    add(
        f"ensemble E={e}: {ENS_LOOP} / {ENS}",
        ratio(rows, "ensemble", 5e-4, ENS_LOOP, ENS),
        "{:.2f}x",
        ">=",
        3.0,
    )
    lo, hi = compile_row(res, "functional", 10), compile_row(res, "functional", 160)
    both = lo and hi
    rounds = len(hi["compile_s_samples"]) if both else 0
    add(
        f"{FUNC}: cold compile at 160 tensors / at 10",
        cold_compile.round_ratio(hi, lo) if both else None,
        "{:.2f}x",
        "<=",
        1.5,
        f"medians {lo['compile_s']:.1f} s and {hi['compile_s']:.1f} s; the median of {rounds} "
        "rounds' ratios, each of two fresh processes"
        if both
        else "",
    )
    fr = [r for r in res["compile"] if r["door"] == "functional" and "error" not in r]
    if fr:
        worst = max(fr, key=lambda r: r["graphs"])
        note = f"at {', '.join(str(r['tensors']) for r in fr)} tensors" + (
            f"; {worst['recompile_reasons'][0]}" if worst["recompile_reasons"] else ""
        )
        add(
            f"{FUNC}: graphs compiled over 20 steps, changing loss and lr",
            worst["graphs"],
            "{:d}",
            "=",
            1,
            note,
        )
    else:
        add(f"{FUNC}: graphs compiled over 20 steps, changing loss and lr", None, "{:d}", "=", 1)
    return out


def train_mode_ratios(res) -> list[tuple[str, str]]:
    rows, out = res["steps"], []
    for wd in (5e-4, 0.0):
        r = ratio(rows, "resnet18", wd, KOALA, ADAM, TRAIN)
        if r is not None:
            out.append((f"ResNet-18, wd {wd:g}: {KOALA} / {ADAM}", f"{r:.2f}x"))
    r = ratio(rows, "resnet18", 5e-4, AUTHORS, KOALA, TRAIN)
    if r is not None:
        out.append((f"ResNet-18, wd 5e-4: {AUTHORS} / {KOALA}", f"{r:.2f}x"))
    return out


def readme_figures(res) -> dict[str, str]:
    """The figures the README quotes, formatted exactly as it quotes them."""
    t = {d["target"]: d for d in res["targets"]}
    rows = res["steps"]
    f: dict[str, str] = {}
    for key, target in (
        ("koalapp_vs_adam", f"ResNet-18, wd 5e-4: {KOALA} / {ADAM}"),
        ("authors_vs_koalapp", f"ResNet-18, wd 5e-4: {AUTHORS} / {KOALA}"),
        ("koalapp_vs_adam_wd0", f"ResNet-18, wd 0: {KOALA} / {ADAM}"),
        ("ensemble_vs_adam_stacked", f"ensemble E={res.get('members', 64)}: {ENS} / {ENS_ADAM}"),
        ("adam_loop_vs_ensemble", f"ensemble E={res.get('members', 64)}: {ENS_LOOP} / {ENS}"),
        (
            "ensemble_inplace_vs_adam_stacked",
            f"ensemble E={res.get('members', 64)}: {ENS_INPLACE} / {ENS_ADAM}",
        ),
    ):
        if target in t and t[target]["measured"]:
            f[key] = t[target]["measured"]
    r = ratio(rows, "resnet18", 5e-4, FUNC, ADAM)
    if r is not None:
        f["functional_vs_adam"] = f"{r:.2f}x"
    for n in (10, 160):
        c = compile_row(res, "functional", n)
        if c:
            f[f"functional_compile_{n}"] = f"{c['compile_s']:.0f} s"
    f["report_minutes"] = f"{max(1, round(res['minutes']))} minutes"
    return f


README_TEXT = (
    "On this project's 2-core CPU machine, ResNet-18 parameter shapes, weight decay 5e-4, one "
    "`KoalaPP` step with default arguments takes {koalapp_vs_adam} the time of "
    "`torch.optim.Adam(fused=True)` ({koalapp_vs_adam_wd0} without weight decay), and an eager "
    "loop shaped like the authors' optimizer takes {authors_vs_koalapp} the time of `KoalaPP`; "
    "`torch.compile(opt.step, fullgraph=True)` over a TensorDict takes {functional_vs_adam} "
    "Adam's time and compiles cold in {functional_compile_10} at 10 tensors and "
    "{functional_compile_160} at 160. An ensemble of 64 small MLPs steps in one call in "
    "{ensemble_vs_adam_stacked} the time of one fused Adam step over the same stacked "
    "parameters ({ensemble_inplace_vs_adam_stacked} with `inplace=True`), while a loop of 64 "
    "fused Adam steps takes {adam_loop_vs_ensemble} as long. "
    "Tables, machine and method: [docs/benchmarks.md](docs/benchmarks.md); regenerate with "
    "`python -m benchmarks.report` (about {report_minutes}), or get a quick table with "
    "`python -m koala_func bench`."
)


def readme_paragraph(res) -> str | None:
    try:
        text = README_TEXT.format(**res["readme_figures"])
    except KeyError:  # a figure is missing from this run: leave the README alone
        return None
    return _wrap(text, 100)


def _wrap(text: str, width: int) -> str:
    lines, cur = [], ""
    for word in text.split(" "):
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    return "\n".join([*lines, cur])


def update_readme(path: Path, paragraph: str) -> bool:
    text = path.read_text()
    pat = re.compile(re.escape(README_BEGIN) + r"\n.*?\n" + re.escape(README_END), re.S)
    if not pat.search(text):
        return False
    path.write_text(pat.sub(lambda _: f"{README_BEGIN}\n{paragraph}\n{README_END}", text))
    return True


# ---------------------------------------------------------------------------- markdown
def _ms(s) -> str:
    if s is None:
        return ""
    return f"{s * 1e3:.3g}" if s < 10 else f"{s * 1e3:.0f}"


def _mb(b) -> str:
    return "" if b is None else f"{b / 1e6:.2f}" if b < 1e8 else f"{b / 1e6:.0f}"


def _yes(met) -> str:
    return "n/a" if met is None else "**yes**" if met else "**no**"


def markdown(res, command: str) -> str:
    members = res.get("members", 64)
    L = [
        "# Benchmarks",
        "",
        f"Generated by `{command}` (do not edit by hand; the run took {res['minutes']:.1f} "
        "minutes). "
        f"Step times are medians over {res['reps']} interleaved rounds (the ensemble's, whose "
        f"calls take milliseconds: {res.get('ensemble_reps', res['reps'])}; one call of every case "
        f"of a table per round, all cases in one process; {KOALA_REF} and {KOALA_EAGER}, when "
        f"slower than {harness.SLOW_S * 1e3:.0f} ms a call, take part in the first "
        f"{harness.SLOW_REPS} rounds only). A ratio (*x ...* columns, targets) is the median "
        "over rounds of the ratio of the two calls of one round, so a slow period of the "
        "shared machine, which slows both, cancels out; absolute times are noisy.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in res["machine"].items()],
        "",
        "## Targets (issue 10)",
        "",
        "| target | measured | target | met | note |",
        "|---|---:|---:|---|---|",
    ]
    for t in res["targets"]:
        note = t["note"].replace("|", "\\|").replace("<", "&lt;")
        L.append(
            f"| {t['target']} | {t['measured'] or 'n/a'} | {t['goal']} | "
            f"{_yes(t['met'])} | {note} |"
        )
    tm = train_mode_ratios(res)
    if tm:
        L += [
            "",
            f"The same ratios when the timed call is `{TRAIN}` (see Method):",
            "",
            "| ratio | measured |",
            "|---|---:|",
            *[f"| {a} | {b} |" for a, b in tm],
        ]
    L += [
        "",
        "## Method",
        "",
        f"- Rows with mode `{STEP}` time the optimizer step alone. The gradients are written "
        "once, in place into `p.grad` where the optimizer keeps a gradient buffer (`KoalaPP`'s "
        "parameters and gradients are views of its flat buffers), and the closure is "
        "`opt.step(loss=loss)` (`adam.step()`).",
        f"- *{KOALA_REPLACED}* assigns a new `p.grad` tensor to every parameter before each "
        "step (two preallocated sets in turn), the path that must copy the gradients.",
        f"- *{KOALA_EAGER}*: the same engine without `torch.compile` (the fallback where "
        f"compiling fails); *{KOALA_REF}*: the readable reference step.",
        f"- Rows with mode `{TRAIN}` time `opt.zero_grad()`, the backward pass of the cheapest "
        "loss with the same gradients (`sum_i <p_i, g_i>`) and the step: what the gradient "
        "buffer costs in a training step beyond the forward pass.",
        f"- *{FUNC}*: `step = torch.compile(koala_pp(...).step, fullgraph=True)` over "
        "`TensorDict.from_module(model)`, nested 8 parameters per submodule with an integer "
        "`num_batches_tracked` buffer in each, and `params, state = step(params, grads, loss, "
        "state)`.",
        f"- *{AUTHORS}*: benchmarks/authors_style.py, the tensor operations of the released "
        "`KOALAPlusPlus.update` (a Python loop over parameters, a host-synchronising skip "
        "test, `torch.dot` per product).",
        f"- *{COPY}*: `dst.copy_(src)` over as many floats as the set has: the memory bandwidth "
        "floor.",
        f"- Ensemble: E={members} members of an MLP 64-64-64-10 (`stack_params`, "
        "`ensemble_init`, `ensemble_step(opt)`); the peers are one `Adam(fused=True)` over the "
        f"stacked `[E, ...]` parameters and a loop of E `Adam(fused=True)` steps, one optimizer "
        "per member.",
        "- *first call s*: the first call in this process (compiles and builds buffers; the "
        "inductor cache may be warm). Cold compile times are in their own table.",
        "- *state MB*: the bytes of the distinct storages reachable from the optimizer object "
        "(`opt.state`, its attributes, the functional state, the ensemble step object (its "
        "packed gradient buffer), and the spare packed buffers "
        "that the case added to the CPU pool `koala_func.engine.layout.SPARE`) that are not a "
        "parameter's or a gradient's storage, so a flat buffer that the parameters are views "
        "of is not counted; tensors held only inside compiled functions are missed.",
        "- *step peak MB*: the peak of the bytes allocated during one steady-state call above "
        "what was allocated before it (temporaries and new outputs): on CPU the running sum of "
        "the CPU allocator's events recorded by `torch.profiler` (`profile_memory=True`), on "
        "CUDA `torch.cuda.max_memory_allocated`. *peak MB* = state + step peak, the memory the "
        "optimizer needs beyond the parameters and gradients.",
        "",
        "## Step time",
        "",
    ]
    rows = res["steps"]
    keys = list(dict.fromkeys((r["set"], r["weight_decay"]) for r in rows))
    for s, wd in keys:
        g = [r for r in rows if r["set"] == s and r["weight_decay"] == wd]
        base_name = ENS_ADAM if s == "ensemble" else ADAM
        title = f"ensemble, E={members}" if s == "ensemble" else s
        L += [
            f"### {title} ({g[0]['tensors']} tensors{' a member' if s == 'ensemble' else ''}, "
            f"{g[0]['floats'] / 1e6:.2f}M floats), weight_decay={wd:g}",
            "",
            f"| method | mode | median ms | min ms | rounds | x {base_name} | first call s "
            "| state MB | step peak MB | peak MB |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in g:
            if r["error"]:
                L.append(f"| {r['method']} | {r['mode']} | failed: `{r['error']}` ||||||||")
                continue
            base = find(rows, s, wd, base_name, r["mode"]) or find(rows, s, wd, base_name)
            rel = f"{paired(r, base):.2f}" if base else ""
            peak = (
                r["state_bytes"] + r["step_peak_bytes"]
                if r["state_bytes"] is not None and r["step_peak_bytes"] is not None
                else None
            )
            first = "" if r["first_s"] is None else f"{r['first_s']:.2f}"
            L.append(
                f"| {r['method']} | {r['mode']} | {_ms(r['median_s'])} | {_ms(r['min_s'])} | "
                f"{r['reps']} | {rel} | {first} | {_mb(r['state_bytes'])} | "
                f"{_mb(r['step_peak_bytes'])} | {_mb(peak)} |"
            )
        L.append("")
    L += [
        "## Cold compile",
        "",
        f"Each row is the median of {res.get('compile_samples', 1)} fresh processes "
        "(`python -m benchmarks.cold_compile DOOR N`), taken in rounds over every door and "
        "size (the *each round* column), each with "
        "`TORCHINDUCTOR_CACHE_DIR` a new empty directory and `TORCHINDUCTOR_FX_GRAPH_CACHE=0`, "
        "`TORCHINDUCTOR_AUTOGRAD_CACHE=0`, on N tiny tensors nested 8 per submodule (the "
        f"ensemble: E={res.get('compile_members', members)} members of N tensors each), 20 "
        "steps with a changing loss and lr (`KoalaPP`: an `ExponentialLR` scheduler; the "
        "functional door and the ensemble: `state.with_hyperparams(lr=...)`). *cold* is the "
        "first step minus the steady-state step (median of the last 10); *total* adds the "
        "excess of every later step (a recompile); *graphs* counts the graphs Dynamo compiled "
        "over the 20 steps (`torch._dynamo.utils.counters['stats']['unique_graphs']`), less "
        "any kernel of the engine's update op (`koala_func::overwrite_update`, compiled once "
        "per process and dtype where a step is traced inside a user's graph; none of these "
        "doors compiles it: `op_graphs` in the JSON).",
        "",
    ]
    if res["compile"]:
        L += [
            "| door | tensors | cold s | each round, cold s | total s | graphs | first step s "
            "| steady step ms |",
            "|---|---:|---:|---|---:|---:|---:|---:|",
        ]
        cm = res.get("compile_members", members)
        for c in res["compile"]:
            label = DOOR_LABELS.get(c["door"], c["door"]).replace("(E ", f"(E={cm} ")
            if "error" in c:
                L.append(f"| {label} | {c['tensors']} | failed: {c['error']} ||||||")
            else:
                each = ", ".join(
                    "failed" if x is None else f"{x:.1f}" for x in c["compile_s_samples"]
                )
                L.append(
                    f"| {label} | {c['tensors']} | {c['compile_s']:.1f} | {each} | "
                    f"{c['total_compile_s']:.1f} | {c['graphs']} | {c['first_s']:.1f} | "
                    f"{c['steady_s'] * 1e3:.3g} |"
                )
        reasons = [
            (r["door"], r["tensors"], r["recompile_reasons"][0])
            for r in res["compile"]
            if r.get("recompile_reasons")
        ]
        if reasons:
            L += ["", "First recompile reason Dynamo logged, where there was one:", ""]
            L += [f"- {DOOR_LABELS.get(d, d)}, {n} tensors: `{why}`" for d, n, why in reasons]
        L.append("")
    if res.get("recompiles"):
        L += [
            "### Recompiles, by how the parameters are made",
            "",
            "Graphs Dynamo compiles over 20 steps with a changing loss and lr, 10 tensors, in "
            'the report\'s process with `backend="eager"` (graph capture and guards only: '
            "whether a door recompiles does not depend on the backend).",
            "",
            "| door and parameters | graphs over 20 steps |",
            "|---|---:|",
            *[f"| `{k}` | {v} |" for k, v in res["recompiles"].items()],
            "",
        ]
    L += passes_section(res)
    L += fresh_pages_section(res)
    L += sharded_section(res)
    L += [
        "## GPU",
        "",
        "`python benchmarks/gpu_check.py` (parity of every door against the reference in "
        "float32 and bfloat16 on CUDA, the doors against `AdamW(fused=True)`, the CUDA-graph "
        "recipe) was not run for this page: there is no CUDA device on this machine. The "
        "same checks run on the CPU in the tests (`--device cpu --quick`, a dry run of the "
        "script; CUDA graphs excepted).",
        "",
        "![benchmarks](img/benchmarks.png)",
        "",
    ]
    return "\n".join(L)


def passes_section(res) -> list[str]:
    """The pass-by-pass table (``bench_passes.run``), where the run measured it."""
    if not res.get("passes"):
        return []
    L: list[str] = []
    p = res["passes"]
    L += [
        "## What bounds the step (pass by pass)",
        "",
        f"`python benchmarks/bench_passes.py` in this run: ResNet-18 shapes, float32, weight "
        f"decay 0, {p['reps']} interleaved rounds. *KoalaPP step* is the door; *pass 1* and "
        "*pass 2* are the engine's own two passes (`koala_func.engine.passes.partial_sums` and "
        f"`write_update`), each compiled alone over a packed layout of the same shapes "
        f"({p['shape']}); the inductor pass with Adam's traffic is a compiled stand-in for "
        "Adam's update. Two rows split reads from writes: pass 2 without its write of "
        "`h_prev`, and a compiled sum of seven arrays of the parameters' size (the step's "
        "reads, and nothing else). *x Adam* is the median per-round ratio to "
        "`Adam(fused=True)`.",
        "",
        "| what | arrays of the parameters' size | median ms | x Adam |",
        "|---|---|---:|---:|",
    ]
    L += [
        f"| {k} | {p['traffic'][k]} | {v:.2f} | {p['x_adam'][k]:.2f} |" for k, v in p["ms"].items()
    ]
    L.append("")
    from .bench_passes import PASS2_NO_H, READS

    x = p["x_adam"]
    stand_in = x["inductor pass, Adam's traffic"]
    L += [
        "Pass 2 moves what an Adam step moves: "
        f"{x['pass 2: update']:.2f}x `Adam(fused=True)`, against {stand_in:.2f}x for the "
        "inductor stand-in with the same traffic. Pass 1, the extra read of `g, h_prev, v` "
        "that the block sums need before any element of a block can be updated, costs "
        f"{x['pass 1: block sums']:.2f}x. The two passes sum to {x['pass 1 + pass 2']:.2f}x "
        f"and the whole step measured {x['KoalaPP step']:.2f}x. Reads are most of it: pass 2 "
        f"without its write of `h_prev` measured {x[PASS2_NO_H]:.2f}x (with it "
        f"{x['pass 2: update']:.2f}x), and reading the step's seven arrays, with no "
        f"arithmetic and no write, {x[READS]:.2f}x. Every "
        "KOALA++ step reads `g, h_prev, v` twice (the block sums must be complete before any "
        "element of the block is updated), "
        + (
            "so that sum is the floor of the step on this machine, "
            f"{x['KoalaPP step'] - x[READS]:.2f} Adam steps below what the step measured: the "
            "arithmetic, the writes and running as two passes cost that much together."
            if x[READS] < x["KoalaPP step"]
            else "but in this run that compiled sum was slower than the step itself, so it "
            "bounds nothing here (a reduction of seven arrays to one number is not how the "
            "passes read them); the pass rows are the measure."
        ),
        "",
    ]
    L += reuse_section(p.get("reuse"), p.get("split"))
    return L


def reuse_section(rows, split=None) -> list[str]:
    """What a second read from cache saves (``bench_passes.reuse``), where measured."""
    if not rows:
        return []
    from .bench_passes import AFTER_PASS1, FLUSHED, WARM

    L = [
        "Could the second read come from the cache? A step over layouts small enough for it "
        "(the step split into groups of blocks) would read each group's `g, h_prev, v` again "
        "right after its pass 1. `python benchmarks/bench_passes.py --reuse` in this run: pass "
        f"2 alone over buffers of {rows[0]['floats'] / 1e6:.2f}M to "
        f"{rows[-1]['floats'] / 1e6:.2f}M floats, after 64 MiB were written (its inputs come "
        "from memory), right after pass 1 over the same buffers, and right after itself (all "
        "four inputs warm); median ms, and over the first column.",
        "",
        f"| floats | {FLUSHED} | {AFTER_PASS1} | {WARM} |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = " | ".join(f"{r[k]:.3f} ({r['x ' + k]:.2f})" for k in (FLUSHED, AFTER_PASS1, WARM))
        L.append(f"| {r['floats'] / 1e6:.2f}M | {cells} |")
    after = [r[f"x {AFTER_PASS1}"] for r in rows]
    L += [
        "",
        f"Right after pass 1, pass 2 took {min(after):.2f}-{max(after):.2f} of its time from "
        "memory: reading from the cache saves little on this machine.",
    ]
    if split:
        ks = [k for k in split["ms"] if k != 1]
        cells = ", ".join(f"{k} calls {split['x_one'][k]:.2f}" for k in ks)
        L[-1] += (
            " The split by itself: both passes over "
            f"{split['floats'] / 1e6:.2f}M floats as several compiled calls over row segments, "
            f"each after 64 MiB were written, took, over one call ({split['ms'][1]:.2f} ms): "
            f"{cells}. So splitting would gain at most the saving above, less what the calls "
            "add."
        )
    L += ["", "The step stays one graph over whole layouts.", ""]
    return L


def fresh_pages_section(res) -> list[str]:
    """The doors under each allocator setting of ``fresh_pages.CONFIGS``, one process each."""
    runs = res.get("fresh_pages") or []
    if not runs:
        return []
    configs = list(dict.fromkeys(r["config"] for r in runs))
    names = [fresh_pages.CONFIGS[c][1] for c in configs]
    L = [
        "## On CPU: fresh pages",
        "",
        "A fresh CPU buffer of more than a few megabytes pays a page fault for every 4 KiB on "
        "its first write. Doors that allocate their results every step pay it every step; "
        "in-place ones do not. Two settings of the environment, read when the process starts "
        f"and applied to the whole process, avoid most of it: `{fresh_pages.VAR}=1` (PyTorch "
        "backs CPU allocations of 2 MiB and more with transparent huge pages) and "
        f"`GLIBC_TUNABLES={fresh_pages.GLIBC}` (glibc serves large blocks from its heap and "
        "keeps freed memory for reuse, never handing it back to the system). Each column below "
        "is one fresh process (`python -m benchmarks.fresh_pages SET "
        f"{'|'.join(fresh_pages.CONFIGS)}`), weight decay 5e-4, step only; *x Adam* is the "
        "median per-round ratio to `Adam(fused=True)` in the same process.",
        "",
        "| set | door | " + " | ".join(f"{n} ms | x Adam" for n in names) + " |",
        "|---|---|" + "---:|---:|" * len(names),
    ]
    for set_name in dict.fromkeys(r["set"] for r in runs):
        cols = {r["config"]: r for r in runs if r["set"] == set_name}
        if any("error" in r for r in cols.values()):
            errors = "; ".join(r["error"] for r in cols.values() if "error" in r)
            L.append(f"| {set_name} | failed: {errors} |" + "|" * (2 * len(names)))
            continue
        by = {c: {row["method"]: row for row in r["rows"]} for c, r in cols.items()}
        for method in by[configs[0]]:
            cells = []
            for c in configs:
                row, base = by[c].get(method), by[c].get(ADAM)
                if not row or not row["median_s"]:
                    cells += [(row or {}).get("error") or "n/a", ""]
                    continue
                x = paired(row, base) if base and base["median_s"] else None
                cells += [_ms(row["median_s"]), f"{x:.2f}" if x else ""]
            L.append(f"| {set_name} | {method} | " + " | ".join(cells) + " |")
    L += [
        "",
        "The library sets neither: they change how the whole process allocates, and steps "
        "that allocate many short-lived temporaries can be slower with huge pages (compare "
        "the rows). See [gotchas](gotchas.md#on-cpu-fresh-buffers-pay-page-faults).",
        "",
    ]
    return L


def sharded_section(res) -> list[str]:
    """The sharded doors beside ``Adam(fused=True)`` on DTensor parameters, 2 gloo ranks."""
    run = res.get("sharded")
    if not run:
        return []
    shapes = ", ".join(f"`{k}` {tuple(v)}" for k, v in run["shapes"].items())
    L = [
        "## Sharded parameters (FSDP2), 2 ranks",
        "",
        f"`python -m benchmarks.sharded` (in this run): {run['world']} gloo ranks on this "
        f"machine, one thread each, `Shard(0)` DTensor parameters and gradients, as "
        f"`fully_shard` hands them to an optimizer ({shapes}: {run['floats']:,} floats, "
        f"float32), optimizer step only, {run['reps']} interleaved rounds with a barrier before "
        "every call; rank 0's times. *x Adam* is the median per-round ratio to "
        "`Adam(fused=True)` on the same parameters. Collectives are counted with "
        "`CommDebugMode` on an eager step (compiled code does not run under a dispatch mode; "
        "it is traced from the same code). *max diff* compares each door's parameters with the "
        "reference step's after the same steps.",
        "",
    ]
    if "error" in run:
        return [*L, f"The run failed: {run['error']}", ""]
    rows = {r["door"]: r for r in run["rows"]}
    base = rows.get(sharded.ADAM)
    L += [
        "| door | collectives per step | median ms | x Adam | max diff |",
        "|---|---|---:|---:|---:|",
    ]
    for door, r in rows.items():
        comm = r["collectives"]
        if comm is None:
            counted = "(compiled: as eager)"
        else:
            ops = ", ".join(f"{v} {k}" for k, v in comm["ops"].items())
            counted = f"{comm['total']}" + (f" ({ops})" if ops else "")
        x = paired(r, base) if base else None
        diff = "" if r["max_diff"] is None else f"{r['max_diff']:.1e}"
        xs = f"{x:.2f}" if x else ""
        L.append(f"| {door} | {counted} | {_ms(r['median_s'])} | {xs} | {diff} |")
    L += [
        "",
        "`KoalaPP` on DTensor parameters copies the local shards of the parameters and "
        "gradients into its buffers and back each step (FSDP2 owns the parameters' storage), "
        "so it does not reach the in-place speed it has on plain parameters. The float64 "
        "parity, the single all-reduce and uneven shards are checked in "
        "`tests/test_distributed.py`.",
        "",
    ]
    return L


def plot(res, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["steps"] if r["mode"] == STEP and r["weight_decay"] != 0.0]
    sets = [s for s in dict.fromkeys(r["set"] for r in rows) if s != "ensemble"]
    methods = [KOALA, KOALA_REPLACED, KOALA_EAGER, FUNC, AUTHORS, KOALA_REF]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), width_ratios=[3, 2])
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        ys = [ratio(rows, s, 5e-4, m, ADAM) or math.nan for s in sets]
        ax.bar([j + i * width for j in range(len(sets))], ys, width, label=m)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sets))], sets)
    ax.set_yscale("log")
    ax.set_ylabel(f"step time / {ADAM} (median, wd 5e-4)")
    ax.legend(fontsize=7)
    for d in dict.fromkeys(r["door"] for r in res["compile"]):
        pts = [
            (r["tensors"], r["compile_s"])
            for r in res["compile"]
            if r["door"] == d and "error" not in r
        ]
        if pts:
            ax2.plot(*zip(*pts, strict=True), "o-", label=DOOR_LABELS.get(d, d))
    ax2.set_xlabel("parameter tensors")
    ax2.set_ylabel("cold compile, s (fresh process)")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------- quick table
def quick_table(repeats: int = 20, compile: bool = True, sets=("mlp", "resnet18")) -> str:
    """A quick side-by-side run (``koala-func bench`` from a checkout): weight_decay=5e-4, the
    optimizer step only, ratio = method time / ``Adam(fused=True)`` time. ``compile=False``
    times ``KoalaPP(compile=False)`` (the eager engine) instead of the compiled default."""
    koala = KOALA if compile else KOALA_EAGER
    plan = [(m, STEP) for m in (ADAM, koala, AUTHORS, ADAM_LOOP)]
    rows = []
    for s in sets:
        rows += harness.run_group(s, 5e-4, plan, repeats, log=lambda *_: None)
    lines = [
        f"median of {repeats} interleaved steps, weight_decay=5e-4, "
        f"{torch.get_num_threads()} threads; ratio = method time / {ADAM} time",
        "",
        "| set | method | median ms | ratio |",
        "|---|---|---:|---:|",
    ]
    for r in rows:
        rel = ratio(rows, r["set"], 5e-4, r["method"], ADAM)
        cell = f"{rel:.2f}" if rel is not None else f"failed: {r['error']}"
        lines.append(f"| {r['set']} | {r['method']} | {_ms(r['median_s'])} | {cell} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS))
    p.add_argument("--members", type=int, default=64, help="ensemble size")
    p.add_argument("--ensemble-reps", type=int, default=300, help="rounds of the ensemble table")
    p.add_argument("--full-plan", action="store_true", help="every set: both modes, wd 0 too")
    p.add_argument("--compile-tensors", nargs="*", type=int, default=[10, 160, 500])
    p.add_argument(
        "--compile-doors", nargs="*", default=list(cold_compile.DOORS), choices=cold_compile.DOORS
    )
    p.add_argument("--compile-timeout", type=float, default=240, help="seconds per process")
    p.add_argument("--compile-members", type=int, default=8, help="ensemble size, cold compile")
    p.add_argument(
        "--compile-samples", type=int, default=3, help="fresh processes per cold-compile row"
    )
    p.add_argument("--no-passes", dest="passes", action="store_false")
    p.add_argument(
        "--fresh-pages-sets", nargs="*", default=["resnet18"], help="[] to skip that section"
    )
    p.add_argument("--fresh-pages-methods", nargs="+", default=list(fresh_pages.PLAN))
    p.add_argument(
        "--sharded-reps", type=int, default=20, help="rounds of the sharded doors (0: skip)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "benchmarks.json")
    p.add_argument("--img", type=Path, default=ROOT / "docs" / "img" / "benchmarks.png")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--no-readme", dest="readme", action="store_const", const=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = measure(args)
    command = "python -m benchmarks.report" + (f" {' '.join(argv)}" if argv else "")
    res["command"] = command
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(res, command))
    args.json.write_text(json.dumps(res, indent=1) + "\n")
    wrote = [args.out, args.json] + ([args.img] if plot(res, args.img) else [])
    if args.readme is not None:
        para = readme_paragraph(res)
        if para is None:
            print("README left alone: this run lacks a figure it quotes")
        elif update_readme(args.readme, para):
            wrote.append(args.readme)
        else:
            print(f"README left alone: no {README_BEGIN!r} marker in {args.readme}")
    for t in res["targets"]:
        print(f"{t['target']}: {t['measured'] or 'n/a'} (target {t['goal']}) {_yes(t['met'])}")
    print("wrote " + ", ".join(str(w) for w in wrote))
    return res


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
