"""Training loop, distillation loss and BN recalibration on tiny synthetic problems (CPU, seconds)."""

from __future__ import annotations

import copy
import math
from collections import namedtuple
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from onnxconet.errors import DataError, OnnxconetError
from onnxconet.train import loop
from onnxconet.train.distill import distillation_loss, primary_logits
from onnxconet.train.loop import TrainConfig, evaluate, fit, recalibrate_bn, resolve_device

NUM_CLASSES = 3


def blobs(n: int, seed: int) -> TensorDataset:
    """Gaussian blobs in 16-D around fixed class means, reshaped to (1, 4, 4) images."""
    means = torch.randn(NUM_CLASSES, 16, generator=torch.Generator().manual_seed(1234)) * 1.5
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    x = means[y] + torch.randn(n, 16, generator=g)
    return TensorDataset(x.view(n, 1, 4, 4), y)


def loader(ds: TensorDataset, shuffle: bool = True, batch_size: int = 32) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(0))


def tiny_net(seed: int = 0, bn: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=not bn),
        nn.BatchNorm2d(8) if bn else nn.Identity(),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 16, NUM_CLASSES),
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the test machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> tuple[TensorDataset, TensorDataset]:
    return blobs(512, seed=1), blobs(256, seed=2)


@pytest.fixture(scope="module")
def trained(data) -> nn.Module:
    model = tiny_net(seed=0)
    fit(model, loader(data[0]), TrainConfig(epochs=3, lr=0.05), device="cpu")
    return model


def mean_kl(teacher: nn.Module, student: nn.Module, ds: TensorDataset) -> float:
    with torch.no_grad():
        t, s = teacher.eval()(ds.tensors[0]), student.eval()(ds.tensors[0])
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True).item()


# --- distillation loss ---------------------------------------------------------------------------


def test_distillation_identical_logits_alpha_one_is_zero():
    logits = torch.randn(8, 5)
    targets = torch.randint(0, 5, (8,))
    assert distillation_loss(logits, logits.clone(), targets, alpha=1.0).item() == pytest.approx(
        0.0, abs=1e-6
    )


def test_distillation_alpha_zero_and_no_teacher_equal_ce():
    s, t, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    ce = F.cross_entropy(s, y)
    assert torch.allclose(distillation_loss(s, t, y, alpha=0.0), ce)
    assert torch.allclose(distillation_loss(s, None, y, alpha=0.7), ce)


def test_distillation_matches_hand_computation_two_classes():
    s = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.0, 4.0], [3.0, 3.0]])
    y = torch.tensor([0, 1])
    T, alpha = 2.0, 0.25

    def softmax(row):
        e = [math.exp(v / T) for v in row]
        return [v / sum(e) for v in e]

    kl = 0.0
    for srow, trow in zip(s.tolist(), t.tolist(), strict=True):
        p, q = softmax(trow), softmax(srow)
        kl += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))
    kl /= 2  # batchmean
    ce = -(math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(math.e / (1 + math.e))) / 2
    expected = (1 - alpha) * ce + alpha * T * T * kl
    got = distillation_loss(s, t, y, alpha=alpha, temperature=T).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_distillation_gradients_flow_to_student_only():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    distillation_loss(s, t, torch.tensor([0, 1, 2, 0]), alpha=0.5).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_distillation_rejects_bad_arguments():
    s, y = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(OnnxconetError, match="alpha"):
        distillation_loss(s, s, y, alpha=1.5)
    with pytest.raises(OnnxconetError, match="temperature"):
        distillation_loss(s, s, y, temperature=0.0)
    with pytest.raises(OnnxconetError, match="shape"):
        distillation_loss(s, torch.randn(2, 4), y)


def test_primary_logits_handles_aux_outputs():
    x = torch.randn(2, 3)
    Out = namedtuple("Out", ["logits", "aux_logits"])
    assert primary_logits(x) is x
    assert primary_logits(Out(x, torch.zeros(2, 3))) is x
    assert primary_logits((x, torch.zeros(1))) is x
    assert primary_logits({"logits": x}) is x
    with pytest.raises(OnnxconetError, match="logits"):
        primary_logits("nope")


# --- fit / evaluate --------------------------------------------------------------------------


def test_fit_learns_separable_blobs(data, trained):
    acc = evaluate(trained, loader(data[1], shuffle=False), device="cpu")
    assert acc["samples"] == 256
    assert acc["accuracy"] > 0.9
    assert 0 <= acc["loss"] < 0.5
    assert not trained.training


