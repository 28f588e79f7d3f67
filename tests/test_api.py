"""The Python API builds the same config as the commands' flags, and refuses unknown options
naming them."""

from __future__ import annotations

import pytest

from pipeline.api import config_namespace, evaluate
from pipeline.flags import load_config
from pipeline.train import build_parser


def test_keywords_build_the_config_the_flags_build():
    flags = build_parser().parse_args(["--preset", "tiny", "--max-steps", "7", "--num-workers",
                                       "2", "--set", "loss.lambda_cyc=5", "--set",
                                       "tracking.log_model=false", "--name", "r1"])  # fmt: skip
    keywords = config_namespace({"preset": "tiny", "max_steps": 7, "num_workers": 2,
                                 "set": {"loss.lambda_cyc": 5, "tracking.log_model": False},
                                 "name": "r1"})  # fmt: skip
    assert load_config(keywords) == load_config(flags)
    assert load_config(keywords).loss.lambda_B == 5.0


def test_unknown_options_are_refused_naming_them():
    with pytest.raises(TypeError, match="max_step"):
        config_namespace({"max_step": 3})
    with pytest.raises(TypeError, match="n_epochs"):
        evaluate("some-run", n_epochs=3)
    with pytest.raises(ValueError, match="loss.nope"):
        load_config(config_namespace({"set": ["loss.nope=1"]}))
