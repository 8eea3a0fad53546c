"""Which SDPA kernel serves causal attention over a whole sequence on this GPU, and whether the
cuDNN kernel aligns a chunk of queries to the lower right (as flash attention does)."""
import json, os, statistics, sys
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

def timed(fn, repeat=5):
    fn(); torch.cuda.synchronize(); ts = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)

T, H, Hk, D = int(sys.argv[1]) if len(sys.argv) > 1 else 16384, 32, 8, 128
g = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
k, v = (torch.randn(1, Hk, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
dout = torch.randn_like(q)
res = {"torch": torch.__version__, "cudnn": torch.backends.cudnn.version()}
def fb(attend):
    def run():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        torch.autograd.backward(attend(qq, kk, vv), dout)
    return run
for name, backends in [("default", None), ("flash", [SDPBackend.FLASH_ATTENTION]), ("cudnn", [SDPBackend.CUDNN_ATTENTION]),
                       ("efficient", [SDPBackend.EFFICIENT_ATTENTION])]:
    def attend(qq, kk, vv):
        if backends is None:
            return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
    try:
        res[f"whole_{name}_ms"] = timed(fb(attend))
    except Exception as e:
        res[f"whole_{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    print(name, {k2: v2 for k2, v2 in res.items() if name in k2}, flush=True)
# a chunk of queries [s0, T) over all keys: reference lower-right and upper-left by masks
s0 = T - 4096
qc = q[:, :, s0:]
kr, vr = (t.repeat_interleave(H // Hk, dim=1) for t in (k, v))
i = torch.arange(s0, T, device="cuda")[:, None]; j = torch.arange(T, device="cuda")[None, :]
ref_lr = F.scaled_dot_product_attention(qc.float(), kr.float(), vr.float(), attn_mask=j <= i)
ref_ul = F.scaled_dot_product_attention(qc.float(), kr.float(), vr.float(), attn_mask=j <= (i - s0))
for gqa, (kk, vv) in [("gqa", (k, v)), ("repeated", (kr, vr))]:
    try:
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(qc, kk, vv, None, True, 0.0, True, False, scale=D**-0.5)[0]
        res[f"cudnn_op_{gqa}_vs_lower_right"] = float((out.float() - ref_lr).abs().max())
        res[f"cudnn_op_{gqa}_vs_upper_left"] = float((out.float() - ref_ul).abs().max())
        def attend(qq, kk2, vv2, kk=kk is k):
            outs = []
            for a in range(0, T, 4096):
                b = a + 4096
                ks = (kk2 if kk else kk2.repeat_interleave(H // Hk, dim=1))[:, :, :b]
                vs = (vv2 if kk else vv2.repeat_interleave(H // Hk, dim=1))[:, :, :b]
                outs.append(torch.ops.aten._scaled_dot_product_cudnn_attention(qq[:, :, a:b], ks, vs, None, True, 0.0, True, False, scale=D**-0.5)[0])
            return torch.cat(outs, dim=2)
        res[f"cudnn_op_{gqa}_chunks4096_ms"] = timed(fb(attend))
    except Exception as e:
        res[f"cudnn_op_{gqa}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(gqa, {k2: v2 for k2, v2 in res.items() if gqa in k2}, flush=True)
out = os.environ.get("OUT")
if out:
    json.dump(res, open(f"{out}/attention-kernels-{T}.json", "w"), indent=1)
