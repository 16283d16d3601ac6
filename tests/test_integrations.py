"""KoalaPP inside the real frameworks: Lightning, Hugging Face Trainer, accelerate and timm.

Every row trains a tiny model through the framework and asserts parameters equal to a plain
loop fed the true mean loss of each (accumulated) batch: 1e-6 in float32; mixed precision
against the same autocast loop (1e-6) and against float32 within a stated tolerance. The
frameworks are in the ``test`` extra (timm: see ``docs/frameworks.md``); a missing one skips
its rows.
"""

from __future__ import annotations

import contextlib
import copy
import doctest
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from koala_func import KoalaPP

# the eager engine where KoalaPP has a ``compile`` switch: the compiled engine gives the same
# numbers (tests/test_optim.py) but would compile once per model shape here
EAGER = {"compile": False} if "compile" in inspect.signature(KoalaPP).parameters else {}


def koala(params, **kwargs) -> KoalaPP:
    """``KoalaPP(params, **kwargs)`` on the eager engine."""
    return KoalaPP(params, **{**EAGER, **kwargs})


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def make_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def make_data(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def max_dev(a, b) -> float:
    pa = a.parameters() if isinstance(a, torch.nn.Module) else a
    pb = b.parameters() if isinstance(b, torch.nn.Module) else b
    return max(
        (u.detach().double() - v.detach().double()).abs().max().item()
        for u, v in zip(pa, pb, strict=True)
    )


def plain_loop(
    net,
    steps,
    *,
    n_micro=1,
    autocast=None,
    scaler=None,
    clip=None,
    sched=None,
    **opt_kwargs,
):
    """The reference: for each optimizer step, backward of every micro-batch mean divided by
    ``n_micro`` (the frameworks' normalisation), then ``step(loss=true mean of the batch)``."""
    opt = koala(net.parameters(), **opt_kwargs)
    scheduler = sched(opt) if sched else None
    for micro in steps:
        opt.zero_grad()
        means = []
        for x, y in micro:
            ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
            with ctx:
                mean = F.cross_entropy(net(x), y)
            means.append(mean.detach().float())
            loss = mean / n_micro
            (scaler.scale(loss) if scaler else loss).backward()
        true_mean = torch.stack(means).mean()  # equal micro-batches: the batch mean
        if clip:
            if scaler:
                scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        if scaler:
            scaler.step(opt, loss=true_mean)
            scaler.update()
        else:
            opt.step(loss=true_mean)
        if scheduler:
            scheduler.step()
    return net, opt


def micro_batches(x, y, batch_size, n_micro):
    """[[micro-batch, ...] per optimizer step] in DataLoader order (no shuffling)."""
    xs, ys = x.split(batch_size), y.split(batch_size)
    pairs = list(zip(xs, ys, strict=True))
    return [pairs[i : i + n_micro] for i in range(0, len(pairs), n_micro)]


def run_doctests(module_name: str) -> None:
    mod = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(mod, module_name, globs=vars(mod).copy()):
        if test.filename == mod.__file__:
            runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0 and result.failed == 0, f"{module_name}: {result}"


@pytest.mark.parametrize(
    ("integration", "framework"),
    [
        ("lightning", "lightning"),
        ("transformers", "transformers"),
        ("accelerate", "accelerate"),
        ("timm", "timm"),
    ],
)
def test_a_missing_framework_raises_a_clear_import_error(monkeypatch, integration, framework):
    module = f"koala_func.integrations.{integration}"
    for name in [m for m in sys.modules if m == framework or m.startswith(framework + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, framework, None)  # makes `import framework` fail
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=rf"requires {framework}: pip install {framework}"):
        importlib.import_module(module)


# ========================================================================== Lightning
def _lightning():
    pl = pytest.importorskip("lightning.pytorch")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    return pl


def _lit_module(pl, net, *, opt_kwargs, manual=None, sched=None):
    class Lit(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net
            self.automatic_optimization = manual is None

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            if manual is None:
                return loss
            opt = self.optimizers()
            opt.zero_grad()
            if manual == "loss":
                self.manual_backward(loss)
                opt.step(loss=loss.detach())
            elif manual == "closure":

                def closure():
                    opt.zero_grad()
                    out = F.cross_entropy(self.net(x), y)
                    self.manual_backward(out)
                    return out

                opt.step(closure=closure)
            return None

        def configure_optimizers(self):
            opt = koala(self.parameters(), **opt_kwargs)
            if sched is None:
                return opt
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched(opt), "interval": "step"}}

    return Lit()


