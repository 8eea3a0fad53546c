"""Which SDPA kernel serves causal attention over a whole sequence on this GPU, and whether cuDNN's
kernel aligns a chunk of queries to the lower right of its keys (as flash attention does).

    python benchmarks/attention_kernels_probe.py 16384      # writes $OUT/attention-kernels-16384.json if $OUT is set

One Llama-3-8B layer's attention: 32 query heads, 8 key/value heads, head size 128, bf16, batch 1.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attention_chunks import timed  # benchmarks/ is on the path when a script there runs

HEADS, KV_HEADS, HEAD_DIM, CHUNK = 32, 8, 128, 4096
BACKENDS = {"default": None, "flash": [SDPBackend.FLASH_ATTENTION], "cudnn": [SDPBackend.CUDNN_ATTENTION],
            "efficient": [SDPBackend.EFFICIENT_ATTENTION]}


def cudnn_attention(q, k, v):
    """cuDNN's SDPA kernel with its causal mask (None: no additive bias; log-sum-exp kept for backward)."""
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False,
                                                             scale=HEAD_DIM**-0.5)[0]


def main(seq: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, HEADS, seq, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, KV_HEADS, seq, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    grad = torch.randn_like(q)
    result = {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "seq": seq}

    def forward_backward(attend):
        def run():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            torch.autograd.backward(attend(*leaves), grad)
        return run

    # the whole sequence, causal, through each backend SDPA has
    for name, backends in BACKENDS.items():
        def whole(qq, kk, vv, backends=backends):
            if backends is None:
                return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
        try:
            result[f"whole_{name}_ms"] = timed(forward_backward(whole))
        except RuntimeError as e:
            result[f"whole_{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    # the last chunk of queries over all keys, against both alignments computed with explicit masks
    first = seq - CHUNK
    positions = torch.arange(first, seq, device="cuda")[:, None]
    keys = torch.arange(seq, device="cuda")[None, :]
    k_all, v_all = (t.repeat_interleave(HEADS // KV_HEADS, dim=1).float() for t in (k, v))
    lower_right = F.scaled_dot_product_attention(q[:, :, first:].float(), k_all, v_all, attn_mask=keys <= positions)
    upper_left = F.scaled_dot_product_attention(q[:, :, first:].float(), k_all, v_all, attn_mask=keys <= positions - first)
    for heads, (kk, vv) in (("gqa", (k, v)), ("repeated", (k_all.bfloat16(), v_all.bfloat16()))):
        try:
            out = cudnn_attention(q[:, :, first:], kk, vv).float()
            result[f"cudnn_op_{heads}_vs_lower_right"] = float((out - lower_right).abs().max())
            result[f"cudnn_op_{heads}_vs_upper_left"] = float((out - upper_left).abs().max())
        except RuntimeError as e:
            result[f"cudnn_op_{heads}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return result


if __name__ == "__main__":
    result = main(int(sys.argv[1]) if len(sys.argv) > 1 else 16384)
    print(json.dumps(result, indent=1))
    if os.environ.get("OUT"):
        with open(f"{os.environ['OUT']}/attention-kernels-{result['seq']}.json", "w") as f:
            json.dump(result, f, indent=1)
