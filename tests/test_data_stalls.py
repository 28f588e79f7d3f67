"""A run that could wait forever fails instead, naming the domain and the numbers: too few
images for the workers, a domain whose every image fails to decode, decoding that makes no
progress, and a cluster whose CPUs the training workers would all take."""

from __future__ import annotations

import time

import pytest

from pipeline import config as C
from tests.test_distributed import write_domains
from tests.test_train_cli import train_cli


def test_a_domain_with_fewer_images_than_workers_is_refused_before_anything_starts(tmp_path):
    from pipeline.plan import resolve

    root = write_domains(tmp_path / "data", {"trainA": 1, "trainB": 6})
    cfg = C.merge(C.tiny(), {"data": {"uri": root, "crop_size": 8, "load_size": 12},
                             "scaling": {"num_workers": 2},
                             "storage": {"uri": str(tmp_path / "runs")}})  # fmt: skip
    with pytest.raises(ValueError, match="trainA has 1 image.*fewer than the 2 training workers"):
        resolve(cfg)


@pytest.mark.integration
def test_a_domain_whose_every_image_fails_to_decode_is_an_error(ray_client, tmp_path):
    from pipeline.data import DomainStream
    from pipeline.reading import domain_dataset
    from pipeline.shards import read_manifest

    bad = [f"trainA/bad{i}.png" for i in range(4)]
    root = write_domains(tmp_path / "data", {"trainA": 0, "trainB": 3}, bad={"trainA": bad})
    cfg = C.DataConfig(load_size=12, crop_size=8, shuffle_buffer=0)
    ds = domain_dataset(read_manifest(root), "A", cfg, seed=0)
    stream = DomainStream(ds, "A", 4, cfg, seed=0, rank=0, shuffle_buffer=0)
    try:
        with pytest.raises(ValueError, match="domain A gave rank 0 no readable image"):
            stream.next_batch(1)
    finally:
        stream.close()


@pytest.mark.integration
def test_decoding_that_makes_no_progress_times_out_naming_the_domain(ray_client, tmp_path):
    from pipeline.data import DomainStream
    from pipeline.reading import domain_dataset
    from pipeline.shards import read_manifest

    root = write_domains(tmp_path / "data", {"trainA": 3, "trainB": 3})
    cfg = C.DataConfig(load_size=12, crop_size=8, shuffle_buffer=0)

    def stall(batch):
        time.sleep(30)  # a decode step that never delivers in time
        return batch

    ds = domain_dataset(read_manifest(root), "B", cfg, seed=0).map_batches(stall)
    stream = DomainStream(ds, "B", 3, cfg, seed=0, rank=0, shuffle_buffer=0, read_timeout_s=2)
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError, match="no image of domain B reached rank 0 for 2 s"):
            stream.next_batch(1)
    finally:
        stream.close(timeout=1)
    assert time.monotonic() - started < 25


@pytest.mark.integration
def test_workers_that_would_take_every_cpu_are_refused_with_the_fix(ray_head, scenes, tmp_path):
    # The shared head has 4 CPUs: one worker reserving all 4 leaves none for decoding.
    args = ["--preset", "tiny", "--data", scenes, "--max-steps", "4",
            "--set", "scaling.cpus_per_worker=4"]  # fmt: skip
    started = time.monotonic()
    res = train_cli(args, tmp_path, ray_head.env, timeout=180)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "leave 0 of the cluster's 4 CPUs for decoding images" in res.stderr
    assert "scaling.cpus_per_worker=3.5" in res.stderr
    assert time.monotonic() - started < 120
