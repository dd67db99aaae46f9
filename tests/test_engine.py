"""The training engine on tiny real data: cache, device augmentation, feed, probe, fine-tune, budget, resume,
native small inputs, metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, grey_npz, make_dataset
from PIL import Image

from visionroute.data.dataset import assign_splits, native_shape, scan_dataset
from visionroute.training import engine
from visionroute.training.augment import augment_batch, augmented, steps_together
from visionroute.training.cache import DecodedData, SplitArrays, decode_to_cache
from visionroute.training.engine import (
    BudgetPlanner,
    EpochStats,
    ModelSelection,
    Preprocessing,
    TrainConfig,
    build_model,
    class_weights,
    prepare_data,
    smoothed_cross_entropy,
    train,
)
from visionroute.training.loader import BatchFeed
from visionroute.training.metrics import (
    binary_threshold,
    classification_report,
    plot_confusion_matrix,
    roc_auc,
)
from visionroute.training.recipes import FINETUNE, SCRATCH, Augmentation
from visionroute.training.weights import load_pretrained, resolve_pretrained

MODEL = "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("engine") / "data", per_class=10)
    return assign_splits(scan_dataset(root), seed=0)


@pytest.fixture(scope="module")
def prepared(dataset):
    prep = Preprocessing.for_model(build_model(MODEL, 2), MODEL, dataset.classes)
    return dataset, prepare_data(dataset, prep)


def fresh_model():
    model = build_model(MODEL, 2)
    load_pretrained(model, resolve_pretrained(MODEL, model), 2)
    return model


def own_dataset(tmp_path):
    """A dataset this test may change without touching the module's shared one."""
    return assign_splits(scan_dataset(make_dataset(tmp_path / "own", per_class=10)), seed=0)


def test_cache_is_built_once_and_reused_and_keyed_by_content(tmp_path):
    dataset = own_dataset(tmp_path)
    prep = Preprocessing.for_model(build_model(MODEL, 2), MODEL, dataset.classes)
    first = decode_to_cache(dataset, prep, tmp_path, progress=False)
    assert not first.reused and isinstance(first.train.x, np.memmap)
    assert first.train.x.shape == (len(dataset.split("train")), 3, prep.resize, prep.resize)
    again = decode_to_cache(dataset, prep, tmp_path, progress=False)
    assert again.reused and again.folder == first.folder
    np.testing.assert_array_equal(again.test.x, first.test.x)
    # Same bytes as decoding in memory: the cache changes where images live, not what they are.
    in_memory = decode_to_cache(dataset, prep, None, progress=False)
    np.testing.assert_array_equal(in_memory.val.x, first.val.x)
    # Touching a file changes the key: a new cache, the old one untouched.
    path = dataset.split("train")[0].ref
    Image.open(path).save(path, quality=50)
    changed = decode_to_cache(dataset, prep, tmp_path, progress=False)
    assert not changed.reused and changed.folder != first.folder
    assert not list(tmp_path.glob("*.tmp-*")), "no staging folder is left behind"


def test_the_cache_keeps_to_its_size_least_recently_used_first_and_clears_killed_builds(
    tmp_path, monkeypatch
):
    import os
    import socket
    import time

    from visionroute.training.cache import cache_entries

    dataset = own_dataset(tmp_path)
    root = tmp_path / "decoded"
    model_a, model_b = build_model(MODEL, 2), build_model("resnet18_small", 2, input_size=32)
    prep_a = Preprocessing.for_model(model_a, MODEL, dataset.classes)
    prep_b = Preprocessing.for_model(model_b, "resnet18_small", dataset.classes, 3, 32)
    first = decode_to_cache(dataset, prep_a, root, progress=False)
    os.utime(first.folder / "meta.json", (time.time() - 3600, time.time() - 3600))  # used an hour ago
    # A build killed mid-way left its staging folder (a pid that no longer runs); a live one's stays.
    host = socket.gethostname()
    dead = root / f"0123abcd.tmp-{host}-999999999"
    live = root / f"4567ef01.tmp-{host}-{os.getpid()}"
    elsewhere = root / "89abcdef.tmp-another-host-999999999"  # a shared state folder: that host's to clear
    for staging in (dead, live, elsewhere):
        staging.mkdir()
    # Less room than the first entry takes: using a second evicts the least recently used, never the one in use.
    room = sum(path.stat().st_size for path in first.folder.iterdir()) / 2
    monkeypatch.setenv("VISIONROUTE_CACHE_MAX_GB", str(room / 1024**3))
    second = decode_to_cache(dataset, prep_b, root, progress=False)
    assert [entry.folder for entry in cache_entries(root)] == [second.folder]
    assert not first.folder.exists() and not dead.exists() and live.exists() and elsewhere.exists()
    assert second.train.x.shape[0] == len(dataset.split("train"))  # what is in use stays readable
    monkeypatch.setenv("VISIONROUTE_CACHE_MAX_GB", "lots")
    with pytest.raises(ValueError, match="VISIONROUTE_CACHE_MAX_GB='lots' is not a number"):
        decode_to_cache(dataset, prep_a, root, progress=False)


