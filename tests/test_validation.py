"""Config values that must be refused with the field named: non-finite numbers, absurd sizes and
counts, and run names that are paths."""

from __future__ import annotations

import dataclasses
import math

import pytest

from cyclegan.config import AugmentConfig, LossConfig, ModelConfig, OptimConfig
from pipeline import config as C
from pipeline import overrides


def _float_fields() -> list[tuple[str, str]]:
    """(section, field) of every float field of the config tree."""
    out = []
    for section in dataclasses.fields(C.Config):
        if section.name == "preset":
            continue
        types = C._field_types(type(getattr(C.Config(), section.name)))
        out += [(section.name, name) for name, tp in types.items() if tp is float]
    return out


def test_every_float_field_is_found():
    found = set(_float_fields())
    assert {("model", "init_gain"), ("optim", "lr"), ("scaling", "placement_timeout_s")} <= found


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", float("nan"), math.inf])
@pytest.mark.parametrize(("section", "field"), _float_fields())
def test_non_finite_floats_are_refused_naming_the_field(section, field, value):
    with pytest.raises(ValueError, match=rf"{section}\.{field}"):
        C.merge(C.tiny(), {section: {field: value}})
    with pytest.raises(ValueError, match=rf"{section}\.{field}"):
        C.merge(C.tiny(), overrides.parse_override(f"{section}.{field}={value}"))


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: ModelConfig(init_gain=math.inf), "model.init_gain"),
        (lambda: LossConfig(lambda_A=math.inf), "loss.lambda_A"),
        (lambda: OptimConfig(lr=math.inf), "optim.lr"),
        (lambda: C.ScalingConfig(placement_timeout_s=math.nan), "scaling.placement_timeout_s"),
        (lambda: C.ScalingConfig(cpus_per_worker=math.inf), "scaling.cpus_per_worker"),
    ],
)
def test_non_finite_floats_are_refused_when_built_directly(build, field):
    with pytest.raises(ValueError, match=field):
        build()


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("data.load_size=1e6", "data.load_size"),
        ("data.crop_size=100000", "data.crop_size"),
        ("model.n_blocks=1e5", "model.n_blocks"),
        ("model.ngf=4096", "model.ngf"),
        ("model.ndf=100000", "model.ndf"),
        ("model.n_layers_D=1000", "model.n_layers_D"),
        ("model.input_nc=100000", "model.input_nc"),
        ("scaling.num_workers=100000", "scaling.num_workers"),
        ("scaling.placement_timeout_s=-1", "scaling.placement_timeout_s"),
        ("scaling.placement_timeout_s=1e12", "scaling.placement_timeout_s"),
        ("data.batch_size=1e9", "data.batch_size"),
        ("model.n_blocks=inf", "model.n_blocks"),
        ("data.load_size=nan", "data.load_size"),
    ],
)
def test_absurd_values_are_refused_naming_the_field(override, field):
    with pytest.raises(ValueError, match=field):
        C.merge(C.tiny(), overrides.parse_override(override))


def test_the_upper_bounds_themselves_are_accepted():
    AugmentConfig(load_size=8192, crop_size=8192)
    ModelConfig(ngf=1024, ndf=1024, n_blocks=64)
    C.ScalingConfig(num_workers=4096)
    C.merge(C.paper(), {"scaling": {"placement_timeout_s": "3600"}})


@pytest.mark.parametrize(
    "name",
    [
        "../../x",
        "..",
        ".",
        "a/b",
        "/abs",
        "a\\b",
        ".hidden",
        "run name",
        "x" * 129,
        "naïve",
        "a\nb",
    ],
)
def test_run_names_that_are_not_plain_names_are_refused(name):
    with pytest.raises(ValueError, match="storage.name"):
        C.merge(C.tiny(), {"storage": {"name": name}})
    with pytest.raises(ValueError, match="storage.name"):
        C.StorageConfig(name=name)


@pytest.mark.parametrize("name", ["", "RUN", "demo-20240101-120000-ab12", "a.b_c-9", "x" * 128])
def test_plain_run_names_are_accepted(name):
    assert C.merge(C.tiny(), {"storage": {"name": name}}).storage.name == name


def test_a_resumed_name_is_checked_too():
    import argparse

    from pipeline.flags import build_config

    args = argparse.Namespace(
        preset="tiny", config=None, set=[], epochs=None, resume="../../x", name=None
    )
    with pytest.raises(ValueError, match="storage.name"):
        build_config(args)


@pytest.mark.parametrize(
    "value", ["trainer", "trainer=0", "trainer=-1", "trainer=x", "=1", "CPU=1", "a b=1", "t=inf"]
)
def test_bad_worker_resources_are_refused_naming_the_field(value):
    with pytest.raises(ValueError, match=r"scaling\.worker_resources"):
        C.merge(C.tiny(), overrides.parse_override(f"scaling.worker_resources={value}"))


def test_worker_resources_parse_into_ray_resources():
    cfg = C.merge(
        C.tiny(), overrides.parse_override("scaling.worker_resources=trainer=1, big_mem=0.5")
    )
    assert cfg.scaling.extra_resources() == {"trainer": 1.0, "big_mem": 0.5}
    assert C.ScalingConfig().extra_resources() == {}
