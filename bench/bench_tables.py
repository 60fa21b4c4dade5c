"""Turn the benchmark rows into markdown tables with ratios against the baselines measured in the same run."""
import os


def _index(rows, kind):
    return {(r["shape"], r.get("m"), r["impl"]): r for r in rows if r["kind"] == kind}


def nf4_linear_table(rows, copy_gbps):
    idx = _index(rows, "nf4_linear")
    lines = [
        "| out x in | M | lorax us | GB/s | % copy BW | staged GEMV us | staged GB/s | staged vs lorax | bf16 us | "
        "bnb us | vs bf16 | vs bnb | M / M=1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape, m in sorted({(s, m) for s, m, _ in idx}, key=lambda k: (k[0], k[1])):
        ours, bf16, bnb = idx.get((shape, m, "lorax")), idx.get((shape, m, "bf16")), idx.get((shape, m, "bnb"))
        staged = idx.get((shape, m, "lorax_staged"))  # the GEMV's shared-memory main loop (M <= 8)
        one = idx.get((shape, 1, "lorax"))
        if ours is None:
            continue
        cells = [shape, m, f"{ours['us']:.1f}", f"{ours['gbps']:.0f}",
                 f"{100 * ours['gbps'] / copy_gbps:.0f}%" if copy_gbps else "-",
                 f"{staged['us']:.1f}" if staged else "-", f"{staged['gbps']:.0f}" if staged else "-",
                 f"{ours['us'] / staged['us']:.2f}x" if staged else "-",
                 f"{bf16['us']:.1f}" if bf16 else "-",
                 f"{bnb['us']:.1f}{'' if bnb.get('mode') == 'graph' else ' (eager)'}" if bnb else "-",
                 f"{bf16['us'] / ours['us']:.2f}x" if bf16 else "-",
                 f"{bnb['us'] / ours['us']:.2f}x" if bnb else "-",
                 f"{ours['us'] / one['us']:.2f}" if one else "-"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def dequant_table(rows, copy_gbps):
    idx = _index(rows, "nf4_dequantize")
    lines = ["| out x in | lorax us | GB/s | % copy BW | bnb us | vs bnb |", "|---|---|---|---|---|---|"]
    for shape in sorted({s for s, _, _ in idx}):
        ours, bnb = idx.get((shape, None, "lorax")), idx.get((shape, None, "bnb"))
        if ours is None:
            continue
        cells = [shape, f"{ours['us']:.1f}", f"{ours['gbps']:.0f}",
                 f"{100 * ours['gbps'] / copy_gbps:.0f}%" if copy_gbps else "-",
                 f"{bnb['us']:.1f}" if bnb else "-", f"{bnb['us'] / ours['us']:.2f}x" if bnb else "-"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def lora_table(rows, kind, impls, gbps_label="paged GB/s", order=None):
    """Rows by case (sorted by `order`, default the case's name): each impl's time, the first's GB/s, and each
    other impl's time over the first's."""
    idx = {(r["shape"], r["impl"]): r for r in rows if r["kind"] == kind}
    head = " | ".join(f"{i} us" for i in impls)
    ratios = " | ".join(f"vs {i}" for i in impls[1:])
    lines = [f"| case | {head} | {gbps_label} | {ratios} |", "|---" * (2 + 2 * len(impls) - 1) + "|"]
    for shape in sorted({s for s, _ in idx}, key=order):
        ours = idx.get((shape, impls[0]))
        if ours is None:
            continue
        times = [idx.get((shape, i)) for i in impls]
        cells = [shape, *(f"{t['us']:.1f}" if t else "-" for t in times), f"{ours['gbps']:.0f}",
                 *(f"{t['us'] / ours['us']:.2f}x" if t else "-" for t in times[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_tables(rows, out, header):
    copy = [r for r in rows if r["kind"] == "copy"]
    copy_gbps = copy[0]["gbps"] if copy else None
    parts = [f"# Kernel benchmarks\n\n{header}\n",
             f"Copy bandwidth (device-to-device, read + write): {copy_gbps:.0f} GB/s\n" if copy_gbps else "",
             "## nf4_linear (GB/s = bytes of codes + absmax + activations read)\n", nf4_linear_table(rows, copy_gbps),
             "\n\n## nf4_dequantize to bf16 (GB/s = codes + absmax read + bf16 written)\n", dequant_table(rows, copy_gbps),
             "\n\n## LoRA decode (BGMV), 64 adapters in the pool (GB/s = distinct adapters' A + B bytes)\n",
             lora_table(rows, "lora_decode",
                        ["paged", "contiguous", "loop", "gather_bmm", "paged_pdl_off", "two_kernels"]),
             "\n\n## LoRA prefill (SGMV), 4 segments\n", lora_table(rows, "lora_prefill", ["paged", "contiguous", "loop"]),
             "\n\n## Batch-1 NF4 projections, rank-16 LoRA: fused kernels vs the separate ops (GB/s = NF4 weight)\n",
             lora_table(rows, "nf4_fused", ["fused", "fused, v from the norm", "fused, v from the norm, fp32 absmax",
                                            "separate"], "fused GB/s"),
             "\n\n## The norm before a projection, with its LoRA shrink, vs add_rms_norm + sgmv_shrink\n",
             lora_table(rows, "norm_shrink", ["fused", "separate"], "fused GB/s (A rows + x, residual, weight)"),
             "\n\n## gate | up with down's LoRA shrink in its epilogue vs the GEMV, then sgmv_shrink "
             "(GB/s = NF4 weight)\n",
             lora_table(rows, "mlp_shrink", ["one kernel", "GEMV, then shrink"], "one kernel GB/s"),
             "\n\n## Decode attention, Mistral-7B heads, bf16, a block table 8192 tokens wide (GB/s = K + V read)\n",
             lora_table(rows, "attention", ["lorax", "two_kernels", "pdl_off", "sdpa"], "lorax GB/s",
                        order=lambda s: tuple(int(p.lstrip("bctx")) for p in s.split("-"))),
             "\n"]
    text = "\n".join(p for p in parts if p)
    with open(os.path.join(out, "bench_kernels.md"), "w") as f:
        f.write(text)
    print("\n" + text)
