# PyTorch's time for the model building-block ops at the shapes of `hybrid-kernels bench`
# (groups norm, elementwise, embedding, cross_entropy, adamw), eager and torch.compile, for the
# side-by-side comparison. Runs on a GPU host with PyTorch and Triton; run it in the same call as
# the library's bench. Rows are keyed by the library's bench row (op, dtype, shape), so
#   python3 scripts/torch-ops-bench.py [GROUP ...] --ours bench.json
# prints each row's ratio (PyTorch time / library time: > 1 means the library is faster).
# Timing: triton.testing.do_bench (CUDA events, L2 flushed between runs, median).
import argparse, json, sys
import torch
import torch.nn.functional as F
import triton

dev = "cuda"
results = []  # (key, variant, us)


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1000.0


def record(op, dtype, shape, variant, fn):
    try:
        us = bench(fn)
    except Exception as e:  # a compile failure is reported, not hidden
        print(f"{op:40s} {dtype:5s} {shape:30s} {variant:14s} failed: {type(e).__name__}: {e}", flush=True)
        return
    results.append(((op, dtype, shape), variant, us))
    print(f"{op:40s} {dtype:5s} {shape:30s} {variant:14s} {us:10.1f} us", flush=True)


def compiled(fn):
    return torch.compile(fn, dynamic=False)


BF16, F32 = torch.bfloat16, torch.float32
NAME = {BF16: "bf16", F32: "f32"}


def norm_group():
    eps = 1e-5
    for dtype, d in [(BF16, 768), (BF16, 2048), (BF16, 4096), (F32, 2048)]:
        rows, shape = 16384, f"16384x{d}"
        x = torch.randn(rows, d, device=dev, dtype=dtype)
        dy = torch.randn_like(x)
        w = torch.rand(d, device=dev, dtype=dtype) + 0.5
        b = torch.randn(d, device=dev, dtype=dtype) * 0.1
        res = torch.randn(rows, d, device=dev, dtype=F32)
        dres = torch.randn_like(res)
        w32 = w.float()

        # mamba-ssm semantics: statistics in f32, output in x's type.
        def rms_ref(x, w):
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)

        def add_rms_ref(x, res, w):
            z = x.float() + res
            return (z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype), z

        rms_eager = lambda: F.rms_norm(x, (d,), w, eps)
        rms_comp = compiled(rms_ref)
        record("rms_norm forward", NAME[dtype], shape, "eager", rms_eager)
        record("rms_norm forward", NAME[dtype], shape, "compile", lambda: rms_comp(x, w32))
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        wg32 = w32.clone().requires_grad_(True)
        record("rms_norm fwd+bwd", NAME[dtype], shape, "eager",
               lambda: torch.autograd.grad(F.rms_norm(xg, (d,), wg, eps), (xg, wg), dy))
        record("rms_norm fwd+bwd", NAME[dtype], shape, "compile",
               lambda: torch.autograd.grad(rms_comp(xg, wg32), (xg, wg32), dy))

        ln_comp = compiled(lambda x, w, b: F.layer_norm(x, (d,), w, b, eps))
        record("layer_norm forward", NAME[dtype], shape, "eager", lambda: F.layer_norm(x, (d,), w, b, eps))
        record("layer_norm forward", NAME[dtype], shape, "compile", lambda: ln_comp(x, w, b))
        bg = b.clone().requires_grad_(True)
        record("layer_norm fwd+bwd", NAME[dtype], shape, "eager",
               lambda: torch.autograd.grad(F.layer_norm(xg, (d,), wg, bg, eps), (xg, wg, bg), dy))
        record("layer_norm fwd+bwd", NAME[dtype], shape, "compile",
               lambda: torch.autograd.grad(ln_comp(xg, wg, bg), (xg, wg, bg), dy))

        add_comp = compiled(add_rms_ref)
        record("add_rms_norm forward", NAME[dtype], shape, "eager", lambda: add_rms_ref(x, res, w32))
        record("add_rms_norm forward", NAME[dtype], shape, "compile", lambda: add_comp(x, res, w32))
        resg = res.clone().requires_grad_(True)

        def add_bwd(fn):
            y, z = fn(xg, resg, wg32)
            return torch.autograd.grad((y, z), (xg, resg, wg32), (dy, dres))

        record("add_rms_norm fwd+bwd", NAME[dtype], shape, "eager", lambda: add_bwd(add_rms_ref))
        record("add_rms_norm fwd+bwd", NAME[dtype], shape, "compile", lambda: add_bwd(add_comp))
        del x, dy, res, dres, xg, resg
        torch.cuda.empty_cache()