def test_a_file_that_fails_to_decode_is_listed_and_left_out(tmp_path):
    dataset = own_dataset(tmp_path)
    path = Path(dataset.split("train")[1].ref)
    path.write_bytes(path.read_bytes()[:600])  # truncated: the header reads, the pixels do not
    prep = Preprocessing.for_model(build_model(MODEL, 2), MODEL, dataset.classes)
    decoded = decode_to_cache(dataset, prep, tmp_path, progress=False)
    assert str(path) in decoded.rejected and "truncated" in decoded.rejected[str(path)].lower()
    assert str(path) not in decoded.train.refs and len(decoded.train) == len(dataset.split("train")) - 1
    assert decoded.train.x.shape[0] == len(decoded.train.y)


def test_augmentation_is_seeded_and_shaped_like_the_model_input():
    prep = Preprocessing(32, 36, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), ["a", "b"], "m", 3, 40)
    stored = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8)
    aug = Augmentation(scale=(0.3, 1.0))
    a = augment_batch(stored, prep, aug, torch.Generator().manual_seed(1))
    b = augment_batch(stored, prep, aug, torch.Generator().manual_seed(1))
    c = augment_batch(stored, prep, aug, torch.Generator().manual_seed(2))
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Identity parameters reproduce the evaluation crop: the grid maps pixel centres onto pixel centres.
    plain = Augmentation(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, jitter=0.0)
    same = Preprocessing(40, 40, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), ["a", "b"], "m", 3, 40)
    out = augment_batch(stored, same, plain, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, same.eval_batch(stored), atol=1e-3, rtol=0)


def test_batches_augmented_together_come_out_one_step_at_a_time_as_if_augmented_alone():
    prep = Preprocessing(40, 40, (0.5,), (0.25,), ["a", "b"], "m", 1, 40)
    batches = [
        (torch.randint(0, 256, (size, 1, 40, 40), dtype=torch.uint8), torch.full((size,), i))
        for i, size in enumerate((4, 4, 4, 3, 4))
    ]
    plain = Augmentation(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, jitter=0.0)
    out = list(augmented(batches, prep, plain, torch.Generator().manual_seed(0), together=3))
    assert [len(x) for x, _ in out] == [4, 4, 4, 3, 4]
    for (x, labels), (stored, expected) in zip(out, batches, strict=True):
        assert torch.equal(labels, expected)
        torch.testing.assert_close(x, prep.eval_batch(stored), atol=1e-3, rtol=0)
    # Random draws: one image everywhere, and every copy gets its own crop, batches together or alone.
    image = batches[0][0][:1]
    copies = [(image.expand(len(labels), -1, -1, -1), labels) for _, labels in batches]
    aug = Augmentation(scale=(0.3, 1.0))
    for together in (1, 5):
        crops = torch.cat(
            [x for x, _ in augmented(copies, prep, aug, torch.Generator().manual_seed(1), together)]
        )
        assert len({tuple(x.flatten().tolist()) for x in crops}) == len(crops) == 19


def test_the_training_loss_is_pytorchs_smoothed_weighted_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 3, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, 3, (64,), generator=generator)
    for weight in (None, torch.tensor([1.8, 0.2, 1.0], dtype=torch.float64)):
        for smoothing in (0.0, 0.1, 0.3):
            expected = F.cross_entropy(logits, labels, weight=weight, label_smoothing=smoothing)
            torch.testing.assert_close(smoothed_cross_entropy(logits, labels, smoothing, weight), expected)