def _trainer(pl, callbacks=(), **kwargs):
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
    )
    return pl.Trainer(callbacks=list(callbacks), **{**defaults, **kwargs})


def _loader(x, y, batch_size):
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)


def test_lightning_integration_doctests_run():
    _lightning()
    run_doctests("koala_func.integrations.lightning")


def _lightning_precision_plugin(pl, precision):
    if precision == "16-mixed":
        # Lightning turns 16-mixed into bf16-mixed on CPU; the plugin built by hand keeps
        # float16 autocast and the GradScaler path (closure(), then scaler.step(optimizer))
        from lightning.pytorch.plugins.precision import MixedPrecision

        return dict(plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))])
    return dict(precision=precision)


@pytest.mark.parametrize(
    ("precision", "n_micro"),
    [("32-true", 2), ("32-true", 3), ("bf16-mixed", 2), ("16-mixed", 2), ("16-mixed", 1)],
)
def test_lightning_automatic_optimization_matches_the_plain_loop(precision, n_micro):
    pl = _lightning()
    from koala_func.integrations.lightning import KoalaPPCallback

    x, y = make_data(48)
    opt_kwargs = dict(lr=0.5, weight_decay=1e-3)
    lit = _lit_module(pl, make_net(), opt_kwargs=opt_kwargs)
    trainer = _trainer(
        pl,
        [KoalaPPCallback()],
        accumulate_grad_batches=n_micro,
        **_lightning_precision_plugin(pl, precision),
    )
    trainer.fit(lit, _loader(x, y, 8))
    assert trainer.global_step == 6 // n_micro
    autocast = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
    scaler = torch.amp.GradScaler("cpu") if precision == "16-mixed" else None
    steps = micro_batches(x, y, 8, n_micro)
    ref, _ = plain_loop(
        make_net(),
        steps,
        n_micro=n_micro,
        autocast=autocast[precision],
        scaler=scaler,
        **opt_kwargs,
    )
    dev = max_dev(lit.net, ref)
    fp32, _ = plain_loop(make_net(), steps, n_micro=n_micro, **opt_kwargs)
    dev32 = max_dev(lit.net, fp32)
    print(
        f"Lightning {precision} accumulate={n_micro}: vs plain loop {dev:.2e}, vs fp32 {dev32:.2e}"
    )
    assert dev < 1e-6
    assert dev32 < {"32-true": 1e-6, "bf16-mixed": 5e-3, "16-mixed": 1e-3}[precision]


def test_lightning_callback_refuses_an_optimizer_without_observe_loss():
    pl = _lightning()
    from koala_func.integrations.lightning import KoalaPPCallback

    class WithSGD(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_net()

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match=r"observe_loss \(KoalaPP\), got \['SGD'\]"):
        _trainer(pl, [KoalaPPCallback()]).fit(WithSGD(), _loader(*make_data(16), 8))


def test_lightning_without_the_callback_accumulation_is_wrong():
    """Why the callback exists: the closure returns the last micro-batch's loss / 2."""
    pl = _lightning()
    x, y = make_data(32)
    lit = _lit_module(pl, make_net(), opt_kwargs=dict(lr=0.5))
    _trainer(pl, accumulate_grad_batches=2).fit(lit, _loader(x, y, 8))
    ref, _ = plain_loop(make_net(), micro_batches(x, y, 8, 2), n_micro=2, lr=0.5)
    assert max_dev(lit.net, ref) > 1e-3


def test_lightning_accumulation_with_clipping_and_a_scheduler():
    pl = _lightning()
    from koala_func.integrations.lightning import KoalaPPCallback

    x, y = make_data(48)

    def sched(o):
        return torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)

    lit = _lit_module(pl, make_net(), opt_kwargs=dict(lr=1.0), sched=sched)
    trainer = _trainer(pl, [KoalaPPCallback()], accumulate_grad_batches=2, gradient_clip_val=0.05)
    trainer.fit(lit, _loader(x, y, 8))
    ref, ref_opt = plain_loop(
        make_net(), micro_batches(x, y, 8, 2), n_micro=2, clip=0.05, sched=sched, lr=1.0
    )
    assert float(ref_opt.param_groups[0]["lr"]) == 0.125
    assert float(trainer.optimizers[0].param_groups[0]["lr"]) == 0.125
    dev = max_dev(lit.net, ref)
    print(f"Lightning accumulate=2 + clip + StepLR: vs plain loop {dev:.2e}")
    assert dev < 1e-6


