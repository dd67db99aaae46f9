"""The training step's parts that run on a CPU: the graph capture itself needs a GPU, and bench/gpu_train.py
checks it there (a graphed and an eager run of the same batches; bench/RESULTS.md)."""

import torch
import torch.nn.functional as F

from visionroute.training.engine import _load_optimizer_state, build_model
from visionroute.training.step import EagerStep, GraphedStep, graphable, warm_up_leaving_no_trace


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


def test_a_step_that_cannot_be_captured_trains_eagerly_and_says_so(capsys, monkeypatch):
    model, optimiser, loss_fn, x, labels = _setup()

    def refused(self, x, labels):  # what CUDA answers to a host read-back inside a capture
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(GraphedStep, "_capture", refused)
    step = GraphedStep(model, optimiser, loss_fn, torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    first = step(x, labels, 1.0)
    assert "could not be captured as a CUDA graph (operation not permitted" in capsys.readouterr().out
    assert not step.graphed and step(x, labels, 1.0) < first
    assert optimiser.param_groups[0]["lr"] == 2e-3 and not optimiser.param_groups[0]["capturable"]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_a_checkpoint_keeps_its_state_but_not_its_optimizer_implementation():
    model, *_ = _setup()
    written = torch.optim.AdamW(model.parameters(), lr=1e-3)  # as on a CPU: neither fused nor capturable
    F.cross_entropy(model(torch.randn(4, 1, 28, 28)), torch.tensor([0, 1, 0, 1])).backward()
    written.step()
    fused = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    _load_optimizer_state(fused, written.state_dict())
    assert fused.param_groups[0]["fused"] is True
    parameter = next(model.parameters())
    assert (
        fused.state[parameter]["step"].dtype == torch.float32 and float(fused.state[parameter]["step"]) == 1
    )
    torch.testing.assert_close(fused.state[parameter]["exp_avg"], written.state[parameter]["exp_avg"])
    fused.step()  # the fused kernel accepts the state
