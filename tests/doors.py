"""The door table: every way a user reaches the KOALA++ step, and what each supports.

In the style of torch's ``OptimizerInfo`` / ``optim_db``: :data:`DOORS` lists the doors, each
with the features it supports and a factory that builds a :class:`Runner` for a
:class:`Config`; :func:`configs_for` generates the configurations a door is tested in. The
generic tests in ``test_doors.py`` drive every door through the same training loop, step by
step, against the independent oracle (``reference_koala.py``, float64) or the readable
reference step (lower precisions).

All doors train one model shape (an 8-16-3 tanh MLP), so that the compiled doors share their
compiled graphs across tests: the compiled functions are cached at module level, by the
optimizer's structure, and each compiled door is given at most three configurations.
The sharded doors (FSDP2 / DTensor, several processes) are tested in test_distributed.py.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from reference_koala import ReferenceKoalaPP
from tensordict import TensorDict

import koala_func as kf
from koala_func.checkpoint import load_state, save_state

# Every compiled door adds cache entries to the code objects of KoalaPPTransform.step and of
# KoalaPP's step; keep Dynamo from falling back to eager when other test files compiled first.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)

F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16
NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]
NAN, INF = float("nan"), float("inf")

# ---------------------------------------------------------------------------- configurations

#: Steps at which each event happens (a missing and a zero gradient at the first steps give
#: blocks a late first update, as in the released optimizer).
EVENT_STEPS = {
    "missing": (0, 9),
    "zero_grad": (1, 6),
    "nan_grad": (3,),
    "inf_grad": (4,),
    "nan_loss": (7,),
    "inf_loss": (8,),
    "low_loss": (10, 11),
}
VALUE_EVENTS = ("zero_grad", "nan_grad", "inf_grad", "nan_loss", "inf_loss")


@dataclass(frozen=True)
class Config:
    """One configuration of the optimizer and of the training run."""

    granularity: str = "tensor"
    symmetric: bool = True
    r: float | None = None  # None: online R
    r_statistic: str = "second_moment"
    weight_decay: float = 0.0
    dtype: torch.dtype = F64
    state_dtype: torch.dtype | None = None
    per_sample: bool = True  # per-sample losses (1-d) or their mean (0-d)
    loss_target: float = 0.0
    events: tuple[str, ...] = ()
    steps: int = 200
    lr: float = 0.5

    @property
    def id(self) -> str:
        parts = [
            self.granularity,
            "sym" if self.symmetric else "asym",
            "onlineR" if self.r is None else f"R{self.r}",
        ]
        if self.r is None:
            parts.append("var" if self.r_statistic == "variance" else "m2")
        parts.append(f"wd{self.weight_decay:g}")
        parts.append(str(self.dtype).removeprefix("torch."))
        if self.state_dtype is not None:
            parts.append("state-" + str(self.state_dtype).removeprefix("torch."))
        if not self.per_sample:
            parts.append("meanloss")
        if self.loss_target:
            parts.append(f"target{self.loss_target:g}")
        if self.events:
            parts.append("+".join(self.events))
        parts.append(f"{self.steps}steps")
        return "-".join(parts)

    def builder_kwargs(self) -> dict:
        """The keyword arguments shared by ``koala_pp`` and ``KoalaPP``."""
        return dict(
            lr=self.lr,
            sigma=0.1,
            q=0.1,
            r=self.r,
            alpha_r=0.9,
            weight_decay=self.weight_decay,
            loss_target=self.loss_target,
            symmetric=self.symmetric,
            granularity=self.granularity,
            r_statistic=self.r_statistic,
            state_dtype=self.state_dtype,
        )

    def oracle_kwargs(self, lr: float) -> dict:
        kw = self.builder_kwargs()
        kw.pop("state_dtype")
        return {**kw, "lr": lr}

    def events_at(self, k: int) -> list[str]:
        return [e for e in self.events if k in EVENT_STEPS[e]]

    @property
    def needs(self) -> set[str]:
        """The door features this configuration uses."""
        out = set()
        if self.granularity == "global":
            out.add("global")
        if self.r is not None:
            out.add("fixed_r")
        if self.r_statistic == "variance":
            out.add("variance")
        if self.dtype != F64:
            out.add(str(self.dtype).removeprefix("torch."))
        if not self.per_sample:
            out.add("mean_loss")
        if "missing" in self.events:
            out.add("missing")
        if set(self.events) & set(VALUE_EVENTS):
            out.add("skips")
        if self.loss_target:
            out.add("loss_target")
        return out


def _r_modes():
    # (r, r_statistic): online with either statistic, or fixed
    return [(None, "second_moment"), (None, "variance"), (0.5, "second_moment")]


def full_matrix(steps: int = 25) -> list[Config]:
    """Every combination of the structural options, in float64."""
    out = []
    for gran, sym, (r, stat), wd in itertools.product(
        ["tensor", "global"], [True, False], _r_modes(), [0.0, 5e-4]
    ):
        out.append(Config(gran, sym, r, stat, wd, steps=steps))
    return out


def covering_matrix(steps: int = 25) -> list[Config]:
    """A pairwise covering of the structural options (every pair of values appears)."""
    rows = [
        ("tensor", True, 0, 5e-4),
        ("tensor", False, 1, 0.0),
        ("tensor", True, 2, 0.0),
        ("global", False, 0, 0.0),
        ("global", True, 1, 5e-4),
        ("global", False, 2, 5e-4),
    ]
    modes = _r_modes()
    return [Config(g, s, modes[m][0], modes[m][1], wd, steps=steps) for g, s, m, wd in rows]


#: The long float64 runs (200 steps at 1e-10): the released setting and the paper's.
LONG = (
    Config(weight_decay=5e-4, steps=200),
    Config(granularity="global", symmetric=False, r_statistic="variance", steps=200),
)


def special_configs() -> list[Config]:
    """Skips, missing gradients, the loss target, the scalar loss and the lower precisions."""
    skips = ("missing", *VALUE_EVENTS)
    return [
        Config(weight_decay=5e-4, events=skips, steps=16),
        Config(granularity="global", symmetric=False, events=skips, steps=16),
        Config(r=0.5, per_sample=False, weight_decay=5e-4, steps=16),
        Config(granularity="global", per_sample=False, steps=16),
        Config(loss_target=0.4, weight_decay=5e-4, events=("low_loss",), steps=16),
        Config(
            granularity="global",
            r_statistic="variance",
            loss_target=0.4,
            events=("low_loss",),
            steps=16,
        ),
        Config(dtype=F32, weight_decay=5e-4, events=skips, steps=30),
        Config(dtype=F32, granularity="global", symmetric=False, r=0.5, steps=30),
        Config(dtype=BF16, state_dtype=F32, weight_decay=5e-4, steps=12),
        Config(dtype=BF16, state_dtype=F32, granularity="global", events=skips, steps=12),
    ]


# ------------------------------------------------------------------------------- the task


def make_model(seed: int = 0, dtype: torch.dtype = F64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(
        dtype
    )


def initial_params(seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in make_model(seed, dtype).named_parameters()}


DATA_X = torch.randn(128, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
DATA_Y = ((DATA_X[:, 0] > 0).long() + (DATA_X[:, 1] > 0.5).long()).clamp_max(2)


def batch(k: int, dtype: torch.dtype):
    idx = torch.arange(k * 24, k * 24 + 32) % DATA_X.shape[0]
    return DATA_X[idx].to(dtype), DATA_Y[idx]


def losses_of(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(F.linear(x, p["0.weight"], p["0.bias"]))
    return F.cross_entropy(F.linear(h, p["2.weight"], p["2.bias"]), y, reduction="none")


def grads_and_losses(p: dict[str, torch.Tensor], x, y):
    leaves = {k: v.detach().requires_grad_() for k, v in p.items()}
    losses = losses_of(leaves, x, y)
    gs = torch.autograd.grad(losses.mean(), list(leaves.values()))
    return dict(zip(leaves, gs, strict=True)), losses.detach()


def apply_event(event: str, grads: dict, losses: torch.Tensor) -> torch.Tensor:
    """Edit the gradients in place (``None``: missing) and return the losses to use."""
    if event == "missing":
        grads["2.bias"] = None
    elif event == "zero_grad":
        grads["0.bias"].zero_()
    elif event == "nan_grad":
        grads["2.weight"].view(-1)[3] = NAN
    elif event == "inf_grad":
        grads["0.weight"].view(-1)[5] = -INF
    elif event == "nan_loss":
        losses = losses.clone()
        losses[0] = NAN
    elif event == "inf_loss":
        losses = losses.clone()
        losses[1] = INF
    elif event == "low_loss":
        losses = losses * 0.05  # below the loss target: a negative residual
    else:
        raise ValueError(event)
    return losses


def blocks_of(config: Config) -> list[list[str]]:
    return [[n] for n in NAMES] if config.granularity == "tensor" else [list(NAMES)]


# ----------------------------------------------------------------------------------- runners


class Runner:
    """One training run through one door. ``members`` > 1 for the ensemble doors.

    Events that edit values (NaN, a zero gradient, a low loss) hit member ``event_member``
    only; a missing gradient is missing for every member (a TensorDict key is structure).
    """

    members = 1
    event_member = 0

    def __init__(self, config: Config, seeds=(0,), lrs=None):
        self.config = config
        self.seeds = tuple(seeds)
        self.lrs = tuple(lrs) if lrs is not None else (config.lr,) * len(self.seeds)
        self.k = 0

    # -- the loop
    def step(self) -> None:
        cfg = self.config
        x, y = batch(self.k, cfg.dtype)
        grads, losses = self.compute(x, y)
        for m in range(self.members):
            for ev in cfg.events_at(self.k):
                if ev == "missing" or m == self.event_member:
                    losses[m] = apply_event(ev, grads[m], losses[m])
        loss = losses if cfg.per_sample else [t.mean() for t in losses]
        self.apply(grads, loss)
        self.k += 1

    def compute(self, x, y) -> tuple[list[dict], list[torch.Tensor]]:
        """Per member: the gradients by name (mutable) and the per-sample losses."""
        out = [grads_and_losses(p, x, y) for p in self.params()]
        return [g for g, _ in out], [loss for _, loss in out]

    def apply(self, grads: list[dict], loss: list[torch.Tensor]) -> None:
        raise NotImplementedError

    # -- what is compared
    def params(self) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def state(self) -> list[dict]:
        """Per member: ``v``, ``h_prev`` (dicts by name), ``s``, ``count``, ``skipped`` (per
        block), ``r_est``, ``step``."""
        raise NotImplementedError

    # -- checkpoints
    def checkpoint(self) -> bytes:
        raise NotImplementedError

    def restore(self, blob: bytes) -> Runner:
        """A fresh runner (new objects, other initial values) continued from ``blob``."""
        raise NotImplementedError


def _canon_functional(state, names=NAMES) -> dict:
    v, h = state.v.flatten_keys("."), state.h_prev.flatten_keys(".")
    return dict(
        v={n: v[n] for n in names},
        h_prev={n: h[n] for n in names},
        s=state.s,
        count=state.count,
        skipped=state.skipped,
        r_est=state.r_est,
        step=state.step,
    )


def _td(d: dict[str, torch.Tensor | None]) -> TensorDict:
    return TensorDict({k: v for k, v in d.items() if v is not None}).unflatten_keys(".")


def _save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _load(blob: bytes):
    return torch.load(io.BytesIO(blob), weights_only=True)


class OracleRunner(Runner):
    """The independent float64 oracle (each member its own :class:`ReferenceKoalaPP`)."""

    def __init__(self, config, seeds=(0,), lrs=None, members_like: Runner | None = None):
        super().__init__(config, seeds, lrs)
        if members_like is not None:
            self.members, self.event_member = members_like.members, members_like.event_member
        self.theta = [
            {n: t.to(F64) for n, t in initial_params(s, config.dtype).items()} for s in self.seeds
        ]
        self.opts = [ReferenceKoalaPP(NAMES, **config.oracle_kwargs(lr)) for lr in self.lrs]

    def step(self) -> None:
        # the oracle always computes in float64, whatever the door's dtype
        cfg = self.config
        x, y = batch(self.k, cfg.dtype)
        x = x.to(F64)
        for m, (theta, opt) in enumerate(zip(self.theta, self.opts, strict=True)):
            grads, losses = grads_and_losses(theta, x, y)
            for ev in cfg.events_at(self.k):
                if ev == "missing" or m == self.event_member:
                    losses = apply_event(ev, grads, losses)
            opt.update(
                theta,
                {k: g for k, g in grads.items() if g is not None},
                losses if cfg.per_sample else losses.mean(),
            )
        self.k += 1

    def params(self):
        return [dict(t) for t in self.theta]

    def state(self):
        out = []
        for theta, o in zip(self.theta, self.opts, strict=True):
            v, h = {}, {}
            for b, names in enumerate(o.blocks):
                offset = 0
                for n in names:
                    k = theta[n].numel()
                    for dst, src in ((v, o.v[b]), (h, o.H[b])):
                        dst[n] = (
                            torch.zeros_like(theta[n])
                            if src is None
                            else src[offset : offset + k].view_as(theta[n])
                        )
                    offset += k
            out.append(
                dict(
                    v=v,
                    h_prev=h,
                    s=torch.stack(
                        [torch.as_tensor(0.0 if s is None else s, dtype=F64) for s in o.S]
                    ),
                    count=torch.tensor(o.count),
                    skipped=torch.tensor(o.skipped),
                    r_est=torch.as_tensor(o.R if o.fixed_r is None else o.fixed_r, dtype=F64),
                    step=torch.tensor(o.steps),
                )
            )
        return out


class FunctionalRunner(Runner):
    """``koala_pp(...)``: ``opt.step`` eagerly (``impl`` "auto" or "engine"), or compiled."""

    def __init__(self, config, seeds=(0,), lrs=None, *, impl="auto", compiled=False):
        super().__init__(config, seeds, lrs)
        self.impl, self.compiled = impl, compiled
        self.opt, self.step_fn = functional_step(config, impl, compiled)
        params = _td(initial_params(self.seeds[0], config.dtype))
        self.p = params
        self.st = self.opt.init(params).with_hyperparams(lr=self.lrs[0])

    def apply(self, grads, loss):
        self.p, self.st = self.step_fn(self.p, _td(grads[0]), loss[0], self.st)

    def params(self):
        flat = self.p.flatten_keys(".")
        return [{n: flat[n] for n in NAMES}]

    def state(self):
        return [_canon_functional(self.st)]

    def checkpoint(self):
        buf = io.BytesIO()
        save_state(self.st, buf, params=self.p)
        return buf.getvalue()

    def restore(self, blob):
        new = FunctionalRunner(
            self.config, seeds=(7,), lrs=(123.0,), impl=self.impl, compiled=self.compiled
        )
        new.st, new.p = load_state(io.BytesIO(blob))
        new.k = self.k
        return new


class OptimRunner(Runner):
    """``KoalaPP(model.parameters(), ...)``: backward into ``p.grad``, ``step(loss=...)``."""

    def __init__(self, config, seeds=(0,), lrs=None, *, impl="engine", compile=False):
        super().__init__(config, seeds, lrs)
        self.impl, self.compile = impl, compile
        self.model = make_model(self.seeds[0], config.dtype)
        kw = {**config.builder_kwargs(), "lr": self.lrs[0]}
        self.opt = kf.KoalaPP(self.model.parameters(), **kw, impl=impl, compile=compile)

    def compute(self, x, y):
        self.opt.zero_grad()
        named = dict(self.model.named_parameters())
        losses = losses_of(named, x, y)
        losses.mean().backward()
        return [{n: p.grad for n, p in named.items()}], [losses.detach()]

    def apply(self, grads, loss):
        for n, p in self.model.named_parameters():
            if grads[0][n] is None:
                p.grad = None
        self.opt.step(loss=loss[0])

    def params(self):
        return [{n: p.detach() for n, p in self.model.named_parameters()}]

    def state(self):
        ps = [p for _, p in self.model.named_parameters()]
        sts = [self.opt.state[p] for p in ps]
        blocks = sts if self.config.granularity == "tensor" else sts[:1]
        return [
            dict(
                v=dict(zip(NAMES, [s["v"] for s in sts], strict=True)),
                h_prev=dict(zip(NAMES, [s["h_prev"] for s in sts], strict=True)),
                **{k: torch.stack([b[k] for b in blocks]) for k in ("s", "count", "skipped")},
                r_est=sts[0]["r_est"],
                step=sts[0]["step"],
            )
        ]

    def checkpoint(self):
        return _save({"model": self.model.state_dict(), "opt": self.opt.state_dict()})

    def restore(self, blob):
        ckpt = _load(blob)
        new = OptimRunner(
            self.config, seeds=(7,), lrs=(123.0,), impl=self.impl, compile=self.compile
        )
        new.model.load_state_dict(ckpt["model"])  # into the views of the optimizer's buffers
        new.opt.load_state_dict(ckpt["opt"])
        new.k = self.k
        return new


class EnsembleRunner(Runner):
    """``ensemble_step(opt)`` (compiled: the engine with a member dimension) or
    ``ensemble_step(opt, compile=False)`` (``torch.vmap`` of ``opt.step``); ``inplace``:
    ``ensemble_step(opt, inplace=True)`` on packed member views (:func:`kf.member_views`),
    which must return the same objects, updated."""

    members = 2
    event_member = 1

    def __init__(
        self, config, seeds=(0, 1), lrs=None, *, impl="auto", compiled=True, inplace=False
    ):
        lrs = lrs if lrs is not None else (config.lr, 0.6 * config.lr)
        super().__init__(config, seeds, lrs)
        self.impl, self.compiled, self.inplace = impl, compiled, inplace
        self.opt, self.step_fn = ensemble_fn(config, impl, compiled, inplace)
        self.p = torch.stack([_td(initial_params(s, config.dtype)) for s in self.seeds])
        if inplace:
            self.p = kf.member_views(self.p)
        lr = torch.tensor(self.lrs, dtype=torch.promote_types(config.dtype, F32))
        self.st = kf.ensemble_init(self.opt, self.p, lr=lr)

    def apply(self, grads, loss):
        present = [n for n in NAMES if grads[0][n] is not None]
        g = TensorDict(
            {n: torch.stack([gm[n] for gm in grads]) for n in present}, batch_size=[self.members]
        ).unflatten_keys(".")
        p, st = self.step_fn(self.p, g, torch.stack(loss), self.st)
        if self.inplace:
            assert p is self.p and st is self.st, "an in-place step returns its inputs"
        self.p, self.st = p, st

    def params(self):
        flat = self.p.flatten_keys(".")
        return [{n: flat[n][e] for n in NAMES} for e in range(self.members)]

    def state(self):
        return [_canon_functional(self.st[e]) for e in range(self.members)]

    def checkpoint(self):
        buf = io.BytesIO()
        save_state(self.st, buf, params=self.p)
        return buf.getvalue()

    def restore(self, blob):
        new = EnsembleRunner(
            self.config,
            seeds=(7, 8),
            lrs=(1.0, 2.0),
            impl=self.impl,
            compiled=self.compiled,
            inplace=self.inplace,
        )
        new.st, new.p = load_state(io.BytesIO(blob))
        new.k = self.k
        return new


# -------------------------------------------------- compiled functions, shared across tests

_FUNCTIONAL: dict[tuple, tuple] = {}
_ENSEMBLE: dict[tuple, tuple] = {}


def _structure(config: Config) -> tuple:
    kw = config.builder_kwargs()
    names = ("symmetric", "granularity", "r_statistic", "state_dtype")
    return (*((k, kw[k]) for k in names), ("online", config.r is None))


def _opt_for(config: Config, impl: str):
    # the hyperparameters live in the state; only the structure is the builder's
    kw = config.builder_kwargs()
    return kf.koala_pp(**kw, impl=impl)


def functional_step(config: Config, impl: str, compiled: bool):
    """``(opt, step_fn)``: one optimizer and one compiled step per structure, per process."""
    if not compiled:
        opt = _opt_for(config, impl)
        return opt, opt.step
    key = (_structure(config), impl)
    if key not in _FUNCTIONAL:
        opt = _opt_for(config, impl)
        _FUNCTIONAL[key] = (opt, torch.compile(opt.step, fullgraph=True))
    return _FUNCTIONAL[key]


def ensemble_fn(config: Config, impl: str, compiled: bool, inplace: bool = False):
    if not compiled:
        opt = _opt_for(config, impl)
        return opt, kf.ensemble_step(opt, compile=False, inplace=inplace)
    key = (_structure(config), impl, inplace)
    if key not in _ENSEMBLE:
        opt = _opt_for(config, impl)
        _ENSEMBLE[key] = (opt, kf.ensemble_step(opt, inplace=inplace))
    return _ENSEMBLE[key]


# -------------------------------------------------------------------------------- the doors

ALL_FEATURES = frozenset(
    {
        "global",
        "fixed_r",
        "variance",
        "float32",
        "bfloat16",
        "mean_loss",
        "missing",
        "skips",
        "loss_target",
        "checkpoint",
        "differentiable",
    }
)


@dataclass(frozen=True)
class Door:
    """One door: how to build a run, what it supports, how it is tested.

    ``configs``: ``None`` for the eager doors (the generated matrix, filtered by
    ``supports``); compiled doors list their few representative configurations (each new
    structure is one more compiled graph, 10-20 s of CPU).
    """

    name: str
    make: Callable[..., Runner]
    supports: frozenset[str] = ALL_FEATURES
    compiled: bool = False
    exhaustive: bool = False  # the full structural matrix, not the pairwise covering
    configs: tuple[Config, ...] | None = None
    ensemble: bool = False

    def __repr__(self) -> str:
        return self.name


#: The representative configurations of the compiled doors. One model shape; per door at
#: most three graphs: a float64 run with NaN/inf/zero skips, the same optimizer with a
#: missing gradient (another graph: the gradients' structure changes) and a float32 run of
#: another structure.
COMPILED_F64 = Config(weight_decay=5e-4, events=VALUE_EVENTS, steps=12)
COMPILED_MISSING = Config(weight_decay=5e-4, events=("missing",), steps=12)
COMPILED_F32 = Config(
    granularity="global", symmetric=False, r_statistic="variance", dtype=F32, steps=12
)
COMPILED = (COMPILED_F64, COMPILED_MISSING, COMPILED_F32)

DOORS: list[Door] = [
    Door(
        "functional-reference",
        lambda c, **kw: FunctionalRunner(c, impl="auto", compiled=False, **kw),
        exhaustive=True,
    ),
    Door(
        "functional-engine",
        lambda c, **kw: FunctionalRunner(c, impl="engine", compiled=False, **kw),
    ),
    Door(
        "functional-compiled",
        lambda c, **kw: FunctionalRunner(c, impl="auto", compiled=True, **kw),
        supports=ALL_FEATURES - {"differentiable"},
        compiled=True,
        configs=COMPILED,
    ),
    Door(
        "optim-engine",
        lambda c, **kw: OptimRunner(c, impl="engine", compile=False, **kw),
        supports=ALL_FEATURES - {"differentiable"},
    ),
    Door(
        "optim-compiled",
        lambda c, **kw: OptimRunner(c, impl="engine", compile=True, **kw),
        supports=ALL_FEATURES - {"differentiable"},
        compiled=True,
        configs=COMPILED,
    ),
    Door(
        "optim-reference",
        lambda c, **kw: OptimRunner(c, impl="reference", compile=False, **kw),
        supports=ALL_FEATURES - {"differentiable"},
    ),
    Door(
        "ensemble-vmap",
        lambda c, **kw: EnsembleRunner(c, impl="auto", compiled=False, **kw),
        ensemble=True,
    ),
    Door(
        "ensemble-vmap-engine",
        lambda c, **kw: EnsembleRunner(c, impl="engine", compiled=False, **kw),
        supports=ALL_FEATURES - {"differentiable"},
        ensemble=True,
    ),
    Door(
        "ensemble-compiled",
        lambda c, **kw: EnsembleRunner(c, impl="auto", compiled=True, **kw),
        supports=ALL_FEATURES - {"differentiable"},
        compiled=True,
        configs=COMPILED,
        ensemble=True,
    ),
    Door(
        "ensemble-inplace",
        lambda c, **kw: EnsembleRunner(c, impl="auto", compiled=True, inplace=True, **kw),
        supports=ALL_FEATURES - {"differentiable"},
        compiled=True,
        configs=COMPILED,
        ensemble=True,
    ),
]
DOOR = {d.name: d for d in DOORS}


def configs_for(door: Door) -> list[Config]:
    """The configurations ``door`` is tested in (those it supports)."""
    if door.configs is not None:
        out = list(door.configs)
    else:
        matrix = full_matrix() if door.exhaustive else covering_matrix()
        out = [*LONG, *matrix, *special_configs()]
        if door.ensemble:  # vmap is slower per step: shorter runs, fewer of them
            out = [*covering_matrix(), *special_configs()[::2]]
            out = [LONG[0], *(dataclasses.replace(c, steps=min(c.steps, 12)) for c in out)]
    return [c for c in out if c.needs <= door.supports]


def checkpoint_configs(door: Door) -> list[Config]:
    """Where a run is interrupted and resumed: the skips config (and a global one, eager)."""
    if door.compiled:
        return [COMPILED_F64]
    return [
        Config(weight_decay=5e-4, events=("missing", *VALUE_EVENTS), steps=14),
        Config(dtype=BF16, state_dtype=F32, granularity="global", r=0.5, steps=14),
    ]


def truth_for(door: Door, config: Config, runner: Runner) -> tuple[Runner, float]:
    """The run ``door`` is compared with, and the tolerance (max deviation relative to the
    largest entry of each tensor).

    float64: the independent oracle, 1e-10. Lower precisions: the readable reference step in
    the same dtype (float32 1e-5, measured 1.4e-6; bfloat16 parameters with a float32 state
    3e-2, a few bfloat16 ulps over 12 steps: the engine doors measure 3e-7, KoalaPP 1.9e-2
    because it averages a bfloat16 loss in bfloat16, see test_precision.py), except for the
    reference door itself, compared with the float64 oracle (float32 1e-4, measured 1e-6;
    bfloat16 1.5e-1, measured 6.5e-2).
    """
    if config.dtype == F64:
        return OracleRunner(config, runner.seeds, runner.lrs, members_like=runner), 1e-10
    if door.name == "functional-reference":
        tol = {F32: 1e-4, BF16: 1.5e-1}[config.dtype]
        return OracleRunner(config, runner.seeds, runner.lrs, members_like=runner), tol
    tol = {F32: 1e-5, BF16: 3e-2}[config.dtype]
    if door.ensemble:
        ref = EnsembleRunner(config, runner.seeds, runner.lrs, impl="reference", compiled=False)
    else:
        ref = FunctionalRunner(config, runner.seeds, runner.lrs, impl="reference")
    return ref, tol
