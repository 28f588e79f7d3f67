"""The printed report of the scaling benchmark: counts, then the measured modes or the cloud
table. Reads only the result dict, so a JSON written earlier prints the same."""

from __future__ import annotations

SHARED_ABOVE = 0.15  # others' CPU share above which the report says the machine was shared
LABELS = {
    "single": "1 worker (single)",
    "concurrent": "2 at once, no comm",
    "allreduce": "all-reduce (gloo)",
    "ddp": "2-worker DDP step",
}
BASES = {
    "single": "predicted: 1-worker step + all-reduce",
    "concurrent": "predicted: 2-at-once compute + all-reduce",
}


def print_report(res: dict) -> None:
    counts, per_update = res["param_counts"], res["grad_bytes_per_update"]
    print("\nparameters: " + ", ".join(f"{n} {c:,}" for n, c in counts.items()), end="")
    print(f"; total {res['params_total']:,}")
    updates = ", ".join(
        f"{u} update {per_update[u] / 1e6:.2f} MB ({' + '.join(nets)}, "
        f"{len(res['bucket_sizes'][u])} buckets)"
        for u, nets in res["updates"].items()
    )
    print(
        f"all-reduced per step (fp32 gradients): {updates}; "
        f"{res['grad_bytes_per_step'] / 1e6:.2f} MB in all"
    )
    if "cloud" in res:
        _print_cloud(res)
    else:
        _print_measured(res)


def _print_measured(res: dict) -> None:
    ours = [size for sizes in res["bucket_sizes"].values() for size in sizes]
    theirs = [size for sizes in res["ddp_bucket_sizes"].values() for size in sizes or []]
    same = "the same" if ours == theirs else f"{theirs} (predicted {ours})"
    print(f"DDP's own buckets after its rebuild: {same}")
    s = res["summary"]
    print(f"\n{'':<22}{'ms/step median [min-max]':<28}{'CPU ms/step':>12}{'others CPU':>12}")
    for m, ms in s["ms"].items():
        spread = f"{ms['median']:.1f} [{ms['min']:.1f}-{ms['max']:.1f}]"
        print(
            f"{LABELS[m]:<22}{spread:<28}{s['cpu_ms'][m]['median']:>12.1f}"
            f"{100 * s['others_cpu_share'][m]['median']:>11.0f}%"
        )
    print(f"\n{'2-worker step':<44}{'ms':>16}{'efficiency':>16}")
    for basis, label in BASES.items():
        p = s["predicted"][basis]
        print(
            f"{label:<44}{p['no_overlap_ms']:>7.1f} - {p['full_overlap_ms']:<6.1f}"
            f"{100 * p['efficiency_no_overlap']:>8.0f}% - {100 * p['efficiency_full_overlap']:.0f}%"
        )
    print(f"{'measured: DDP':<44}{s['measured_ms']:>7.1f}{100 * s['measured_efficiency']:>18.0f}%")
    print(
        "predicted: no overlap (compute, then every all-reduce) - full overlap (the larger of the "
        "two); efficiency: the 1-worker step over the 2-worker one"
    )
    cpu = s["cpu_per_worker_step_ms"]
    print(
        f"CPU ms per worker and step (a core to itself): predicted {cpu['single']:.1f} from the "
        f"1-worker step, {cpu['concurrent']:.1f} from the 2-at-once compute; DDP "
        f"{cpu['measured']:.1f} measured"
    )
    shared = max(v["median"] for v in s["others_cpu_share"].values())
    note = (
        f"; up to {100 * shared:.0f}%: the machine was shared, so the wall times are slower and "
        "noisier than on an idle one"
        if shared > SHARED_ABOVE
        else ""
    )
    print(
        "others CPU: median share of the machine's CPU time other processes took while a mode "
        f"ran ({res['env_cpus']} CPUs here; the two workers can fill 2){note}"
    )


def _print_cloud(res: dict) -> None:
    cloud = res["cloud"]
    n_buckets = sum(len(b) for b in res["bucket_sizes"].values())
    compute = ", ".join(
        f"{n['gpu']} ({n['bf16_peak_tflops']:.0f} TFLOP/s) {n['curve'][0]['compute_ms']:.2f} ms"
        for n in cloud["nodes"]
    )
    print(
        f"{cloud['flops_per_step'] / 1e9:.1f} GFLOP per step; compute at "
        f"{100 * cloud['achieved_fraction']:.0f}% of dense bf16 peak: {compute}"
    )
    print(
        f"ring all-reduce: 2 (N-1)/N x {res['grad_bytes_per_step'] / 1e6:.1f} MB / bus bandwidth "
        f"+ {n_buckets} buckets x {1e6 * cloud['latency_intra_s']:.0f} us "
        f"({1e6 * cloud['latency_inter_s']:.0f} us across nodes)\n"
    )
    heads = [
        f"{n['instance']} ({n['intra_gb_per_s']:g} / {n['network_gb_per_s']:g} GB/s)"
        for n in cloud["nodes"]
    ]
    print("| GPUs | " + " | ".join(heads) + " |")
    print("|---" * (1 + len(heads)) + "|")
    per_node = cloud["gpus_per_node"]
    for i, row in enumerate(cloud["nodes"][0]["curve"]):
        gpus = row["gpus"]
        where = "1 node" if gpus <= per_node else f"{-(-gpus // per_node)} x {per_node}"
        cells = []
        for node in cloud["nodes"]:
            r = node["curve"][i]
            no, full = 100 * r["efficiency_no_overlap"], 100 * r["efficiency_full_overlap"]
            cells.append(
                f"{r['allreduce_ms']:.2f} ms, {no:.0f}%"
                + (f"-{full:.0f}%" if round(no) != round(full) else "")
            )
        print(f"| {gpus} ({where}) | " + " | ".join(cells) + " |")
    print(
        "cells: all-reduce time per step, weak-scaling efficiency with no overlap - with full "
        "overlap; bandwidths per direction: inside a node / the node's network"
    )
