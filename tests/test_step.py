"""The training step's parts that run on a CPU: the graph capture itself needs a GPU, and bench/gpu_train.py
checks it there (a graphed and an eager run of the same batches; bench/RESULTS.md)."""

import torch
import torch.nn.functional as F

from visionroute.training.engine import build_model
from visionroute.training.step import EagerStep, graphable, warm_up_leaving_no_trace


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("resnet18_small", 2, in_chans=1, input_size=28).train()
    groups = [{"params": list(model.parameters()), "lr": torch.tensor(2e-3), "base_lr": 2e-3}]
    optimiser = torch.optim.AdamW(groups, weight_decay=0.05, foreach=False)
    x = torch.randn(8, 1, 28, 28)
    labels = torch.tensor([0, 1] * 4)
    return model, optimiser, (lambda xs, ys: F.cross_entropy(model(xs), ys)), x, labels


def _everything(model, optimiser) -> list[torch.Tensor]:
    state = [value.clone() for values in optimiser.state.values() for value in values.values()]
    return [t.detach().clone() for t in model.state_dict().values()] + state


def _step_with_tensor_lr(model, optimiser, loss_fn, x, labels):
    optimiser.zero_grad(set_to_none=True)
    loss_fn(x, labels).backward()
    optimiser.step()


def test_the_warm_up_before_a_capture_leaves_a_fresh_or_resumed_run_as_it_was():
    for resumed in (False, True):
        model, optimiser, loss_fn, x, labels = _setup()
        twin, twin_optimiser, twin_loss, *_ = _setup()  # the same seed: the same weights and batch
        if resumed:  # optimizer state and BatchNorm statistics already moved
            _step_with_tensor_lr(model, optimiser, loss_fn, x, labels)
            _step_with_tensor_lr(twin, twin_optimiser, twin_loss, x, labels)
        before = _everything(model, optimiser)
        warm_up_leaving_no_trace(model, optimiser, loss_fn, torch.randn(8, 1, 28, 28), labels)
        after = _everything(model, optimiser)
        assert len(after) == len(before) + (0 if resumed else 3 * len(list(model.parameters())))
        for a, b in zip(before, after, strict=False):
            assert torch.equal(a, b)
        assert torch.equal(optimiser.param_groups[0]["lr"], torch.tensor(2e-3))
        # The next real step is the one a run without the warm-up takes: state created then reset is fresh.
        _step_with_tensor_lr(model, optimiser, loss_fn, x, labels)
        _step_with_tensor_lr(twin, twin_optimiser, twin_loss, x, labels)
        for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_eager_step_trains_at_the_scheduled_rate_and_returns_a_detached_loss():
    model, optimiser, loss_fn, x, labels = _setup()
    for group in optimiser.param_groups:
        group["lr"] = float(group["lr"])
    step = EagerStep(model, optimiser, loss_fn)
    first = step(x, labels, 0.5)
    assert optimiser.param_groups[0]["lr"] == 1e-3 and not first.requires_grad
    assert step(x, labels, 1.0) < first  # the same batch again: learnt


def test_only_small_inputs_on_one_gpu_with_adamw_and_no_compile_are_graphed():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert graphable(cuda, 28, "adamw", 1, False)
    assert not graphable(cpu, 28, "adamw", 1, False)
    assert not graphable(cuda, 224, "adamw", 1, False)  # compute-bound: a graph buys little
    assert not graphable(cuda, 28, "sgd", 1, False)  # momentum starts from the first gradient, not zero
    assert not graphable(cuda, 28, "adamw", 2, False)  # DDP's hooks
    assert not graphable(cuda, 28, "adamw", 1, True)
