"""The weak-scaling benchmark: parameter and gradient-byte counts, DDP's bucket rule, the ring
all-reduce formula, the expected cloud curve, and one real 2-process run on the tiny preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from cyclegan.networks import build_discriminator, build_generator
from cyclegan.train_step import build_nets
from pipeline import config as C
from pipeline.bench import scaling as S
from tests.cli import run_module

REPO = Path(__file__).resolve().parents[1]


def state_dict_sizes(cfg: C.Config) -> dict[str, tuple[int, int]]:
    """(elements, bytes) of each net's state_dict, the nets built straight from cyclegan.networks."""
    m = cfg.model
    nets = {
        "G_A": build_generator(m),
        "G_B": build_generator(m.reversed()),
        "D_A": build_discriminator(m, m.output_nc),
        "D_B": build_discriminator(m, m.input_nc),
    }
    return {
        name: (
            sum(t.numel() for t in net.state_dict().values()),
            sum(t.numel() * t.element_size() for t in net.state_dict().values()),
        )
        for name, net in nets.items()
    }


@pytest.mark.parametrize("preset", ["tiny", "demo", "paper"])
def test_counts_equal_the_state_dict_sizes(preset):
    cfg = C.preset(preset)
    sizes = state_dict_sizes(cfg)
    counts = S.param_counts(cfg)
    assert counts == {name: n for name, (n, _) in sizes.items()}
    per_update = S.grad_bytes(counts)
    assert per_update["G"] == sizes["G_A"][1] + sizes["G_B"][1]
    assert per_update["D"] == sizes["D_A"][1] + sizes["D_B"][1]
    buckets = S.step_buckets(build_nets(cfg.model))
    assert {u: sum(b) for u, b in buckets.items()} == per_update


def test_paper_counts_are_the_published_cyclegan_sizes():
    counts = S.param_counts(C.paper())
    # ResNet-9 generator 11.378 M, 70x70 PatchGAN 2.765 M parameters.
    assert counts == {"G_A": 11_378_179, "G_B": 11_378_179, "D_A": 2_764_737, "D_B": 2_764_737}
    per_update = S.grad_bytes(counts)
    assert per_update == {"G": 4 * 2 * 11_378_179, "D": 4 * 2 * 2_764_737}
    assert sum(per_update.values()) == 113_143_328


def test_bucket_rule_on_simple_sizes():
    mib = 2**20
    assert S.bucket_sizes([600_000, 600_000, 10 * mib, 20 * mib, 5]) == [
        1_200_000,
        30 * mib,
        5,
    ]
    assert S.bucket_sizes([mib, 25 * mib, 1]) == [mib, 25 * mib, 1]  # a bucket closes at its cap
    assert S.bucket_sizes([]) == []
    assert S.FIRST_BUCKET_CAP_BYTES == dist._DEFAULT_FIRST_BUCKET_BYTES


@pytest.mark.parametrize("preset", ["demo", "paper"])
def test_buckets_match_torchs_own_assignment(preset):
    """The C++ assignment DDP runs when it rebuilds its buckets, on the same order and caps."""
    nets = build_nets(C.preset(preset).model)
    ours = S.step_buckets(nets)
    by_name = dict(nets.items())
    for update, names in S.UPDATES.items():
        theirs = []
        for name in names:
            params = [p.detach() for p in S.ready_order(by_name[name])]
            indices, _ = dist._compute_bucket_assignment_by_size(
                params, [S.FIRST_BUCKET_CAP_BYTES, S.BUCKET_CAP_BYTES]
            )
            theirs += [sum(params[i].numel() * 4 for i in bucket) for bucket in indices]
        assert ours[update] == theirs


def test_ready_order_covers_every_parameter_once():
    net = build_generator(C.demo().model)
    order = S.ready_order(net)
    assert sorted(map(id, order)) == sorted(id(p) for p in net.parameters())
    # The output conv's weight and bias come first: backward reaches them first.
    assert order[0] is net.model[-2].weight and order[1] is net.model[-2].bias


def test_ring_allreduce_closed_forms():
    assert S.ring_allreduce_s(1e9, 1, 1e9, latency_s=1.0) == 0.0  # one worker: no DDP
    assert S.ring_allreduce_s(1e9, 2, 1e9) == pytest.approx(1.0)  # 2 (1/2) B / bw = B / bw
    assert S.ring_allreduce_s(1e9, 4, 1e9) == pytest.approx(1.5)
    assert S.ring_allreduce_s(1e9, 4, 1e9, latency_s=0.25) == pytest.approx(1.75)
    assert S.ring_allreduce_s(8e9, 8, 2e9) == pytest.approx(7.0)
    assert S.ring_allreduce_s(1e9, 10_000, 1e9) == pytest.approx(2.0, rel=1e-3)  # tends to 2B/bw
    with pytest.raises(ValueError, match="workers"):
        S.ring_allreduce_s(1e9, 0, 1e9)


def test_predicted_step_and_efficiency():
    assert S.predicted_step_s(3.0, 1.0) == (4.0, 3.0)
    assert S.predicted_step_s(1.0, 3.0) == (4.0, 3.0)
    assert S.efficiency(3.0, 4.0) == 0.75