def test_lightning_16_mixed_refuses_gradient_clipping():
    """KoalaPP unscales inside its step (like fused Adam), so Lightning cannot clip."""
    pl = _lightning()
    from koala_func.integrations.lightning import KoalaPPCallback

    x, y = make_data(16)
    lit = _lit_module(pl, make_net(), opt_kwargs=dict(lr=0.5))
    trainer = _trainer(
        pl,
        [KoalaPPCallback()],
        gradient_clip_val=1.0,
        **_lightning_precision_plugin(pl, "16-mixed"),
    )
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        trainer.fit(lit, _loader(x, y, 8))


@pytest.mark.parametrize("manual", ["loss", "closure"])
@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_lightning_manual_optimization(manual, precision):
    # 16-mixed: Lightning runs the closure itself, then scaler.step(optimizer, **kwargs): with
    # a closure the step gets no loss, and the callback's observed (unscaled) loss is used
    pl = _lightning()
    from koala_func.integrations.lightning import KoalaPPCallback

    x, y = make_data(32)
    lit = _lit_module(pl, make_net(), opt_kwargs=dict(lr=0.5), manual=manual)
    _trainer(pl, [KoalaPPCallback()], **_lightning_precision_plugin(pl, precision)).fit(
        lit, _loader(x, y, 8)
    )
    autocast = torch.float16 if precision == "16-mixed" else None
    scaler = torch.amp.GradScaler("cpu") if precision == "16-mixed" else None
    ref, _ = plain_loop(
        make_net(), micro_batches(x, y, 8, 1), autocast=autocast, scaler=scaler, lr=0.5
    )
    dev = max_dev(lit.net, ref)
    print(f"Lightning manual {manual} {precision}: vs plain loop {dev:.2e}")
    assert dev < 1e-6


def test_lightning_checkpoint_resume_equals_an_uninterrupted_run(tmp_path):
    pl = _lightning()
    from koala_func.integrations.lightning import KoalaPPCallback

    x, y = make_data(32)
    opt_kwargs = dict(lr=0.5, weight_decay=1e-3)
    full = _lit_module(pl, make_net(), opt_kwargs=opt_kwargs)
    _trainer(pl, [KoalaPPCallback()], accumulate_grad_batches=2, max_epochs=2).fit(
        full, _loader(x, y, 8)
    )
    first = _lit_module(pl, make_net(), opt_kwargs=opt_kwargs)
    trainer = _trainer(pl, [KoalaPPCallback()], accumulate_grad_batches=2, max_epochs=1)
    trainer.fit(first, _loader(x, y, 8))
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = _lit_module(pl, make_net(seed=1), opt_kwargs=opt_kwargs)
    trainer = _trainer(pl, [KoalaPPCallback()], accumulate_grad_batches=2, max_epochs=2)
    trainer.fit(resumed, _loader(x, y, 8), ckpt_path=ckpt)
    assert trainer.global_step == 4
    opt = trainer.optimizers[0]
    assert int(opt.state[resumed.net[0].weight]["step"]) == 4
    dev = max_dev(full.net, resumed.net)
    print(f"Lightning checkpoint resume vs uninterrupted: {dev:.2e}")
    assert dev == 0.0


# ======================================================================= accelerate state
@pytest.fixture
def fresh_accelerate():
    """accelerate keeps process-wide singletons (the Trainer builds an Accelerator too)."""
    state = pytest.importorskip("accelerate.state")
    state.AcceleratorState._reset_state(True)
    state.GradientState._reset_state()
    yield
    state.AcceleratorState._reset_state(True)
    state.GradientState._reset_state()


# ============================================================== Hugging Face transformers
def _transformers():
    tr = pytest.importorskip("transformers")
    tr.logging.set_verbosity_error()
    return tr