def test_only_small_inputs_on_a_gpu_are_augmented_ahead():
    assert steps_together(torch.device("cpu"), 512, 1, 28) == 1
    assert steps_together(torch.device("cuda"), 512, 1, 28) == 16  # 1.6 MB a batch
    assert steps_together(torch.device("cuda"), 256, 3, 224) == 1  # 154 MB: alone
    assert steps_together(torch.device("cuda"), 64, 3, 96) == 9


def test_feed_covers_the_split_once_per_epoch_and_drops_a_lone_last_image():

    x = np.arange(9 * 1 * 2 * 2, dtype=np.uint8).reshape(9, 1, 2, 2)
    split = SplitArrays(x, np.arange(9), [str(i) for i in range(9)])
    feed = BatchFeed(split, 4, torch.device("cpu"))
    assert feed.steps() == 2  # 4 + 4, the ninth image alone would break BatchNorm
    seen = [y.tolist() for _, y in feed.epoch(torch.randperm(9, generator=torch.Generator().manual_seed(0)))]
    flat = sum(seen, [])
    assert len(flat) == 8 and len(set(flat)) == 8
    for images, labels in feed.epoch(torch.arange(9)):
        assert torch.equal(images[:, 0, 0, 0], torch.from_numpy(x[labels.numpy(), 0, 0, 0]))
    # Under DDP, fewer images than the global batch still train (every rank its share); 3 images on 2 ranks don't.
    ranks = [BatchFeed(split, 64, torch.device("cpu"), rank=rank, world=2) for rank in (0, 1)]
    assert [feed.steps() for feed in ranks] == [1, 1]
    shares = [[y.tolist() for _, y in feed.epoch(torch.arange(9))] for feed in ranks]
    assert shares == [[[0, 2, 4, 6, 8]], [[1, 3, 5, 7]]]
    tiny = SplitArrays(x[:3], np.arange(3), ["0", "1", "2"])
    assert BatchFeed(tiny, 64, torch.device("cpu"), world=2).steps() == 0


def test_model_selection_and_budget_planner_alone(monkeypatch):
    model = torch.nn.Linear(2, 2)
    selection = ModelSelection(val_examples=10, floor_accuracy=0.6)
    assert not selection.update(1, 0.5, 0.3, model)  # below the probe's floor
    assert selection.update(2, 0.8, 0.5, model)
    assert selection.update(3, 0.8, 0.4, model)  # a tie, lower loss
    assert (
        not selection.update(4, 0.75, 0.1, model) or selection.best_epoch == 4
    )  # within one image: loss decides
    assert selection.best_state is not None
    # A still clock: the arithmetic alone. 11 steps of 10 a second, the first a 10 s warm-up; 1 s validation
    # passes (the test pass reserves one).
    monkeypatch.setattr(engine.time, "perf_counter", lambda: 1000.0)
    planner = BudgetPlanner(101.5, 1000.0, steps_per_epoch=10)
    planner.step_seconds, planner.val_seconds = 5.0, 30.0  # a cautious estimate before the first epoch
    planner.record(EpochStats(0.5, 12.0, 10.0, 100, [], steps=11, warmup_steps=1), 1.0, test_fraction=1.0)
    assert planner.step_seconds == pytest.approx(0.2), "one-off warm-up is not a step's cost"
    assert planner.val_seconds == 1.0, "the first measured epoch replaces the estimate"
    # 100.5 s left: 33 epochs of 3 s, then 1.5 s: a validation pass and 2 steps of a last, shorter epoch.
    assert planner.steps_that_fit() == 332
    planner.budget = 100.0  # 99 s: exactly 33 epochs, no room for a shorter one
    assert planner.steps_that_fit() == 330
    planner.record(EpochStats(0.5, 4.0, 0.0, 100, [], steps=10, warmup_steps=0), 2.0, test_fraction=1.0)
    assert (planner.step_seconds, planner.val_seconds) == (0.4, 2.0), "later epochs: the slowest seen"


