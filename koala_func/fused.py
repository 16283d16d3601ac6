r"""The eager fast fallback of KOALA++: per-tensor ``torch.dot`` and fused elementwise updates.

Without ``torch.compile`` the fastest form measured here (torch 2.13, CPU) is a plain loop over
the tensors: seven ``torch.dot`` per tensor (the sums :data:`koala_func._scalars.DOTS`), the
scalar math of all blocks at once (:func:`koala_func._scalars.block_update`, which also gives
:math:`S_k` without a second reduction), then per tensor

.. math::

    v_k = a\,v_{k-1} + c_H H_k + b\,H_{k-1},\qquad
    \theta_k = \theta_{k-1} - c\,(v_k + Q H_k),\qquad H_{k-1} \leftarrow H_k

with ``add``/``addcmul``-style ops (faster than ``_foreach`` and than an eager packed layout).
States and results are those of :meth:`koala_func.KoalaPPTransform.step` (Xia, Davtyan,
Favaro, NeurIPS 2025, arXiv:2506.04432); use :mod:`koala_func.packed` under ``torch.compile``.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase

from koala_func._scalars import block_update
from koala_func._validation import check_step_inputs
from koala_func.koala_pp import (
    KoalaPPState,
    KoalaPPTransform,
    float_keys,
    loss_moments,
    next_r,
)

__all__ = ["fused_step", "fused_step_"]


def _prepare(transform, params, grads, loss, state):
    keys = float_keys(params)
    check_step_inputs(keys, params, grads, loss)
    hp = state.hyper
    cdt = hp.lr.dtype
    L, m2 = loss_moments(loss, cdt)
    R = next_r(state.r_est, m2, hp, transform.online_r)
    wd = hp.weight_decay
    rows, tensors = [], []
    for key in keys:
        p = params.get(key)
        g = grads.get(key, None)
        present = g is not None
        g = (g if present else torch.zeros_like(p)).reshape(-1).to(cdt)
        theta = p.reshape(-1).to(cdt)
        v = state.v.get(key).reshape(-1).to(cdt)
        h = state.h_prev.get(key).reshape(-1).to(cdt)
        H = torch.addcmul(g, theta, wd)
        rows.append(
            torch.stack(
                [
                    torch.dot(g, g),
                    torch.dot(H, H),
                    torch.dot(H, h),
                    torch.dot(H, v),
                    torch.dot(h, h),
                    torch.dot(h, v),
                    torch.dot(theta, theta),
                ]
            )
        )
        tensors.append((key, theta, g, v, h, H, present))
    dots = torch.stack(rows)
    present = torch.tensor([t[-1] for t in tensors], device=dots.device)
    if transform.granularity == "global":
        dots = dots.sum(0, keepdim=True)
        present = present.any(0, keepdim=True)
    u = block_update(
        dots,
        state.s,
        state.count,
        state.skipped,
        L,
        R,
        hp,
        transform.symmetric,
        transform.eps,
        present,
    )
    return tensors, u, R


def _update(transform, state, u, i, theta, v, h, H):
    """One tensor's elementwise pass; a block that is not updated keeps its values."""
    b = i if transform.granularity == "tensor" else 0
    ok = u.ok[b]
    v_new = torch.addcmul(torch.mul(v, u.a[b]), H, u.c_h[b]).addcmul_(h, u.b[b])
    theta_new = torch.addcmul(theta, torch.addcmul(v_new, H, state.hyper.q), -u.scale[b])
    # torch.where, not arithmetic masking: a skipped block may hold NaN or inf.
    return torch.where(ok, theta_new, theta), torch.where(ok, v_new, v), torch.where(ok, H, h)


def _check(transform, state, skipped):
    if transform.nonfinite == "raise" and bool(torch.any(skipped != state.skipped)):
        raise FloatingPointError(
            "KOALA++ step met a NaN or inf (loss, gradient or denominator); "
            "use nonfinite='skip' to skip such blocks instead"
        )