def _tiny_gpt2(tr):
    torch.manual_seed(0)
    config = tr.GPT2Config(
        vocab_size=16,
        n_positions=8,
        n_embd=8,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = tr.GPT2LMHeadModel(config)
    # transformers 5 infers loss_type from the class name, and "GPT2LMHeadModel" has no
    # "ForCausalLM": the model still uses the causal-LM loss, but the Trainer then counts the
    # labels unshifted (num_items_in_batch includes position 0), which scales the loss and its
    # gradient by (predicted tokens) / (label tokens). Naming the loss fixes the count.
    model.loss_type = "ForCausalLM"
    return model


def _lm_data(n=24, length=8):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 16, (n, length), generator=g)
    labels = ids.clone()
    for i in range(n):  # ragged padding: micro-batches hold different numbers of tokens
        labels[i, length - (i * 5) % length :] = -100
    labels[:, 0] = ids[:, 0]
    return [{"input_ids": a, "labels": b} for a, b in zip(ids, labels, strict=True)]


class _Classifier(torch.nn.Module):
    """A model without loss kwargs: it returns its micro-batch mean, the Trainer divides."""

    def __init__(self):
        super().__init__()
        self.net = make_net()

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def _cls_data(n=24):
    x, y = make_data(n)
    return [{"x": a, "labels": b} for a, b in zip(x, y, strict=True)]


def _hf_args(tr, tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    return tr.TrainingArguments(**{**defaults, **kwargs})


def _recording_trainer(base):
    class Recording(base):
        seen: list

        def training_step(self, model, inputs, num_items_in_batch=None):
            self.seen.append({k: v.detach().clone() for k, v in inputs.items()})
            return super().training_step(model, inputs, num_items_in_batch)

    return Recording


def _hf_plain_loop(model, seen, ga, token_mean, clip, lr, autocast=None):
    """Token mean (causal LM, shifted labels) or sample mean over each accumulated batch."""
    opt = koala(model.parameters(), lr=lr)
    for i in range(0, len(seen), ga):
        opt.zero_grad()
        ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
        sums, count = [], 0
        for inputs in seen[i : i + ga]:
            with ctx:
                if token_mean:
                    logits = model(input_ids=inputs["input_ids"]).logits.float()
                    labels = inputs["labels"][:, 1:]
                    logits = logits[:, :-1]
                    sums.append(
                        F.cross_entropy(
                            logits.reshape(-1, logits.shape[-1]),
                            labels.reshape(-1),
                            ignore_index=-100,
                            reduction="sum",
                        )
                    )
                    count += int((labels != -100).sum())
                else:
                    logits = model.net(inputs["x"]).float()
                    sums.append(F.cross_entropy(logits, inputs["labels"], reduction="sum"))
                    count += len(inputs["labels"])
        loss = torch.stack(sums).sum() / count
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step(loss=loss.detach())
    return model


def test_transformers_integration_doctests_run(fresh_accelerate):
    _transformers()
    run_doctests("koala_func.integrations.transformers")


@pytest.mark.parametrize(
    ("model_kind", "ga", "clip", "bf16"),
    [
        ("gpt2", 2, 0.0, False),  # num_items_in_batch: token-summed loss / tokens of all
        ("gpt2", 3, 1.0, False),  # the Trainer's default clipping
        ("gpt2", 2, 0.0, True),
        ("classifier", 2, 0.0, False),  # no loss kwargs: the Trainer divides by ga
        ("classifier", 1, 1.0, False),
    ],
)
def test_transformers_trainer_matches_the_plain_loop(
    fresh_accelerate, tmp_path, model_kind, ga, clip, bf16
):
    tr = _transformers()
    from koala_func.integrations.transformers import KoalaPPTrainer

    model = _tiny_gpt2(tr) if model_kind == "gpt2" else _Classifier()
    initial, initial32 = copy.deepcopy(model), copy.deepcopy(model)
    data = _lm_data() if model_kind == "gpt2" else _cls_data()
    args = _hf_args(tr, tmp_path, gradient_accumulation_steps=ga, max_grad_norm=clip, bf16=bf16)
    trainer = _recording_trainer(KoalaPPTrainer)(
        model=model,
        args=args,
        train_dataset=data,
        optimizer_cls_and_kwargs=(KoalaPP, {"lr": 0.05, **EAGER}),
    )
    trainer.seen = []
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, KoalaPP)
    assert trainer.model_accepts_loss_kwargs == (model_kind == "gpt2")
    assert len(trainer.seen) == 3 * ga
    ref = _hf_plain_loop(
        initial,
        trainer.seen,
        ga,
        token_mean=model_kind == "gpt2",
        clip=clip,
        lr=0.05,
        autocast=torch.bfloat16 if bf16 else None,
    )
    dev = max_dev(model, ref)
    print(f"HF Trainer {model_kind} ga={ga} clip={clip} bf16={bf16}: vs plain loop {dev:.2e}")
    assert dev < 1e-6  # bf16: against the same autocast loop
    if bf16:  # and bfloat16 autocast really ran
        fp32 = _hf_plain_loop(
            initial32, trainer.seen, ga, token_mean=model_kind == "gpt2", clip=clip, lr=0.05
        )
        dev32 = max_dev(model, fp32)
        print(f"HF Trainer {model_kind} bf16 vs fp32 plain loop {dev32:.2e}")
        assert 0 < dev32 < 5e-3


