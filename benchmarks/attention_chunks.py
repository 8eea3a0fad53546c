"""Causal attention a chunk of queries at a time against the whole sequence at once, on CUDA.

Times forward + backward of SDPA for one Llama-3-8B layer's attention (32 query heads, 8 key/value
heads, head size 128, bf16, batch 1) over the whole sequence and in chunks of queries, each chunk
reading the keys up to its end, with the kernels each way can use; prints which kernel SDPA picks.

    python benchmarks/attention_chunks.py --seq 16384 --chunk 4096 --out results/attention-chunks.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right


def timed(fn, repeat: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--chunk", type=int, nargs="+", default=[4096, 2048])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    T, H, Hk, D = args.seq, args.heads, args.kv_heads, 128
    q = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, Hk, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    dout = torch.randn_like(q)
    rows = {}

    def step(attend):
        def run():
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            out = attend(qq, kk, vv)
            torch.autograd.backward(out, dout)
        return run

    def whole(qq, kk, vv):
        return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)

    def chunked(how, chunk):
        def attend(qq, kk, vv):
            outs = []
            for s0 in range(0, T, chunk):
                s1 = min(T, s0 + chunk)
                qc, kc, vc = qq[:, :, s0:s1], kk[:, :, :s1], vv[:, :, :s1]
                if s0 == 0:
                    outs.append(F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, enable_gqa=True))
                elif how == "causal_lower_right":
                    outs.append(F.scaled_dot_product_attention(qc, kc, vc, attn_mask=causal_lower_right(s1 - s0, s1),
                                                               enable_gqa=True))
                elif how == "flash_op":
                    outs.append(torch.ops.aten._scaled_dot_product_flash_attention(qc, kc, vc, 0.0, True, False,
                                                                                   scale=D**-0.5)[0])
                elif how == "repeat_kv+lower_right":
                    kr, vr = (t.repeat_interleave(H // Hk, dim=1) for t in (kc, vc))
                    outs.append(F.scaled_dot_product_attention(qc, kr, vr, attn_mask=causal_lower_right(s1 - s0, s1)))
            return torch.cat(outs, dim=2)
        return attend

    params = torch.backends.cuda.SDPAParams(q[:, :, :args.chunk[0]], k, v, None, 0.0, False, True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flash_ok = torch.backends.cuda.can_use_flash_attention(params, debug=True)
        efficient_ok = torch.backends.cuda.can_use_efficient_attention(params, debug=True)
    rows["lower_right_chunk_flash_ok"] = bool(flash_ok)
    rows["lower_right_chunk_efficient_ok"] = bool(efficient_ok)
    rows["why_not"] = [str(w.message)[:300] for w in caught]
    print(json.dumps(rows), flush=True)
    ref_out = whole(q, k, v)
    rows["whole_ms"] = timed(step(whole))
    print("whole", rows["whole_ms"], flush=True)
    for chunk in args.chunk:
        for how in ("causal_lower_right", "flash_op", "repeat_kv+lower_right"):
            key = f"{how}@{chunk}"
            try:
                out = chunked(how, chunk)(q, k, v)
                rows[f"{key}_max_diff"] = float((out - ref_out).abs().max())
                rows[f"{key}_ms"] = timed(step(chunked(how, chunk)))
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    try:
                        chunked(how, chunk)(q, k, v)
                        rows[f"{key}_flash_only"] = "ran"
                    except Exception as e:
                        rows[f"{key}_flash_only"] = f"{type(e).__name__}: {str(e)[:200]}"
            except Exception as e:
                rows[f"{key}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(key, {k2: v2 for k2, v2 in rows.items() if k2.startswith(key)}, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(seq=T, heads=H, kv_heads=Hk, torch=torch.__version__, device=torch.cuda.get_device_name(), **rows),
                      f, indent=1)


if __name__ == "__main__":
    main()
