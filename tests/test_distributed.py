"""DDP and the Ray Data path inside real Ray Train workers (2 CPU workers, gloo)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cyclegan.config import LossConfig, ModelConfig
from cyclegan.train_step import CycleGANNets, Optimizers, build_nets, build_pools, train_step
from pipeline.shards import ShardWriter, build_manifest, write_manifest

pytestmark = pytest.mark.integration

TINY = ModelConfig(ngf=4, ndf=4, n_blocks=1, n_layers_D=2)
LOSS = LossConfig(pool_size=0)


def fit(loop, config: dict, num_workers: int, tmp_path: Path, datasets=None, dataset_config=None):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    kwargs = {"datasets": datasets} if datasets else {}
    if dataset_config is not None:
        kwargs["dataset_config"] = dataset_config
    trainer = TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=num_workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"t-{tmp_path.name}", storage_path=str(tmp_path / "ray")),
        **kwargs,
    )
    return trainer.fit()


def batches(world: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    return [
        (
            torch.rand(world, 3, 32, 32, generator=g) * 2 - 1,
            torch.rand(world, 3, 32, 32, generator=g) * 2 - 1,
        )
        for _ in range(steps)
    ]


def sgd(nets: CycleGANNets) -> Optimizers:
    def opt(*ms):
        return torch.optim.SGD([p for m in ms for p in m.parameters()], lr=0.1)

    return Optimizers(G=opt(nets.G_A, nets.G_B), D=opt(nets.D_A, nets.D_B))


def ddp_loop(config: dict) -> None:
    """Each case of ``config["cases"]`` in turn: fresh nets, DDP, ``steps`` steps with one
    image per rank; then each rank saves its weights and gradients."""
    import ray.train
    import ray.train.torch

    from cyclegan.train_step import build_optimizers, unwrap

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    for case in config["cases"]:
        torch.manual_seed(0)
        nets = build_nets(TINY)
        opts = sgd(nets) if case["optimizer"] == "sgd" else build_optimizers(nets, _optim())
        wrapped = CycleGANNets(**{n: ray.train.torch.prepare_model(m) for n, m in nets.items()})
        for real_A, real_B in batches(world, case["steps"]):
            train_step(
                wrapped, opts, build_pools(0, 0), real_A[rank : rank + 1],
                real_B[rank : rank + 1], LOSS,
            )  # fmt: skip
        out = {
            "params": {n: unwrap(m).state_dict() for n, m in wrapped.items()},
            "grads": {
                n: {
                    k: p.grad.clone() for k, p in unwrap(m).named_parameters() if p.grad is not None
                }
                for n, m in wrapped.items()
            },
        }
        torch.save(out, Path(config["out"]) / f"{case['name']}-rank{rank}.pt")


def _optim():
    from cyclegan.config import OptimConfig

    return OptimConfig()


@pytest.fixture(scope="module")
def ddp_ranks(ray_client, tmp_path_factory):
    """One 2-worker Train run of two cases, each rank's weights and gradients after them:
    ``sgd1`` one SGD step, ``adam4`` four Adam steps."""
    out = tmp_path_factory.mktemp("ddp")
    cases = [{"name": "sgd1", "optimizer": "sgd", "steps": 1},
             {"name": "adam4", "optimizer": "adam", "steps": 4}]  # fmt: skip
    fit(ddp_loop, {"cases": cases, "out": str(out)}, 2, out)

    def ranks(case: str) -> list[dict]:
        return [torch.load(out / f"{case}-rank{r}.pt", weights_only=True) for r in (0, 1)]

    return ranks


def test_ddp_gradients_match_single_process(ddp_ranks):
    """One step with 2 ranks x 1 image gives the gradients of one process on the 2 images."""
    ranks = ddp_ranks("sgd1")

    torch.manual_seed(0)
    nets = build_nets(TINY)
    opts = sgd(nets)
    ((real_A, real_B),) = batches(2, 1)
    train_step(nets, opts, build_pools(0, 0), real_A, real_B, LOSS)
    # Per net and norm-wise. Batch 1 per rank and batch 2 here run other kernels; besides
    # rounding (~eps32 * sqrt(K) = 1e-5 for K up to 2*32*32), an L1 term or a ReLU whose input
    # is within rounding of 0 may take the other branch, which moves the gradient by ~2/sqrt(N)
    # of its norm (N = 3*32*32 per rank: 3.6e-2; see GRAD_RTOL in test_train_step.py). Room for
    # two such switches. The conv biases an instance norm cancels have a true gradient of 0: their
    # entries are noise, negligible in the norm (compared one by one they can fail any atol).
    grad_rtol = 8e-2
    checked = 0
    for name, net in nets.items():
        keys = [key for key, _ in net.named_parameters()]
        grad = torch.cat([p.grad.flatten() for _, p in net.named_parameters()])
        weight = torch.cat([p.detach().flatten() for _, p in net.named_parameters()])
        for r in ranks:
            rank_grad = torch.cat([r["grads"][name][key].flatten() for key in keys])
            rank_weight = torch.cat([r["params"][name][key].flatten() for key in keys])
            grad_error = (rank_grad - grad).norm()
            assert grad_error <= grad_rtol * grad.norm(), f"{name}: gradients differ"
            # One SGD step, w - 0.1 * g: the weights differ by 0.1 x the gradients' difference,
            # plus fp32 rounding of each w (ulp(0.1) = 7e-9, far under 1e-6 summed in the norm).
            assert (rank_weight - weight).norm() <= 0.1 * grad_error + 1e-6, f"{name}: weights"
        checked += len(keys)
    assert checked == sum(len(list(n.parameters())) for _, n in nets.items())


def test_ddp_params_stay_identical_across_ranks(ddp_ranks):
    r0, r1 = ddp_ranks("adam4")
    torch.manual_seed(0)
    initial = build_nets(TINY)
    for name, state in r0["params"].items():
        for key, value in state.items():
            assert torch.equal(value, r1["params"][name][key]), f"{name}.{key} differs across ranks"
        # and training moved the weights
        first = next(k for k in state if k.endswith("weight"))
        assert not torch.equal(state[first], dict(initial.items())[name].state_dict()[first])


# Data path


def write_domains(
    root: Path, counts: dict[str, int], size: int = 12, bad: dict | None = None
) -> str:
    """A dataset root with random PNGs: counts like {"trainA": 7, "trainB": 50}."""
    rng = np.random.default_rng(0)
    entries = {}
    for name, n in counts.items():
        with ShardWriter(str(root), name, shard_bytes=4096) as writer:
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                    buf, "PNG"
                )
                writer.add(f"{name}/{i:03d}.png", buf.getvalue(), size, size, "PNG")
            for key in (bad or {}).get(name, []):
                writer.add(key, b"not an image at all", size, size, "PNG")
        entries[name] = writer.close()
    write_manifest(str(root), build_manifest("test", entries))
    return str(root)


def lockstep_loop(config: dict) -> None:
    """Each case of ``config["cases"]`` in turn: its datasets ``A<i>``/``B<i>`` read for
    ``epochs`` epochs as training reads them; each rank writes the keys of every batch."""
    import ray.train

    from cyclegan.transforms import to_input
    from pipeline.config import DataConfig
    from pipeline.data import UnpairedBatches

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = DataConfig(load_size=12, crop_size=8, shuffle_buffer=4)
    for i, case in enumerate(config["cases"]):
        stream = UnpairedBatches(
            {d: ray.train.get_dataset_shard(f"{d}{i}") for d in ("A", "B")},
            case["counts"],
            cfg,
            world,
            rank,
            seed=case["seed"],
        )
        log = {"steps_per_epoch": stream.plan.steps_per_epoch, "A": [], "B": [], "first": []}
        for step in range(case["epochs"] * stream.plan.steps_per_epoch):
            a, b, keys_A, keys_B = stream.next()
            assert a.dtype == torch.uint8 and a.shape == (1, 8, 8, 3) and b.shape == (1, 8, 8, 3)
            x = to_input(a)
            assert x.shape == (1, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
            log["A"].append(keys_A)
            log["B"].append(keys_B)
            if step < 3:
                log["first"].append([a.tolist(), b.tolist()])
        stream.close()
        Path(config["out"], f"case{i}-rank{rank}.json").write_text(json.dumps(log))


def datasets_of(root: str, cfg, seed: int) -> tuple[dict, dict[str, int]]:
    """The training datasets and counts of a dataset root, as the driver builds them."""
    from pipeline.plan import check_dataset
    from pipeline.reading import build_datasets
    from pipeline.shards import read_manifest

    manifest = read_manifest(root)
    return build_datasets(manifest, cfg, seed), check_dataset(manifest, cfg)


def run_lockstep(cases: list[tuple[str, int, int]], out: Path, workers: int) -> list[list[dict]]:
    """One Train run of ``workers`` reading each case (dataset root, epochs, seed) in turn;
    per case, each rank's log of the batches it got."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    from pipeline.config import DataConfig as PipelineDataConfig

    datasets, loop_cases = {}, []
    for i, (root, epochs, seed) in enumerate(cases):
        found, counts = datasets_of(root, PipelineDataConfig(load_size=12, crop_size=8), seed)
        datasets.update({f"{d}{i}": ds for d, ds in found.items()})
        loop_cases.append({"counts": counts, "epochs": epochs, "seed": seed})
    out.mkdir(parents=True)
    fit(
        lockstep_loop,
        {"cases": loop_cases, "out": str(out)},
        workers,
        out,
        datasets=datasets,
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
    return [
        [json.loads((out / f"case{i}-rank{r}.json").read_text()) for r in range(workers)]
        for i in range(len(cases))
    ]


LOCKSTEP_SIZES = [(7, 50), (50, 7)]


@pytest.fixture(scope="module")
def lockstep_logs(ray_client, tmp_path_factory) -> dict:
    """Two workers, two epochs, over each of LOCKSTEP_SIZES (images of A, of B): one Train run."""
    tmp = tmp_path_factory.mktemp("lockstep")
    roots = [write_domains(tmp / f"data-{a}-{b}", {"trainA": a, "trainB": b})
             for a, b in LOCKSTEP_SIZES]  # fmt: skip
    logs = run_lockstep([(root, 2, 0) for root in roots], tmp / "out", workers=2)
    return dict(zip(LOCKSTEP_SIZES, logs, strict=True))


@pytest.fixture(scope="module")
def one_worker_logs(ray_client, tmp_path_factory) -> dict:
    """One worker over two datasets in one Train run: ``seeded`` (10 + 12 images, seed 3, one
    epoch; its root too) and ``with_bad_row`` (6 + 6 images and an undecodable one in A, two
    epochs)."""
    tmp = tmp_path_factory.mktemp("one-worker")
    seeded = write_domains(tmp / "seeded", {"trainA": 10, "trainB": 12})
    bad = write_domains(tmp / "bad", {"trainA": 6, "trainB": 6}, bad={"trainA": ["trainA/bad.png"]})
    logs = run_lockstep([(seeded, 1, 3), (bad, 2, 0)], tmp / "out", workers=1)
    return {"seeded": (seeded, logs[0][0]), "with_bad_row": logs[1][0]}


@pytest.mark.parametrize(("n_a", "n_b"), LOCKSTEP_SIZES)
def test_lockstep_epochs_cover_the_larger_domain(lockstep_logs, n_a, n_b):
    logs = lockstep_logs[n_a, n_b]
    spe = logs[0]["steps_per_epoch"]
    assert spe == max(n_a, n_b) // 2
    assert [len(log["A"]) for log in logs] == [2 * spe, 2 * spe]  # same steps on every rank
    larger, smaller = ("B", "A") if n_b > n_a else ("A", "B")
    all_larger = {f"train{larger}/{i:03d}.png" for i in range(max(n_a, n_b))}
    for epoch in range(2):
        seen = [
            k
            for log in logs
            for batch in log[larger][epoch * spe : (epoch + 1) * spe]
            for k in batch
        ]
        assert len(seen) == len(set(seen)) == max(n_a, n_b)  # each image once per epoch
        assert set(seen) == all_larger
    small = {k for log in logs for batch in log[smaller] for k in batch}
    assert small <= {f"train{smaller}/{i:03d}.png" for i in range(min(n_a, n_b))}
    assert len(small) >= min(n_a, n_b) - 1  # the smaller domain cycles (equal split drops one)
    # every epoch a new order
    order = [k for batch in logs[0][larger] for k in batch]
    assert order[:spe] != order[spe:]


def test_same_seed_same_batches(one_worker_logs, tmp_path):
    root, first = one_worker_logs["seeded"]
    (again,) = run_lockstep([(root, 1, 3)], tmp_path / "again", workers=1)[0]
    assert first["first"] == again["first"]
    assert first["A"] == again["A"]

    # Another seed gives other batches: checked on the streams alone (no Train run needed).
    from pipeline.config import DataConfig
    from pipeline.data import DomainStream

    cfg = DataConfig(load_size=12, crop_size=8)
    drawn = {}
    for seed in (3, 3, 4):
        datasets, counts = datasets_of(root, cfg, seed)
        stream = DomainStream(datasets["A"], "A", counts["A"], cfg, seed, 0, cfg.shuffle_buffer)
        try:
            keys, batch = stream.next_batch(8)
        finally:
            stream.close()
        pair = (keys, batch.numpy().tobytes())
        assert drawn.setdefault(seed, pair) == pair
    assert drawn[3][0] != drawn[4][0] and drawn[3][1] != drawn[4][1]


def test_reader_skips_undecodable_rows(one_worker_logs):
    keys = {k for batch in one_worker_logs["with_bad_row"]["A"] for k in batch}
    assert "trainA/bad.png" not in keys
    assert keys == {f"trainA/{i:03d}.png" for i in range(6)}


def test_reads_shards_from_s3(ray_client, s3_env, tmp_path):
    """Scenes written to the local S3-compatible server stream back through Ray Data."""
    from pipeline.scenes import write_scenes

    uri = f"{s3_env}/scenes"
    write_scenes(uri, size=16, train_a=6, train_b=4, test=0, seed=0)
    ((log,),) = run_lockstep([(uri, 1, 0)], tmp_path / "out", workers=1)
    assert log["steps_per_epoch"] == 6
    assert len({k for b in log["A"] for k in b}) == 6


def _fail_on(batch: dict, bad: str) -> dict:
    if bad in set(batch["key"]):
        raise RuntimeError(f"cannot read {bad}")
    return batch


def test_stream_reads_passes_ahead_and_resumes_mid_pass(ray_client, tmp_path, monkeypatch):
    """The reader thread crosses pass boundaries on its own; a stream started at row r yields
    exactly what an uninterrupted stream yields from row r on (crops included)."""
    import ray

    from pipeline.config import DataConfig
    from pipeline.data import DomainStream
    from pipeline.reading import domain_dataset
    from pipeline.shards import read_manifest

    root = write_domains(tmp_path / "data", {"trainA": 9, "trainB": 1})
    cfg = DataConfig(load_size=12, crop_size=8, shuffle_buffer=4)
    # As training runs it (data.deterministic): Ray Data keeps the order of the blocks.
    options = ray.data.DataContext.get_current().execution_options
    monkeypatch.setattr(options, "preserve_order", True)
    manifest = read_manifest(root)
    ds = domain_dataset(manifest, "A", cfg, seed=0)
    full = DomainStream(ds, "A", 9, cfg, seed=1, rank=0, shuffle_buffer=4)
    batches = [full.next_batch(4) for _ in range(6)]  # 24 rows: nearly three passes
    keys, rows = batches[-1]
    full.close()
    full._thread.join(timeout=20)
    assert not full._thread.is_alive()  # the reader thread ends once told to
    later = DomainStream(ds, "A", 9, cfg, seed=1, rank=0, shuffle_buffer=4, start_row=20)
    later_keys, later_rows = later.next_batch(4)
    assert torch.equal(later_rows, rows) and later_keys == keys
    later.close()


def test_stream_raises_a_read_error_instead_of_hanging(ray_client, tmp_path):
    from pipeline.config import DataConfig
    from pipeline.data import DomainStream
    from pipeline.reading import domain_dataset
    from pipeline.shards import read_manifest

    root = write_domains(tmp_path / "data", {"trainA": 6, "trainB": 1})
    cfg = DataConfig(load_size=12, crop_size=8, shuffle_buffer=0)
    ds = domain_dataset(read_manifest(root), "A", cfg, seed=0)
    ds = ds.map_batches(_fail_on, fn_kwargs={"bad": "trainA/003.png"}, batch_size=None)
    stream = DomainStream(ds, "A", 6, cfg, seed=0, rank=0, shuffle_buffer=0)
    with pytest.raises(Exception, match="cannot read trainA/003.png"):
        for _ in range(6):
            stream.next_batch(1)
    with pytest.raises(Exception, match="cannot read trainA/003.png"):
        stream.next_batch(1)  # and again: the error stays
    stream.close()


def test_stream_without_preprocessing_keeps_each_image_size(ray_client, tmp_path, monkeypatch):
    """preprocess=none: batches of 1 carry each image at its own size; a batch that would mix
    sizes is refused with a message naming the setting."""
    import ray

    from pipeline.config import DataConfig
    from pipeline.data import DomainStream
    from pipeline.reading import domain_dataset
    from pipeline.shards import read_manifest

    entries = {}
    for name, sizes in {"trainA": [8, 12, 8, 12], "trainB": [8]}.items():
        with ShardWriter(str(tmp_path), name) as writer:
            for i, side in enumerate(sizes):
                buf = io.BytesIO()
                Image.new("RGB", (side, side), (i * 40, 0, 0)).save(buf, "PNG")
                writer.add(f"{name}/{i}.png", buf.getvalue(), side, side, "PNG")
        entries[name] = writer.close()
    write_manifest(str(tmp_path), build_manifest("test", entries))
    options = ray.data.DataContext.get_current().execution_options
    monkeypatch.setattr(options, "preserve_order", True)
    cfg = DataConfig(preprocess="none", shuffle_buffer=0, flip=False)
    ds = domain_dataset(read_manifest(str(tmp_path)), "A", cfg, seed=0)
    stream = DomainStream(ds, "A", 4, cfg, seed=0, rank=0, shuffle_buffer=0)
    sides = sorted(stream.next_batch(1)[1].shape[1] for _ in range(4))
    assert sides == [8, 8, 12, 12]
    with pytest.raises(ValueError, match="data.preprocess"):
        for _ in range(4):
            stream.next_batch(2)  # some pair mixes 8 px and 12 px
    stream.close()