@pytest.mark.slow
def test_probe_then_finetune_learns_and_checkpoints(prepared, tmp_path):
    dataset, data = prepared
    epochs = []
    config = TrainConfig.from_recipe(
        FINETUNE, MODEL, max_epochs=2, budget_seconds=120, checkpoint_dir=tmp_path / "ckpt", patience=9
    )
    model = fresh_model()
    pretrained = [p.detach().clone() for p in model.parameters()]
    result = train(config, model, data, on_epoch=epochs.append)
    # Small data: the front half of the backbone kept its pretrained weights; the rest and the head trained.
    backbone = len(pretrained) - len(list(model.get_classifier().parameters()))
    assert result.frozen_tensors == backbone // 2
    changed = [
        not torch.equal(before, after) for before, after in zip(pretrained, model.parameters(), strict=True)
    ]
    assert not any(changed[: result.frozen_tensors]) and all(changed[-2:])  # frozen; the head
    assert sum(changed[result.frozen_tensors :]) > 0.9 * (len(changed) - result.frozen_tensors)
    assert result.probe["val_accuracy"] == 1.0  # colour fields: trivially separable on ImageNet features
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert result.test["accuracy"] == 1.0 and result.test["examples"] == len(dataset.split("test"))
    assert "auc" in result.test
    assert (tmp_path / "ckpt" / "last.pt").exists() and (tmp_path / "ckpt" / "best.pt").exists()
    assert result.stopped in ("max_epochs", "early_stopping")


def test_training_is_planned_for_bf16_only_where_the_cpu_computes_in_it_with_bf16_instructions(monkeypatch):
    monkeypatch.setattr(engine, "pick_device", lambda: torch.device("cpu"))
    for setting, instructions, planned in (
        ("auto", True, "cpu_bf16"),
        ("auto", False, "cpu"),
        ("0", True, "cpu"),
        ("1", False, "cpu"),  # forced bf16 without the instructions: not known to be faster, planned as fp32
    ):
        monkeypatch.setenv(engine.CPU_BF16_ENV, setting)
        monkeypatch.setattr(engine, "bf16_instructions", lambda instructions=instructions: instructions)
        engine.cpu_bf16.cache_clear()
        assert engine.training_device() == planned, (setting, instructions)
    monkeypatch.setattr(engine, "pick_device", lambda: torch.device("cuda"))
    assert engine.training_device() == "gpu"


def test_the_flow_decides_the_model_for_the_device_it_trains_on(tmp_path, monkeypatch):
    from conftest import write_spec

    from visionroute.planning import plan

    make_dataset(tmp_path / "data", per_class=10)
    spec = write_spec(
        tmp_path / "t.yaml",
        "name: t\ntask: classify\ndata: {path: ./data}\ndomain: natural\ntraining: {budget_minutes: 0.12}\n",
    )
    # 20 images, three epochs in 5.8 s: lite2 on a GPU (what `visionroute decide` plans for) or a bf16 CPU,
    # lite1 on an fp32 CPU.
    assert plan(str(spec)).decision.model == "tf_efficientnet_lite2"
    monkeypatch.setattr(engine, "training_device", lambda: "cpu")
    decision = plan(str(spec), check_images=True).decision
    assert (decision.inputs["training_device"], decision.model) == ("cpu", "tf_efficientnet_lite1")