def elementwise_group():
    for width in (8192, 3072):
        n = 16384 * width
        shape = f"{n}"
        a = torch.randn(n, device=dev, dtype=BF16)
        b = torch.randn_like(a)
        c = torch.randn_like(a)
        acc = torch.randn(n, device=dev, dtype=F32)
        silu_c = compiled(F.silu)
        record("silu", "bf16", shape, "eager", lambda: F.silu(a))
        record("silu", "bf16", shape, "compile", lambda: silu_c(a))
        gelu_c = compiled(lambda x: F.gelu(x, approximate="tanh"))
        record("gelu_tanh", "bf16", shape, "eager", lambda: F.gelu(a, approximate="tanh"))
        record("gelu_tanh", "bf16", shape, "compile", lambda: gelu_c(a))
        record("gelu_tanh backward", "bf16", shape, "eager",
               lambda: torch.ops.aten.gelu_backward(b, a, approximate="tanh"))
        swiglu = lambda g, u: F.silu(g) * u
        swiglu_c = compiled(swiglu)
        record("gated silu", "bf16", shape, "eager", lambda: swiglu(a, b))
        record("gated silu", "bf16", shape, "compile", lambda: swiglu_c(a, b))
        ag, bg = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        record("gated silu backward", "bf16", shape, "eager (autograd)",
               lambda: torch.autograd.grad(swiglu(ag, bg), (ag, bg), c))
        record("gated silu backward", "bf16", shape, "compile",
               lambda: torch.autograd.grad(swiglu_c(ag, bg), (ag, bg), c))
        record("add_into f32", "bf16", shape, "eager", lambda: acc.add_(a))
        del a, b, c, acc, ag, bg
        torch.cuda.empty_cache()


def embedding_group():
    vocab = 50304
    for d in (768, 2048):
        shape = f"16384x{d} of {vocab}"
        table = torch.randn(vocab, d, device=dev, dtype=BF16)
        ids = torch.randint(0, vocab, (16384,), device=dev)
        dout = torch.randn(16384, d, device=dev, dtype=BF16)
        record("embedding forward", "bf16", shape, "eager", lambda: F.embedding(ids, table))
        # The weight gradient alone (what the library's backward computes), deterministic or not.
        record("embedding backward", "bf16", shape, "eager",
               lambda: torch.ops.aten.embedding_dense_backward(dout, ids, vocab, -1, False))


def cross_entropy_group():
    rows, vocab = 16384, 50304
    shape = f"{rows}x{vocab}"
    targets = torch.randint(0, vocab, (rows,), device=dev)
    for dtype, cap in [(BF16, None), (BF16, 30.0), (F32, None)]:
        logits = (torch.rand(rows, vocab, device=dev, dtype=dtype) * 8 - 4).requires_grad_(True)

        def loss_fn(x, t):
            if cap is not None:
                x = cap * torch.tanh(x / cap)
            return F.cross_entropy(x.float(), t)

        comp = compiled(loss_fn)
        suffix = " softcap" if cap else ""
        record(f"cross_entropy fused{suffix}", NAME[dtype], shape, "eager",
               lambda: torch.autograd.grad(loss_fn(logits, targets), (logits,)))
        record(f"cross_entropy fused{suffix}", NAME[dtype], shape, "compile",
               lambda: torch.autograd.grad(comp(logits, targets), (logits,)))
        if dtype == BF16 and cap is None:
            with torch.no_grad():
                record("cross_entropy eval", "bf16", shape, "eager", lambda: loss_fn(logits, targets))
                record("cross_entropy eval", "bf16", shape, "compile", lambda: comp(logits, targets))
        del logits
        torch.cuda.empty_cache()