def test_transformers_plain_trainer_needs_the_loss(fresh_accelerate, tmp_path):
    """Why KoalaPPTrainer exists: the Trainer calls a bare optimizer.step()."""
    tr = _transformers()
    model = _Classifier()
    trainer = tr.Trainer(
        model=model,
        args=_hf_args(tr, tmp_path),
        train_dataset=_cls_data(),
        optimizers=(koala(model.parameters()), None),
    )
    with pytest.raises(ValueError, match="needs the loss"):
        trainer.train()


def test_transformers_koalapp_trainer_with_a_given_optimizer(fresh_accelerate, tmp_path):
    tr = _transformers()
    from koala_func.integrations.transformers import KoalaPPTrainer

    model = _Classifier()
    initial = copy.deepcopy(model)
    opt = koala(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    trainer = _recording_trainer(KoalaPPTrainer)(
        model=model, args=_hf_args(tr, tmp_path), train_dataset=_cls_data(), optimizers=(opt, sched)
    )
    trainer.seen = []
    trainer.train()
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.05 / 8)
    ref = copy.deepcopy(initial)
    ref_opt = koala(ref.parameters(), lr=0.05)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=1, gamma=0.5)
    for i in range(0, len(trainer.seen), 2):
        ref_opt.zero_grad()
        xb = torch.cat([b["x"] for b in trainer.seen[i : i + 2]])
        yb = torch.cat([b["labels"] for b in trainer.seen[i : i + 2]])
        loss = F.cross_entropy(ref.net(xb), yb)
        loss.backward()
        ref_opt.step(loss=loss.detach())
        ref_sched.step()
    dev = max_dev(model, ref)
    print(f"HF KoalaPPTrainer(optimizers=(KoalaPP, StepLR)): vs plain loop {dev:.2e}")
    assert dev < 1e-6


def test_transformers_trainer_under_a_grad_scaler(fresh_accelerate, tmp_path):
    """fp16 with a GradScaler (what GPU users run). On CPU accelerate turns fp16 off
    (native_amp False: no autocast, no scaler), so the test turns it back on and gives the
    Trainer's Accelerator a GradScaler, as on a GPU: accelerator.backward scales the loss, the
    clipping unscales the gradients, and scaler.step(optimizer) steps with grad_scale None."""
    tr = _transformers()
    from koala_func.integrations.transformers import KoalaPPTrainer

    model = _Classifier()
    initial, initial32 = copy.deepcopy(model), copy.deepcopy(model)
    args = _hf_args(tr, tmp_path, fp16=True, max_grad_norm=1.0)
    trainer = _recording_trainer(KoalaPPTrainer)(
        model=model,
        args=args,
        train_dataset=_cls_data(),
        optimizer_cls_and_kwargs=(KoalaPP, {"lr": 0.05, **EAGER}),
    )
    trainer.seen = []
    trainer.accelerator.native_amp = True
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    trainer.train()
    assert trainer.accelerator.scaler.get_scale() == 65536.0  # no step was skipped
    ref = _hf_plain_loop(
        initial, trainer.seen, 2, token_mean=False, clip=1.0, lr=0.05, autocast=torch.float16
    )
    dev = max_dev(model, ref)
    fp32 = _hf_plain_loop(initial32, trainer.seen, 2, token_mean=False, clip=1.0, lr=0.05)
    dev32 = max_dev(model, fp32)
    print(f"HF Trainer fp16 + GradScaler + clip: vs plain fp16 loop {dev:.2e}, fp32 {dev32:.2e}")
    assert dev < 1e-6
    assert 0 < dev32 < 1e-3  # float16 autocast really ran