def fused_step(
    transform: KoalaPPTransform,
    params: TensorDictBase,
    grads: TensorDictBase,
    loss: torch.Tensor,
    state: KoalaPPState,
) -> tuple[TensorDictBase, KoalaPPState]:
    """:meth:`KoalaPPTransform.step` in eager fast form: new params and state, inputs unchanged.

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from koala_func import koala_pp
        >>> opt = koala_pp(lr=0.5)
        >>> params = TensorDict(w=torch.ones(3, 2), b=torch.zeros(2))
        >>> grads = TensorDict(w=torch.full((3, 2), 0.1), b=torch.ones(2))
        >>> state = opt.init(params)
        >>> fast, fast_state = fused_step(opt, params, grads, torch.tensor(0.7), state)
        >>> ref, ref_state = opt.step(params, grads, torch.tensor(0.7), state)
        >>> torch.allclose(fast["w"], ref["w"]) and torch.equal(fast_state.count, ref_state.count)
        True
    """
    ctx = torch.enable_grad() if transform.differentiable else torch.no_grad()
    with ctx:
        tensors, u, R = _prepare(transform, params, grads, loss, state)
        new_params, new_v, new_h = params.copy(), state.v.copy(), state.h_prev.copy()
        for i, (key, theta, _, v, h, H, _) in enumerate(tensors):
            theta_new, v_new, h_new = _update(transform, state, u, i, theta, v, h, H)
            p, sv = params.get(key), state.v.get(key)
            new_params.set(key, theta_new.to(p.dtype).view_as(p))
            new_v.set(key, v_new.to(sv.dtype).view_as(sv))
            new_h.set(key, h_new.to(sv.dtype).view_as(sv))
    _check(transform, state, u.skipped)
    return new_params, state.replace(
        v=new_v,
        h_prev=new_h,
        s=u.s,
        count=u.count,
        skipped=u.skipped,
        r_est=R,
        step=state.step + 1,
    )


def fused_step_(
    transform: KoalaPPTransform,
    params: TensorDictBase,
    grads: TensorDictBase,
    loss: torch.Tensor,
    state: KoalaPPState,
) -> KoalaPPState:
    """:func:`fused_step` writing into ``params`` and the state's tensors; returns ``state``.

    The eager in-place form: one host sync per step (``ok`` of every block, read once) lets
    skipped blocks be left alone with a Python branch, and updated blocks are rewritten with
    in-place ``mul_``/``addcmul_`` (no ``torch.where`` passes, one temporary ``H`` per tensor).
    It is therefore neither vmappable nor compilable as one graph: use :func:`fused_step`
    under ``torch.vmap`` and :mod:`koala_func.packed` under ``torch.compile``. Tensors whose
    dtype differs from the scalar dtype (float16/bfloat16 parameters, or ``state_dtype``) are
    computed in the scalar dtype and cast back, as in the reference path. Refused for
    ``differentiable=True`` transforms.

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from koala_func import koala_pp
        >>> opt = koala_pp(lr=0.5)
        >>> params = TensorDict(w=torch.ones(3, 2))
        >>> state = opt.init(params)
        >>> w = params["w"]
        >>> grads = TensorDict(w=torch.ones(3, 2))
        >>> state = fused_step_(opt, params, grads, torch.tensor(0.7), state)
        >>> params["w"] is w and bool((w < 1).all()), state.step.item()
        (True, 1)
    """
    if transform.differentiable:
        raise RuntimeError(
            "fused_step_ writes into its inputs and cannot be differentiated; use fused_step"
        )
    with torch.no_grad():
        tensors, u, R = _prepare(transform, params, grads, loss, state)
        _check(transform, state, u.skipped)
        ok = u.ok.tolist()  # the one host sync
        q = state.hyper.q
        cdt = q.dtype
        for i, (key, theta, _, v, h, H, _) in enumerate(tensors):
            b = i if transform.granularity == "tensor" else 0
            if not ok[b]:
                continue
            p, sv, sh = params.get(key), state.v.get(key), state.h_prev.get(key)
            if not (p.dtype == sv.dtype == cdt):
                theta_new, v_new, h_new = _update(transform, state, u, i, theta, v, h, H)
                p.copy_(theta_new.view(p.shape))
                sv.copy_(v_new.view(sv.shape))
                sh.copy_(h_new.view(sh.shape))
                continue
            H = H.view(p.shape)  # H was computed from a flattened copy/view: a fresh tensor
            sv.mul_(u.a[b]).addcmul_(H, u.c_h[b]).addcmul_(sh, u.b[b])
            # theta -= scale * (v + q H), as two fused passes
            neg_scale = u.scale[b].neg()
            p.addcmul_(sv, neg_scale).addcmul_(H, neg_scale * q)
            sh.copy_(H)
        for dst, src in (
            (state.s, u.s),
            (state.count, u.count),
            (state.skipped, u.skipped),
            (state.r_est, R),
            (state.step, state.step + 1),
        ):
            dst.view(-1).copy_(src.view(-1))
    return state