def model_tensor_sizes(d, layers):
    sizes = [50304 * d, 1024 * d]
    for _ in range(layers):
        sizes += [d, d, 3 * d * d, 3 * d, d * d, d, d, d, 4 * d * d, 4 * d, 4 * d * d, d]
    return sizes + [d, d]


def adamw_group():
    for label, d, layers in [("GPT 125M", 768, 12), ("GPT 1.3B", 2048, 24)]:
        sizes = model_tensor_sizes(d, layers)
        n = sum(sizes)
        shape = f"{label}: {n / 1e6:.0f}M params in {len(sizes)} tensors"
        params = [torch.full((s,), 0.02, device=dev, requires_grad=True) for s in sizes]
        for p in params:
            p.grad = torch.full_like(p, 1e-3)
        copies = [torch.empty(s, device=dev, dtype=BF16) for s in sizes]
        decay = [p for p in params if p.numel() % 1024 == 0 and p.numel() > 50304]
        rest = [p for p in params if not (p.numel() % 1024 == 0 and p.numel() > 50304)]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
        grads = [p.grad for p in params]
        for variant, kwargs in [("fused", {"fused": True}), ("foreach", {"foreach": True})]:
            opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), **kwargs)

            def step():
                torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
                opt.step()
                with torch.no_grad():
                    torch._foreach_copy_(copies, params)
                torch._foreach_zero_(grads)

            record("adamw step (clip, bf16 copy, zero)", "f32", shape, f"eager {variant}", step)
            if variant == "fused" and label == "GPT 125M":
                cstep = torch.compile(step)
                record("adamw step (clip, bf16 copy, zero)", "f32", shape, "compile", cstep)
        del params, copies, grads, opt
        torch.cuda.empty_cache()


GROUPS = {"norm": norm_group, "elementwise": elementwise_group, "embedding": embedding_group,
          "cross_entropy": cross_entropy_group, "adamw": adamw_group}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("groups", nargs="*", default=list(GROUPS))
    ap.add_argument("--ours", help="`hybrid-kernels bench --json` output to compute ratios against")
    ap.add_argument("--json", help="write PyTorch's rows here")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"# PyTorch {torch.__version__}, Triton {triton.__version__}, {torch.cuda.get_device_name()}")
    for g in args.groups:
        print(f"== {g}", flush=True)
        GROUPS[g]()
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"op": k[0], "dtype": k[1], "shape": k[2], "variant": v, "us": us} for k, v, us in results], f)
    if args.ours:
        with open(args.ours) as f:
            ours = json.load(f)
        rows = ours["rows"] if isinstance(ours, dict) else ours
        mine = {(r["op"], r["dtype"], r["shape"]): r["median_us"] for r in rows}
        print("== ratios (PyTorch us / library us; > 1: the library is faster)")
        print(f"{'op':52s} {'dtype':5s} {'shape':32s} {'library us':>10s}  PyTorch variants")
        keys = []
        for k, _, _ in results:
            if k not in keys:
                keys.append(k)
        for k in keys:
            ours_us = mine.get(k)
            cells = []
            for kk, v, us in results:
                if kk == k:
                    cells.append(f"{v} {us:.1f} us" + (f" ({us / ours_us:.2f}x)" if ours_us else ""))
            shown = f"{ours_us:10.1f}" if ours_us else f"{'-':>10s}"
            print(f"{k[0]:52s} {k[1]:5s} {k[2]:32s} {shown}  " + "; ".join(cells))


if __name__ == "__main__":
    sys.exit(main())