@pytest.mark.slow
def test_cpu_precision_is_bf16_where_the_cpu_has_bf16_instructions_or_where_asked(prepared, monkeypatch):
    _, data = prepared
    cpu = torch.device("cpu")
    # auto: bf16 exactly where the kernel reports AMX-BF16 or AVX512-BF16 (read from /proc/cpuinfo, not torch).
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    assert engine.cpu_bf16() == ("amx_bf16" in flags or "avx512_bf16" in flags)
    torch.manual_seed(0)
    result = train(TrainConfig(MODEL, max_epochs=1, budget_seconds=60), fresh_model(), data)
    assert result.precision == engine.precision(engine.pick_device())
    model = result.model.eval()
    # (Registered models, torch.export graphs, go through the same forward_eval: test_flow's predict and
    # champion comparison run them, in bf16 on a machine with bf16 instructions such as CI's.)
    probabilities = {}
    for setting, expected in (("0", "fp32"), ("1", "bf16")):
        monkeypatch.setenv(engine.CPU_BF16_ENV, setting)
        engine.cpu_bf16.cache_clear()
        assert engine.precision(cpu) == expected
        with engine._autocast(cpu):
            assert model.get_classifier()(torch.randn(2, model.num_features)).dtype == (
                torch.bfloat16 if expected == "bf16" else torch.float32
            )
        logits = engine.predict_logits(model, data.test.x, data.preprocessing, cpu)
        assert logits.dtype == torch.float32
        probabilities[expected] = logits.softmax(1)
    # bf16 rounds (about 3 significant digits); it does not change what a trained model says.
    fp32, bf16 = probabilities["fp32"], probabilities["bf16"]
    assert torch.equal(bf16.argmax(1), fp32.argmax(1)) and (bf16 - fp32).abs().max() < 0.05
    monkeypatch.setenv(engine.CPU_BF16_ENV, "yes")
    engine.cpu_bf16.cache_clear()
    with pytest.raises(ValueError, match=r"VISIONROUTE_CPU_BF16='yes': use 0 \(fp32\), 1 \(bf16\) or auto"):
        engine.cpu_bf16()


@pytest.mark.slow
def test_same_seed_same_run(prepared):
    _, data = prepared
    runs = [train(TrainConfig(MODEL, max_epochs=1, seed=7), fresh_model(), data) for _ in range(2)]
    assert runs[0].history[0]["train_loss"] == runs[1].history[0]["train_loss"]
    assert runs[0].history[0]["val_loss"] == runs[1].history[0]["val_loss"]


@pytest.mark.slow
def test_budget_is_respected(prepared):
    _, data = prepared
    result = train(TrainConfig(MODEL, max_epochs=50, budget_seconds=1.0), fresh_model(), data)
    assert result.stopped == "budget"
    assert len(result.history) == 1


def test_a_training_split_too_small_for_one_step_is_a_clear_error(prepared):
    _, data = prepared
    train_split = data.splits["train"]
    one = SplitArrays(train_split.x[:1], train_split.y[:1], train_split.refs[:1])
    tiny = DecodedData(data.preprocessing, {**data.splits, "train": one})
    config = TrainConfig(MODEL, pretrained=False, max_epochs=1, budget_seconds=60)
    with pytest.raises(ValueError, match=r"training split has 1 image\(s\): too few to train"):
        train(config, build_model(MODEL, 2), tiny)


@pytest.mark.slow
def test_grey_28px_data_trains_natively_as_one_channel(tmp_path):
    dataset = assign_splits(scan_dataset(grey_npz(tmp_path / "grey.npz")), seed=0)
    channels, native = native_shape(dataset)
    assert (channels, native) == (1, 28)
    model = build_model("resnet18_small", 2, in_chans=1, input_size=native)
    prep = Preprocessing.for_model(model, "resnet18_small", dataset.classes, channels, native)
    assert (prep.input_size, prep.store_side, prep.channels, len(prep.mean)) == (28, 28, 1, 1)
    data = prepare_data(dataset, prep, cache_root=tmp_path / "cache")
    assert data.train.x.shape[1:] == (1, 28, 28), "stored at native size, not upscaled to 256 px"
    config = TrainConfig.from_recipe(
        SCRATCH, "resnet18_small", max_epochs=6, budget_seconds=60, batch_size=16
    )
    result = train(config, model, data)
    assert result.test["accuracy"] >= 0.9 and result.test["auc"] >= 0.9
    assert 0.0 < result.preprocessing.threshold < 1.0  # chosen on validation, recorded with the model


def test_class_weights_only_above_the_imbalance_ratio():
    assert class_weights(np.array([0] * 30 + [1] * 10), 2, 3.0) is None
    weights = class_weights(np.array([0] * 90 + [1] * 10), 2, 3.0)
    assert weights[1] / weights[0] == pytest.approx(9.0)


