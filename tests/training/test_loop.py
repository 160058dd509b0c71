"""The one mixed-precision code path, exercised on the CPU: fp32, bf16 autocast and fp16 with a GradScaler."""
import pytest
import torch
from torch import nn

from finetune.errors import FinetuneError
from finetune.models import create_model
from finetune._device import forward_batches as predict
from finetune._device import resolve_device, resolve_precision
from finetune.training.loop import make_grad_scaler, train_one_epoch


def batches(n=4, size=32, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, size, size, generator=g), torch.randint(0, classes, (4,), generator=g), 0)
            for _ in range(n)]


def fit(precision, accumulation=1, clip_grad=None, model=None):
    torch.manual_seed(0)
    model = model or create_model("test_resnet", 3, head="linear")
    device = torch.device("cpu")
    amp = resolve_precision(precision, device)
    scaler = make_grad_scaler(device, amp)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_one_epoch(model, batches(), opt, nn.CrossEntropyLoss(), device=device, amp_dtype=amp,
                            scaler=scaler, accumulation=accumulation, clip_grad=clip_grad, where="test")
    changed = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    return stats, scaler, changed


def test_precision_resolution():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    assert resolve_precision("fp16", cpu) is torch.float16
    assert make_grad_scaler(cpu, torch.bfloat16).is_enabled() is False
    assert make_grad_scaler(cpu, torch.float16).is_enabled() is True


def test_fp32_step_updates_weights_and_counts_updates():
    stats, scaler, changed = fit("fp32")
    assert changed and stats.updates == 4 and stats.samples == 16
    assert not scaler.is_enabled()


def test_bf16_autocast_path_trains_on_cpu():
    stats, _, changed = fit("bf16")
    assert changed and stats.updates == 4 and torch.isfinite(torch.tensor(stats.loss))


def test_fp16_path_with_grad_scaler_trains_on_cpu():
    stats, scaler, changed = fit("fp16", clip_grad=0.5)
    assert scaler.is_enabled() and scaler.get_scale() > 0
    assert changed and stats.updates >= 1


def test_grad_scaler_unscales_before_clipping(monkeypatch):
    """The order of calls (unscale, clip, step) and what the clip sees: the true gradient, not the scaled one."""
    torch.manual_seed(0)
    model = create_model("test_resnet", 3, head="linear").eval()  # eval: the same gradient in both passes
    (x, y, _), = batches(n=1)
    true_norm = torch.nn.utils.get_total_norm(torch.autograd.grad(nn.functional.cross_entropy(model(x), y),
                                                                  list(model.parameters())))
    calls = []

    class Scaler:  # a GradScaler's protocol with a known factor, recording its calls
        factor = 1024.0

        def scale(self, loss):
            calls.append("scale")
            return loss * self.factor

        def unscale_(self, optimizer):
            calls.append("unscale")
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.div_(self.factor)

        def step(self, optimizer):
            calls.append("step")
            optimizer.step()

        def update(self):
            calls.append("update")

    real_clip = torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm, *args, **kwargs):
        params = list(params)
        calls.append(("clip", float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))))
        return real_clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    train_one_epoch(model, [(x, y, 0)], opt, nn.CrossEntropyLoss(), device=torch.device("cpu"), amp_dtype=None,
                    scaler=Scaler(), clip_grad=0.5, where="test")
    assert [c if isinstance(c, str) else c[0] for c in calls] == ["scale", "unscale", "clip", "step", "update"]
    assert calls[2][1] == pytest.approx(float(true_norm), rel=1e-4)  # unscaled: 1024x smaller than the scaled


def test_accumulation_makes_one_optimizer_step_per_group_of_micro_batches():
    stats, _, _ = fit("fp32", accumulation=3)
    assert stats.updates == 2  # 4 micro-batches: steps after the 3rd and the last


def test_accumulated_gradient_equals_the_full_batch_gradient():
    torch.manual_seed(0)
    model = create_model("test_resnet", 3, head="linear").eval()  # eval: no BatchNorm batch statistics
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    full = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), model.head[1].weight)[0]
    grads = []

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            grads.append(model.head[1].weight.grad.clone())
            return None

    opt = Spy(model.parameters(), lr=0.0)
    train_one_epoch(model, [(x[:4], y[:4], 0), (x[4:], y[4:], 0)], opt, nn.CrossEntropyLoss(),
                    device=torch.device("cpu"), amp_dtype=None, scaler=make_grad_scaler(torch.device("cpu"), None),
                    accumulation=2)
    assert len(grads) == 1
    torch.testing.assert_close(grads[0], full, rtol=1e-5, atol=1e-6)


def test_non_finite_loss_names_where_and_step():
    class Nan(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 3), float("nan"), requires_grad=True)

    model = Nan()
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(FinetuneError, match=r"non-finite loss at stage 0 \(head\), epoch 2, step 1"):
        train_one_epoch(model, batches(), opt, nn.CrossEntropyLoss(), device=torch.device("cpu"), amp_dtype=None,
                        scaler=make_grad_scaler(torch.device("cpu"), None), where="stage 0 (head), epoch 2")