def test_fit_history_and_callbacks(data):
    events, epochs_seen = [], []
    cfg = TrainConfig(epochs=2, lr=0.05, max_batches=3)
    hist = fit(
        tiny_net(),
        loader(data[0]),
        cfg,
        val_loader=loader(data[1], shuffle=False),
        device="cpu",
        progress=events.append,
        epoch_callback=lambda e, m: epochs_seen.append((e, m.training)),
    )
    assert epochs_seen == [(0, False), (1, False)]
    assert len(hist["train_loss"]) == len(hist["val_accuracy"]) == len(hist["val_loss"]) == 2
    assert hist["seconds"] > 0
    train_events = [e for e in events if e["phase"] == "train"]
    assert [e["batch"] for e in train_events] == [1, 2, 3, 1, 2, 3]  # max_batches respected
    assert all(e["batches"] == 3 for e in train_events)
    assert [e["epoch"] for e in events if e["phase"] == "epoch"] == [0, 1]
    # cosine schedule: lr decreases within the run
    lrs = [e["lr"] for e in train_events]
    assert lrs[0] == pytest.approx(0.05) and all(a > b for a, b in zip(lrs, lrs[1:], strict=False))


def test_fit_max_batches_counts_forward_calls(data):
    calls = []
    model = tiny_net()
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    fit(model, loader(data[0]), TrainConfig(epochs=2, max_batches=2), device="cpu")
    assert len(calls) == 4


def test_fit_is_deterministic(data):
    cfg = TrainConfig(epochs=1, lr=0.05, seed=7)
    a, b = tiny_net(seed=3), tiny_net(seed=3)
    fit(a, loader(data[0]), cfg, device="cpu")
    fit(b, loader(data[0]), cfg, device="cpu")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


def test_fit_trains_channels_last_on_cpu_and_hands_back_the_default_layout(data):
    """On the CPU the convolutions see channels-last inputs and weights (oneDNN's faster path); the model and its
    teacher come back in the default layout, trained to the same weights as in the default layout (to float
    rounding: the same arithmetic in another order)."""

    def two_convs(seed: int) -> nn.Module:  # the second conv has 8 input channels: a layout a test can see
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Flatten(), nn.Linear(8 * 16, NUM_CLASSES),
        )  # fmt: skip

    layouts = []
    a, b, teacher = two_convs(3), two_convs(3), two_convs(4)
    last = lambda m, args: layouts.append(  # noqa: E731
        (
            args[0].is_contiguous(memory_format=torch.channels_last),
            m.weight.is_contiguous(memory_format=torch.channels_last),
        )
    )
    hook = a[2].register_forward_pre_hook(last)
    cfg = TrainConfig(epochs=2, lr=0.05, seed=7)
    fit(a, loader(data[0]), cfg, teacher=teacher, device="cpu")
    hook.remove()
    assert len(layouts) == 2 * 16 and all(x and w for x, w in layouts)  # every step, channels-last
    for model in (a, teacher):
        assert all(p.is_contiguous() for p in model.parameters())
        assert not model[2].weight.is_contiguous(memory_format=torch.channels_last)
    fit(b, loader(data[0]), replace(cfg, channels_last=False), device="cpu", teacher=two_convs(4))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(pa.float(), pb.float(), atol=1e-4), name
    # a model without 4-D weights, or channels_last off, trains in the layout it has
    assert loop._train_layout(nn.Linear(2, 2), torch.device("cpu"), cfg) is None
    assert loop._train_layout(two_convs(0), torch.device("cpu"), replace(cfg, channels_last=False)) is None
    assert loop._train_layout(two_convs(0), torch.device("cpu"), cfg) == torch.channels_last
    # channels_last has no 5-D form: a model with a Conv3d trains as it is (Module.to would raise)
    cpu, conv3d = torch.device("cpu"), nn.Conv3d(1, 1, 1)
    assert loop._train_layout(nn.Sequential(two_convs(0), conv3d), cpu, cfg) is None
    assert loop._train_layout(two_convs(0), cpu, cfg, teacher=conv3d) is None  # nor a teacher with one