RESUMABLE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from visionroute.data.dataset import assign_splits, scan_dataset
    from visionroute.training.engine import Preprocessing, TrainConfig, build_model, prepare_data, train
    from visionroute.training.recipes import SCRATCH

    npz, folder, pause = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "pause"
    dataset = assign_splits(scan_dataset(npz), seed=0)
    import torch
    torch.manual_seed(0)  # the same initial weights in every process
    model = build_model("resnet18_small", 2, in_chans=1, input_size=28)
    prep = Preprocessing.for_model(model, "resnet18_small", dataset.classes, 1, 28)
    data = prepare_data(dataset, prep, cache_root=folder / "cache")

    def on_epoch(record):
        print("EPOCH", record["epoch"], flush=True)
        if pause and record["epoch"] == 2:
            (folder / "at-epoch-2").touch()
            import time; time.sleep(600)  # killed here, after epoch 2's checkpoint

    config = TrainConfig.from_recipe(
        SCRATCH, "resnet18_small", max_epochs=4, budget_seconds=600, batch_size=16, patience=99,
        checkpoint_dir=folder / "ckpt", resume_key="same-run",
    )
    result = train(config, model, data, on_epoch=on_epoch)
    print("RESUMED", result.resumed_from_epoch, flush=True)
    print("LOSSES", [round(h["train_loss"], 5) for h in result.history], flush=True)
    print("ACCURACY", result.test["accuracy"], flush=True)
    """
)


@pytest.mark.slow
def test_kill_9_mid_training_then_the_same_run_resumes_and_ends_where_it_would_have(tmp_path):
    npz = grey_npz(tmp_path / "grey.npz", count=48)
    script = tmp_path / "resumable.py"
    script.write_text(RESUMABLE)
    env = {**os.environ, "PYTHONPATH": str(REPO), "VISIONROUTE_NO_BAR": "1"}

    def run(folder, mode):
        folder.mkdir(exist_ok=True)
        return subprocess.Popen(
            [sys.executable, str(script), str(npz), str(folder), mode],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )

    straight = run(tmp_path / "straight", "go").communicate(timeout=600)[0]
    victim = run(tmp_path / "crash", "pause")
    deadline = time.time() + 600
    while not (tmp_path / "crash" / "at-epoch-2").exists():
        assert victim.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.2)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    resumed = run(tmp_path / "crash", "go").communicate(timeout=600)[0]

    def figure(output, key):
        return next(line.split(" ", 1)[1] for line in output.splitlines() if line.startswith(key))

    assert figure(straight, "RESUMED") == "0"
    assert figure(resumed, "RESUMED") == "2", resumed
    assert "EPOCH 1" not in resumed and "EPOCH 3" in resumed  # epochs 1-2 were not trained again
    # Same seeds, same RNG states restored: the resumed run ends where the uninterrupted one did.
    straight_losses, resumed_losses = eval(figure(straight, "LOSSES")), eval(figure(resumed, "LOSSES"))
    np.testing.assert_allclose(resumed_losses, straight_losses, rtol=1e-3)
    assert abs(float(figure(resumed, "ACCURACY")) - float(figure(straight, "ACCURACY"))) <= 0.1


@pytest.mark.slow
def test_a_checkpoint_of_another_run_is_not_resumed(tmp_path):
    dataset = assign_splits(scan_dataset(grey_npz(tmp_path / "g.npz", count=24)), seed=0)
    model = build_model("resnet18_small", 2, in_chans=1, input_size=28)
    prep = Preprocessing.for_model(model, "resnet18_small", dataset.classes, 1, 28)
    data = prepare_data(dataset, prep)
    base = dict(max_epochs=1, budget_seconds=60, batch_size=8, checkpoint_dir=tmp_path / "ck")
    train(TrainConfig.from_recipe(SCRATCH, "resnet18_small", resume_key="a", **base), model, data)
    other = train(TrainConfig.from_recipe(SCRATCH, "resnet18_small", resume_key="b", **base), model, data)
    assert other.resumed_from_epoch == 0


def test_metrics_and_confusion_matrix(tmp_path):
    report = classification_report([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(0.6)
    assert report["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert report["per_class"]["b"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "support": 2}
    assert np.array(report["confusion_matrix"]).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    png = plot_confusion_matrix(report["confusion_matrix"], ["a", "b", "c"], tmp_path / "cm.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_auc_and_threshold():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([1, 1], [0.1, 0.2]) is None
    # Positives score 0.3-0.4, negatives 0.1-0.2: argmax (0.5) calls everything negative, the chosen
    # threshold separates them.
    threshold = binary_threshold([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4])
    assert 0.2 < threshold <= 0.3


def test_scratch_trains_in_one_process_per_gpu_unless_the_spec_says_otherwise():
    from visionroute.training.distributed import processes_for

    assert processes_for("scratch", "auto", gpus=4) == 4
    assert processes_for("scratch", "auto", gpus=0) == 1
    assert processes_for("finetune", "auto", gpus=4) == 1  # small data: one GPU is enough
    assert processes_for("finetune", 2, gpus=0) == 2  # CPU ranks share the cores through gloo (tests, trials)
    with pytest.raises(ValueError, match="training.processes is 8 but 4 GPU"):
        processes_for("scratch", 8, gpus=4)


def test_weight_average_follows_the_weights_over_its_time_constant_in_epochs():
    from visionroute.training.engine import WeightAverage

    model = torch.nn.Linear(4, 2)
    average = WeightAverage(model, epochs=1.0, steps_per_epoch=100)
    assert average.decay == pytest.approx(0.99)  # one epoch of 100 steps
    start = average.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    for _ in range(10):  # early steps: the random start fades out quickly
        average.update()
    moved = (average.model.weight - start).mean().item()
    assert 0.5 < moved < 1.0
    for _ in range(2000):
        average.update()
    assert torch.allclose(average.model.weight, model.weight, atol=1e-4)
    assert not any(p.requires_grad for p in average.model.parameters())  # never trained itself


def test_a_failed_rank_0_error_reaches_the_flow_as_itself(tmp_path):
    from collections import deque

    from visionroute.data.dataset import DatasetError
    from visionroute.training.launch import TrainingProcessesFailed, _failure

    error = tmp_path / "error.json"
    error.write_text(
        json.dumps({"module": "visionroute.data.dataset", "type": "DatasetError", "message": "add images"})
    )
    expected = _failure(error, 2, 1, deque())
    assert isinstance(expected, DatasetError) and str(expected) == "add images"  # the CLI prints its one line
    error.write_text(
        json.dumps({"module": "builtins", "type": "RuntimeError", "message": "Connection closed"})
    )
    # A peer killed for memory leaves rank 0 a broken connection to report: the output, where the death shows,
    # comes with it.
    peer_died = str(_failure(error, 2, 1, deque(["rank: 1 (local_rank: 1) exitcode: -9"])))
    assert peer_died.startswith("training in 2 processes failed (torchrun exit code 1); rank 0: RuntimeError")
    assert "rank: 1 (local_rank: 1) exitcode: -9" in peer_died and "resumes from the last one" in peer_died
    error.unlink()  # killed before it could say why: the output's last lines
    died = str(_failure(error, 4, -9, deque(["epoch 3/9", "Killed"])))
    assert (
        "training in 4 processes failed (torchrun exit code -9)\n" in died and "epoch 3/9\nKilled\n" in died
    )
    assert isinstance(_failure(error, 4, -9, deque()), TrainingProcessesFailed)


def test_a_failed_torchrun_error_carries_its_report_not_the_whole_output(tmp_path):
    """The flow's log already has every line the ranks printed: the error keeps torchrun's report of the failed
    rank and says where the whole output is."""
    from collections import deque

    from visionroute.training.launch import _failure

    rule = "=" * 60
    report = [rule, "visionroute.training.launch FAILED", "-" * 60, "Root Cause (first observed failure):",
              "[0]:", "  rank      : 1 (local_rank: 1)", "  exitcode  : -9 (pid: 4242)", rule]  # fmt: skip
    noise = [f"epoch {i}/90  loss 0.5" for i in range(60)] + ["Traceback (most recent call last):", "  ..."]
    message = str(_failure(tmp_path / "error.json", 2, 1, deque(noise + report, maxlen=100)))
    assert "\n".join(report) in message and "epoch 5/90" not in message and "Traceback" not in message
    assert f"(the ranks' whole output: {tmp_path / 'output.log'})" in message
    # No report (torchrun itself killed): the last 20 lines, not 100.
    message = str(_failure(tmp_path / "error.json", 2, -9, deque(noise, maxlen=100)))
    assert "epoch 59/90" in message and "epoch 42/90" in message and "epoch 41/90" not in message