def test_transformers_trainer_builds_koalapp_with_decay_groups(fresh_accelerate, tmp_path):
    tr = _transformers()
    from koala_func.integrations.transformers import KoalaPPTrainer

    model = _tiny_gpt2(tr)
    args = _hf_args(tr, tmp_path, learning_rate=0.02, weight_decay=1e-3)
    opt = KoalaPPTrainer(model=model, args=args, train_dataset=_lm_data()).create_optimizer()
    assert isinstance(opt, KoalaPP)
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 1e-3 and no_decay["weight_decay"] == 0.0
    assert all("bias" in names[id(p)] or "ln" in names[id(p)] for p in no_decay["params"])
    assert float(decay["lr"]) == pytest.approx(0.02)


# ============================================================================ accelerate
def test_accelerate_integration_doctests_run(fresh_accelerate):
    pytest.importorskip("accelerate")
    run_doctests("koala_func.integrations.accelerate")


@pytest.mark.parametrize(
    ("ga", "per_sample_loss", "mixed", "scaler"),
    [
        (2, False, "no", False),
        (2, True, "no", False),
        (4, True, "no", False),
        (2, False, "bf16", False),
        # accelerate turns fp16 off on CPU (native_amp False: no autocast, no scaler); the test
        # turns it back on and gives a GradScaler, as accelerate does on a GPU
        (2, True, "fp16", True),
        (2, False, "fp16", True),
    ],
)
def test_accelerate_accumulation_matches_the_plain_loop(
    fresh_accelerate, ga, per_sample_loss, mixed, scaler
):
    accelerate = pytest.importorskip("accelerate")
    from koala_func.integrations.accelerate import backward

    acc = accelerate.Accelerator(gradient_accumulation_steps=ga, cpu=True, mixed_precision=mixed)
    if scaler:
        acc.native_amp, acc.scaler = True, torch.amp.GradScaler("cpu")
    x, y = make_data(48)
    net = make_net()
    loader = _loader(x, y, 4)
    model, opt, loader = acc.prepare(net, koala(net.parameters(), lr=0.5), loader)
    for xb, yb in loader:
        with acc.accumulate(model):
            losses = F.cross_entropy(model(xb), yb, reduction="none").float()
            backward(acc, opt, losses if per_sample_loss else losses.mean())
            opt.step()
            opt.zero_grad()
    assert int(opt.state[net[0].weight]["step"]) == 12 // ga
    autocast = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed]
    ref_net = make_net()
    ref_opt = koala(ref_net.parameters(), lr=0.5)
    ref_scaler = torch.amp.GradScaler("cpu") if scaler else None
    for micro in micro_batches(x, y, 4, ga):
        ref_opt.zero_grad()
        all_losses = []
        for xb, yb in micro:
            ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
            with ctx:
                losses = F.cross_entropy(ref_net(xb), yb, reduction="none").float()
            all_losses.append(losses.detach())
            loss = losses.mean() / ga
            (ref_scaler.scale(loss) if ref_scaler else loss).backward()
        true = torch.cat(all_losses) if per_sample_loss else torch.cat(all_losses).mean()
        if ref_scaler:
            ref_scaler.step(ref_opt, loss=true)
            ref_scaler.update()
        else:
            ref_opt.step(loss=true)
    dev = max_dev(net, ref_net)
    print(f"accelerate ga={ga} per_sample={per_sample_loss} {mixed}: vs plain loop {dev:.2e}")
    assert dev < 1e-6


def test_accelerated_optimizer_rejects_loss_keyword(fresh_accelerate):
    """Why the helper exists: AcceleratedOptimizer.step(closure=None) takes no loss=."""
    accelerate = pytest.importorskip("accelerate")
    acc = accelerate.Accelerator(cpu=True)
    net = make_net()
    opt = acc.prepare(koala(net.parameters()))
    with pytest.raises(TypeError, match="loss"):
        opt.step(loss=torch.tensor(1.0))