def test_fit_leaves_caller_rng_untouched(data):
    model = tiny_net()  # seeds the RNG itself, so build it first
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit(model, loader(data[0]), TrainConfig(max_batches=2), device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_distillation_brings_student_closer_to_teacher(data, trained):
    student = tiny_net(seed=5)
    before = mean_kl(trained, student, data[1])
    teacher_params = [p.clone() for p in trained.parameters()]
    trained.train()  # fit must put the teacher in eval mode and restore this afterwards
    cfg = TrainConfig(epochs=1, lr=0.05, alpha=1.0, temperature=2.0)
    fit(student, loader(data[0]), cfg, teacher=trained, device="cpu")
    assert trained.training
    trained.eval()
    assert mean_kl(trained, student, data[1]) < 0.5 * before
    assert all(torch.equal(p, q) for p, q in zip(trained.parameters(), teacher_params, strict=True))


def test_fit_uses_main_logits_of_tuple_outputs(data):
    Out = namedtuple("Out", ["logits", "aux_logits"])

    class WithAux(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = tiny_net()

        def forward(self, x):
            y = self.body(x)
            return Out(y, torch.zeros_like(y)) if self.training else y

    model = WithAux()
    fit(model, loader(data[0]), TrainConfig(epochs=2), device="cpu")
    assert evaluate(model, loader(data[1]), device="cpu")["accuracy"] > 0.9


def test_fit_raises_on_nan_loss(data):
    x, y = data[0].tensors
    x = x.clone()
    x[64:96] = float("nan")  # the third batch of 32
    with pytest.raises(OnnxconetError, match=r"epoch 1/1, batch 3 .*lower the learning rate"):
        fit(tiny_net(), loader(TensorDataset(x, y), shuffle=False), TrainConfig(), device="cpu")


def test_buffered_loss_read_back_names_the_right_batch(data):
    """On CUDA losses are read back every few batches; the first bad batch must still be named."""
    x, y = data[0].tensors
    x = x.clone()
    x[64:96] = float("nan")  # batch 3
    cfg, events = TrainConfig(), []

    def run(batches: int) -> loop._Run:
        model = tiny_net()
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        r = loop._Run(model, None, cfg, opt, torch.device("cpu"), None, batches, events.append)
        r.sync_every = 2
        return r

    clean = TensorDataset(data[0].tensors[0][:160], y[:160])
    run(5).train_epoch(loader(clean, shuffle=False), 0)
    assert [e["batch"] for e in events] == [2, 4, 5]
    with pytest.raises(OnnxconetError, match=r"batch 3 "):
        run(16).train_epoch(loader(TensorDataset(x, y), shuffle=False), 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bf16", [True, False])
def test_fit_amp_on_cuda(data, trained, monkeypatch, bf16):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)  # False: fp16 + GradScaler
    model, teacher = tiny_net(), copy.deepcopy(trained)
    fit(model, loader(data[0]), TrainConfig(epochs=3, amp=True), teacher=teacher, device="cuda")
    assert next(model.parameters()).is_cuda and next(teacher.parameters()).is_cuda
    assert evaluate(model, loader(data[1]), device="cuda")["accuracy"] > 0.8


def test_fit_data_errors(data):
    x, y = data[0].tensors
    with pytest.raises(DataError, match="out of range"):
        fit(tiny_net(), loader(TensorDataset(x, y + NUM_CLASSES)), TrainConfig(max_batches=1), device="cpu")
    with pytest.raises(DataError, match="class indices"):
        fit(tiny_net(), loader(TensorDataset(x, y.float())), TrainConfig(max_batches=1), device="cpu")
    with pytest.raises(DataError, match="no batches"):
        fit(tiny_net(), [], TrainConfig(), device="cpu")
    with pytest.raises(DataError, match="no samples"):
        evaluate(tiny_net(), [], device="cpu")


def test_config_and_device_validation():
    with pytest.raises(OnnxconetError, match="lr must be > 0.*alpha"):
        TrainConfig(lr=0, alpha=2)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(OnnxconetError, match="invalid device"):
        resolve_device("nonsense")
    with pytest.raises(OnnxconetError, match="separate model"):
        m = tiny_net()
        fit(m, [], TrainConfig(), teacher=m, device="cpu")


def test_fit_adamw_constant(data):
    model = tiny_net()
    cfg = TrainConfig(epochs=2, lr=1e-2, optimizer="adamw", schedule="constant")
    fit(model, loader(data[0]), cfg, device="cpu")
    assert evaluate(model, loader(data[1]), device="cpu")["accuracy"] > 0.9


# --- BN recalibration ---------------------------------------------------------------------------


def test_recalibrate_bn_restores_statistics(data, trained):
    bn = trained[1]
    acc_before = evaluate(trained, loader(data[1]), device="cpu")["accuracy"]
    saved = {k: v.clone() for k, v in trained.state_dict().items()}
    try:
        bn.running_mean.fill_(100.0)
        bn.running_var.fill_(1e-3)
        assert evaluate(trained, loader(data[1]), device="cpu")["accuracy"] < 0.6

        recalibrate_bn(trained, loader(data[0], batch_size=64), batches=100, device="cpu")
        assert not trained.training and bn.momentum == 0.1
        with torch.no_grad():
            z = trained[0](data[0].tensors[0])  # (N, 8, 4, 4) conv output = BN input
        true_mean = z.mean(dim=(0, 2, 3))
        true_var = z.var(dim=(0, 2, 3))
        assert torch.allclose(bn.running_mean, true_mean, atol=1e-4)
        assert torch.allclose(bn.running_var, true_var, rtol=0.1)
        acc_after = evaluate(trained, loader(data[1]), device="cpu")["accuracy"]
        assert acc_after >= acc_before - 0.02
    finally:
        trained.load_state_dict(saved)


def test_recalibrate_bn_respects_batches_and_no_bn():
    class Counting(list):
        def __iter__(self):
            for item in super().__iter__():
                self.taken = getattr(self, "taken", 0) + 1
                yield item

    batches = Counting([(torch.randn(4, 1, 4, 4), torch.zeros(4, dtype=torch.long))] * 10)
    recalibrate_bn(tiny_net(), batches, batches=3, device="cpu")
    assert batches.taken == 3
    model = tiny_net(bn=False)
    before = [p.clone() for p in model.parameters()]
    recalibrate_bn(model, batches, device="cpu")  # no BN: nothing changes
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    with pytest.raises(DataError, match="no batches"):
        recalibrate_bn(tiny_net(), [], device="cpu")