def test_unreadable_images_are_counted_not_replaced():
    data = batches(2)
    data[1] = (data[1][0][:2], data[1][1][:2], 2)
    torch.manual_seed(0)
    model = create_model("test_resnet", 3, head="linear")
    stats = train_one_epoch(model, data, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                            device=torch.device("cpu"), amp_dtype=None, scaler=make_grad_scaler(torch.device("cpu"), None))
    assert stats.skipped == 2 and stats.samples == 6


def test_predict_returns_probabilities_and_restores_train_mode():
    model = create_model("test_resnet", 3, head="linear").train()
    labels, probs, skipped = predict(model, batches(2), device=torch.device("cpu"))
    assert probs.shape == (8, 3) and labels.shape == (8,) and skipped == 0
    assert abs(probs.sum(1) - 1).max() < 1e-5
    assert model.training


def test_channels_last_path_gives_the_same_predictions():
    torch.manual_seed(0)
    model = create_model("test_resnet", 3, head="linear").eval()
    _, a, _ = predict(model, batches(1), device=torch.device("cpu"))
    model.to(memory_format=torch.channels_last)
    _, b, _ = predict(model, batches(1), device=torch.device("cpu"), channels_last=True)
    assert abs(a - b).max() < 1e-5


def test_cuda_device_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(FinetuneError, match="no CUDA device"):
        resolve_device("cuda")


@pytest.mark.parametrize("capability, expected", [
    ((7, 5), torch.float16),  # T4: bf16 only emulated
    ((7, 0), torch.float16),  # V100
    ((8, 0), torch.bfloat16),  # A100
    ((9, 0), torch.bfloat16),  # H100
])
def test_auto_precision_picks_bf16_only_where_the_gpu_has_it_natively(monkeypatch, capability, expected):
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    amp = resolve_precision("auto", torch.device("cuda:1"))
    assert amp is expected
    assert asked == [torch.device("cuda:1")]
    assert make_grad_scaler(torch.device("cpu"), amp).is_enabled() is (expected is torch.float16)


def test_last_partial_accumulation_window_steps_with_the_mean_gradient_of_its_micro_batches():
    """5 micro-batches with accumulation 3: one update over 3, then one over the last 2 whose gradient is
    their mean (as if they were one batch), not 2/3 of it."""
    from finetune.training.loop import updates_per_epoch

    torch.manual_seed(0)
    model = create_model("test_resnet", 3, head="linear").eval()  # eval: no BatchNorm batch statistics
    x, y = torch.randn(10, 3, 32, 32), torch.randint(0, 3, (10,))
    weight = model.head[1].weight
    full = [torch.autograd.grad(nn.functional.cross_entropy(model(x[a:b]), y[a:b]), weight)[0]
            for a, b in ((0, 6), (6, 10))]
    grads = []

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            grads.append(weight.grad.clone())

    stats = train_one_epoch(model, [(x[i:i + 2], y[i:i + 2], 0) for i in range(0, 10, 2)], Spy(model.parameters(), lr=0.0),
                            nn.CrossEntropyLoss(), device=torch.device("cpu"), amp_dtype=None,
                            scaler=make_grad_scaler(torch.device("cpu"), None), accumulation=3)
    assert stats.updates == 2
    torch.testing.assert_close(grads[0], full[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], full[1], rtol=1e-5, atol=1e-6)
    assert updates_per_epoch(5, 3) == 2  # what the scheduler is sized with


def test_a_batch_that_skipping_shrank_to_one_sample_is_dropped_and_counted():
    """test_resnet's last stage is 1×1 at 32 px: BatchNorm in training mode cannot take one sample."""
    data = batches(3)
    data[1] = (data[1][0][:1], data[1][1][:1], 3)
    torch.manual_seed(0)
    model = create_model("test_resnet", 3, head="linear").train()
    stats = train_one_epoch(model, data, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                            device=torch.device("cpu"), amp_dtype=None, scaler=make_grad_scaler(torch.device("cpu"), None))
    assert (stats.samples, stats.skipped, stats.updates) == (8, 4, 2)


def test_a_window_whose_last_micro_batch_was_skipped_still_makes_its_update():
    data = batches(4)
    data[1] = (data[1][0][:0], data[1][1][:0], 4)  # every file of the window's last micro-batch vanished
    torch.manual_seed(0)
    model = create_model("test_resnet", 3, head="linear")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = train_one_epoch(model, data, opt, nn.CrossEntropyLoss(), device=torch.device("cpu"), amp_dtype=None,
                            scaler=make_grad_scaler(torch.device("cpu"), None), accumulation=2)
    assert (stats.samples, stats.skipped, stats.updates) == (12, 4, 2)


def test_a_split_with_no_readable_image_is_one_line_naming_it():
    from finetune.training.loop import require_samples

    require_samples("val", 1, 5, "stage 0 (head), epoch 2")
    with pytest.raises(FinetuneError, match=r"^no readable image left in the val split at stage 0 \(head\), "
                                            r"epoch 2 \(6 skipped\); stopped, the last checkpoint is kept$"):
        require_samples("val", 0, 6, "stage 0 (head), epoch 2")