def test_accelerate_closure_under_a_grad_scaler_is_refused(fresh_accelerate):
    accelerate = pytest.importorskip("accelerate")
    acc = accelerate.Accelerator(cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu")
    net = make_net()
    opt = acc.prepare(koala(net.parameters()))
    x, y = make_data(8)

    def closure():
        loss = F.cross_entropy(net(x), y)
        acc.backward(loss)
        return loss

    closure()
    # accelerate passes the closure positionally to scaler.step: KoalaPP refuses it
    with pytest.raises(RuntimeError, match=r"(?=.*GradScaler)(?=.*closure)"):
        opt.step(closure)


# ================================================================================== timm
class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Stands in for ``torchvision`` when it cannot be imported (its only wheel for the pinned
    CPU torch is a CUDA build). ``import timm`` imports torchvision names at module level, but
    timm's optimizer factory and parameter-group helpers never use them. Every attribute of a
    stub module is a placeholder class."""

    class _Placeholder(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            value = type(cls)(f"{cls.__name__}.{name}", (), {})
            setattr(cls, name, value)
            return value

    class _Module(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            value = _TorchvisionStub._Placeholder(name, (torch.nn.Module,), {})
            setattr(self, name, value)
            return value

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = self._Module(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _is_torchvision(name: str) -> bool:
    return name == "torchvision" or name.startswith("torchvision.")


@pytest.fixture(scope="module")
def timm():
    """timm with ``koalapp`` registered; the torchvision stand-in only while these tests run."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip('timm is not installed (pip install --no-deps "timm>=1")')
    stub = None
    try:
        import torchvision  # noqa: F401
    except Exception:  # missing, or the CUDA wheel that fails beside the CPU torch
        for name in [m for m in sys.modules if _is_torchvision(m)]:
            del sys.modules[name]
        stub = _TorchvisionStub()
        sys.meta_path.insert(0, stub)
    import timm
    import timm.optim

    from koala_func.integrations.timm import register

    register()
    yield timm
    if stub is not None:
        sys.meta_path.remove(stub)
        for name in [m for m in sys.modules if _is_torchvision(m)]:
            del sys.modules[name]


def _tiny_vit(timm):
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=8,
        embed_dim=16,
        depth=2,
        num_heads=2,
        num_classes=3,
    )


def test_timm_integration_doctests_run(timm):
    run_doctests("koala_func.integrations.timm")


def test_timm_create_optimizer_v2_builds_koalapp_with_no_weight_decay_groups(timm):
    model = _tiny_vit(timm)
    opt = timm.optim.create_optimizer_v2(
        model, "koalapp", lr=0.5, weight_decay=1e-3, sigma=0.2, **EAGER
    )
    assert isinstance(opt, KoalaPP)
    names = {id(p): n for n, p in model.named_parameters()}
    by_wd = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    assert set(by_wd) == {0.0, 1e-3}
    assert {"pos_embed", "cls_token"} <= by_wd[0.0]  # the model's no_weight_decay()
    assert all(
        n.endswith(".bias") or "norm" in n or n in ("pos_embed", "cls_token") for n in by_wd[0.0]
    )
    assert all(p.ndim >= 2 for g in opt.param_groups if g["weight_decay"] for p in g["params"])
    assert all(g["sigma"] == 0.2 and float(g["lr"]) == 0.5 for g in opt.param_groups)
    assert timm.optim.get_optimizer_class("koalapp") is KoalaPP


def test_timm_layer_decay_groups_and_scheduler_match_the_plain_loop(timm):
    from timm.scheduler import CosineLRScheduler

    model, ref = _tiny_vit(timm), _tiny_vit(timm)
    opt = timm.optim.create_optimizer_v2(
        model, "koalapp", lr=0.5, weight_decay=1e-3, layer_decay=0.5, **EAGER
    )
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) >= 3, scales  # one scale per depth
    sched = CosineLRScheduler(opt, t_initial=6)
    # the plain loop: the same groups built by hand on the reference model
    ref_params = dict(ref.named_parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    ref_opt = koala(
        [
            {
                "params": [ref_params[names[id(p)]] for p in g["params"]],
                "weight_decay": g["weight_decay"],
            }
            for g in opt.param_groups
        ]
    )
    g = torch.Generator().manual_seed(0)
    for epoch in range(3):
        x = torch.randn(4, 3, 16, 16, generator=g)
        y = torch.randint(0, 3, (4,), generator=g)
        base = max(float(grp["lr"]) for grp in opt.param_groups)
        for grp, ref_grp in zip(opt.param_groups, ref_opt.param_groups, strict=True):
            # timm's scheduler applied lr_scale: lr = scheduled value * lr_scale
            assert float(grp["lr"]) == pytest.approx(base * grp["lr_scale"] / max(scales))
            ref_grp["lr"] = float(grp["lr"])
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            o.step(loss=loss.detach())
        sched.step(epoch + 1)
    dev = max_dev(model, ref)
    print(f"timm layer-decay groups + CosineLRScheduler: vs plain loop {dev:.2e}")
    assert dev < 1e-6
    assert max_dev(model, _tiny_vit(timm)) > 1e-3  # it trained