def test_cloud_curve_uses_the_network_past_one_node():
    peak = 989.0  # H100, pipeline/bench/common.py
    flops = peak * 1e12 * S.ACHIEVED_FRACTION * 0.010  # 10 ms of compute
    node = S.GpuNode("test", "H100", intra_gb_per_s=100.0, network_gb_per_s=10.0)
    rows = {r["gpus"]: r for r in S.cloud_curve(flops, 1e9, n_buckets=4, node=node)}
    assert [r["gpus"] for r in rows.values()] == list(S.CLOUD_GPUS)
    assert rows[1]["allreduce_ms"] == 0.0 and rows[1]["efficiency_no_overlap"] == 1.0
    assert rows[1]["compute_ms"] == pytest.approx(10.0)
    # 8 GPUs inside the node: 2 (7/8) 1 GB / 100 GB/s + 4 x 20 us = 17.5 + 0.08 ms.
    assert rows[8]["allreduce_ms"] == pytest.approx(17.5 + 4 * 1e3 * S.LATENCY_INTRA_S)
    # 16 GPUs on two nodes: the node's 10 GB/s network is the slowest link.
    assert rows[16]["bus_gb_per_s"] == 10.0
    ar16 = 2 * 15 / 16 * 1e9 / 10e9 * 1e3 + 4 * 1e3 * S.LATENCY_INTER_S
    assert rows[16]["allreduce_ms"] == pytest.approx(ar16)
    assert rows[16]["efficiency_no_overlap"] == pytest.approx(10.0 / (10.0 + ar16))
    assert rows[16]["efficiency_full_overlap"] == pytest.approx(10.0 / ar16)


def test_cloud_report_on_tiny(capsys):
    torch.manual_seed(0)
    res = S.run(S.build_parser().parse_args(["--preset", "tiny", "--cloud"]))
    cfg = C.tiny()
    flops = res["cloud"]["flops_per_step"]
    assert flops > 0
    assert res["grad_bytes_per_step"] == 4 * sum(n for n, _ in state_dict_sizes(cfg).values())
    assert [n["instance"] for n in res["cloud"]["nodes"]] == [
        "g5.48xlarge",
        "p4d.24xlarge",
        "p5.48xlarge",
    ]
    for node in res["cloud"]["nodes"]:
        peak = node["bf16_peak_tflops"] * 1e12 * S.ACHIEVED_FRACTION
        assert node["curve"][0]["compute_ms"] == pytest.approx(1e3 * flops / peak)
        effs = [r["efficiency_no_overlap"] for r in node["curve"]]
        assert effs[0] == 1.0 and all(0 < e <= 1 for e in effs)
        assert effs == sorted(effs, reverse=True)  # more workers never scale better
    S.print_report(res)
    out = capsys.readouterr().out
    assert "| 16 (2 x 8) |" in out and "p5.48xlarge (450 / 400 GB/s)" in out


def test_summarize_rounds_predicts_from_both_compute_bases():
    times = {"single": [1.0, 2.0, 1.0], "concurrent": [2.0] * 3, "allreduce": [0.5] * 3}
    times["ddp"] = [2.5, 3.0, 2.0]
    cpu = {"single": [0.8] * 3, "concurrent": [0.9] * 3, "allreduce": [0.1] * 3, "ddp": [1.1] * 3}
    s = S.summarize_rounds(times, cpu, {m: [0.0] * 3 for m in S.MODES})
    assert s["predicted"]["single"]["no_overlap_ms"] == 1500.0
    assert s["predicted"]["single"]["full_overlap_ms"] == 1000.0
    assert s["predicted"]["concurrent"]["no_overlap_ms"] == 2500.0
    assert s["predicted"]["concurrent"]["efficiency_no_overlap"] == pytest.approx(1.0 / 2.5)
    assert s["measured_ms"] == 2500.0 and s["measured_efficiency"] == pytest.approx(0.4)
    assert s["cpu_per_worker_step_ms"] == pytest.approx(
        {"single": 900.0, "concurrent": 1000.0, "measured": 1100.0}
    )


@pytest.mark.integration
def test_two_process_run_on_tiny(tmp_path):
    out = tmp_path / "scaling.json"
    res = run_module(
        "pipeline.bench.scaling", "--preset", "tiny", "--warmup", "1", "--rounds", "2",
        "--steps-per-round", "1", "--json", str(out), timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    assert data["param_counts"] == S.param_counts(C.tiny())
    # DDP's own buckets, read from the real wrappers after their rebuild, are the predicted ones.
    theirs = data["ddp_bucket_sizes"]
    assert theirs["G_A"] + theirs["G_B"] == data["bucket_sizes"]["G"]
    assert theirs["D_A"] + theirs["D_B"] == data["bucket_sizes"]["D"]
    for mode in S.MODES:
        assert len(data["times_s"][mode]) == 2 and all(t > 0 for t in data["times_s"][mode])
        assert all(0.0 <= x <= 1.0 for x in data["others_cpu_share"][mode])
    s = data["summary"]
    assert s["measured_efficiency"] == pytest.approx(s["ms"]["single"]["median"] / s["measured_ms"])
    assert "2-worker step" in res.stdout and "measured: DDP" in res.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rounds", "0"], "need at least 1"),
        (["--steps-per-round", "-1"], "need at least 1"),
        (["--cloud", "--rounds", "2"], "--cloud measures nothing"),
        (["--preset", "huge"], "invalid choice"),
    ],
)
def test_bad_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        S.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
