"""Fingerprint torch's CPU kernels: one sha256 per operation, to find where two machines part.

    python -m bench.kernel_fingerprint --compare bench/fingerprints/*.json     # this machine against each kind
    python -m bench.kernel_fingerprint --out bench/fingerprints/<kind>-portable.json   # record a new kind
    python -m bench.kernel_fingerprint --native --out bench/fingerprints/<kind>-native.json

bench/fingerprints/ holds the kinds measured so far (the workplace's shared tool, kept here with its
outputs so the next machine kind is one command away).

The portable environment (the same variables the project's `compute.portable_kernels` sets) is
applied before torch loads unless --native is given; --threads sets torch's threads. Every
operation runs on inputs drawn from one seeded generator, so two machines that agree on the
generator's bytes and differ on an operation's differ in that operation's kernels.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys

PORTABLE = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def cpu_kind() -> str:
    vendor, flags, model = "?", set(), "?"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = cpuinfo.read().splitlines()
        for line in lines:
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "vendor_id":
                vendor = value.strip()
            elif key == "model name":
                model = value.strip()
            elif key == "flags":
                flags = set(value.split())
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "pre-AVX2"
    extra = [f for f in ("amx_tile", "avx512_bf16", "avx512_vnni") if f in flags]
    return f"{vendor} {isa} ({model}{'; ' + ' '.join(extra) if extra else ''})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--native", action="store_true", help="leave torch/MKL/oneDNN to pick kernels")
    parser.add_argument("--out", help="write the fingerprint here as JSON")
    parser.add_argument("--compare", nargs="+", help="fingerprint files to compare with this machine's")
    args = parser.parse_args()

    if not args.native:
        os.environ.update(PORTABLE)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(args.threads)

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    def digest(*tensors) -> str:
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    ops: dict[str, str] = {}

    def op(name, fn):
        out = fn()
        ops[name] = digest(*out) if isinstance(out, tuple) else digest(out)

    # inputs: the generator itself first
    ops["randn"] = digest(rand(1000))
    a64, b64 = rand(64, 64), rand(64, 64)
    a, b = rand(128, 384), rand(384, 1152)
    odd_a, odd_b = rand(33, 65), rand(65, 17)
    big_a, big_b = rand(512, 512), rand(512, 512)
    x = rand(8, 64, 256)
    w, bias = rand(768, 256), rand(768)
    q, k, v = rand(2, 4, 64, 32), rand(2, 4, 64, 32), rand(2, 4, 64, 32)
    logits, target = rand(256, 4096), torch.randint(0, 4096, (256,), generator=g)
    long_vec = rand(1_000_003)

    op("mm 64x64x64", lambda: a64 @ b64)
    op("mm 128x384x1152", lambda: a @ b)
    op("mm odd 33x65x17", lambda: odd_a @ odd_b)
    op("mm 512^3", lambda: big_a @ big_b)
    op("mm transposed", lambda: big_a.t() @ big_b)
    op("bmm", lambda: torch.bmm(x, x.transpose(1, 2)))
    op("linear+bias", lambda: F.linear(x, w, bias))
    op("addmm", lambda: torch.addmm(bias[:1152].repeat(2)[:1152], a, b))
    op("sum 1e6", lambda: long_vec.sum())
    op("mean dim", lambda: x.mean(dim=-1))
    op("cumsum", lambda: long_vec.cumsum(0))
    op("exp", lambda: long_vec.exp())
    op("log", lambda: long_vec.abs().add(1e-3).log())
    op("tanh", lambda: long_vec.tanh())
    op("sigmoid", lambda: long_vec.sigmoid())
    op("silu", lambda: F.silu(long_vec))
    op("gelu", lambda: F.gelu(long_vec))
    op("gelu tanh", lambda: F.gelu(long_vec, approximate="tanh"))
    op("rsqrt", lambda: long_vec.abs().add(1e-3).rsqrt())
    op("pow 0.5", lambda: long_vec.abs().pow(0.5))
    op("sin/cos", lambda: (long_vec.sin(), long_vec.cos()))
    op("softmax", lambda: logits.softmax(-1))
    op("log_softmax", lambda: logits.log_softmax(-1))
    op("cross_entropy", lambda: F.cross_entropy(logits, target))
    op("layer_norm", lambda: F.layer_norm(x, (256,)))
    op("rms norm (manual)", lambda: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    op("sdpa causal", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    op("sdpa math", lambda: torch.softmax((q @ k.transpose(-1, -2)) / 32**0.5, -1) @ v)

    def grads():
        xx = x.clone().requires_grad_(True)
        ww = w.clone().requires_grad_(True)
        loss = F.silu(F.linear(xx, ww, bias)).pow(2).mean()
        loss.backward()
        return xx.grad, ww.grad

    op("linear backward", grads)

    def embedding_grad():
        emb = torch.nn.Embedding(4096, 64)
        with torch.no_grad():
            emb.weight.copy_(rand(4096, 64))
        ids = torch.randint(0, 4096, (8, 128), generator=torch.Generator().manual_seed(1))
        emb(ids).pow(2).sum().backward()
        return emb.weight.grad

    op("embedding backward", embedding_grad)

    def adamw(**kw):
        p = torch.nn.Parameter(rand(256, 256))
        opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.1, **kw)
        for _ in range(3):
            p.grad = rand(256, 256)
            opt.step()
        return p.detach()

    op("adamw foreach", lambda: adamw(foreach=True))
    op("adamw for-loop", lambda: adamw(foreach=False))
    op("adamw fused", lambda: adamw(fused=True))

    def init():
        torch.manual_seed(0)
        lin = torch.nn.Linear(256, 256)
        t = torch.empty(256, 256)
        torch.nn.init.trunc_normal_(t, std=0.02)
        return lin.weight.detach(), t

    op("init (kaiming, trunc_normal)", init)

    def llama():
        try:
            from transformers import LlamaConfig, LlamaForCausalLM
        except ImportError:
            return torch.zeros(1)
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=344,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=128,
        )
        model = LlamaForCausalLM(cfg)
        ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(2))
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        return (out.logits, *grads)

    op("tiny llama forward+backward", llama)

    result = {
        "cpu": cpu_kind(),
        "mode": "native" if args.native else "portable",
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "mkl": torch.backends.mkl.is_available(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "ops": ops,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if not args.compare:
        json.dump(result, sys.stdout, indent=1)
        print()
        return
    for path in args.compare:
        with open(path) as handle:
            other = json.load(handle)
        print(f"this machine: {result['cpu']} [{result['mode']}, {result['threads']} threads, torch {result['torch']}]")
        print(f"{path}: {other['cpu']} [{other['mode']}, {other['threads']} threads, torch {other['torch']}]")
        differ = [name for name in ops if other["ops"].get(name) != ops[name]]
        for name in ops:
            print(f"  {'DIFFERS' if name in differ else 'same   '}  {name}")
        print(f"{len(differ)} of {len(ops)} operations differ" + (f"; first: {differ[0]}" if differ else ""))


if __name__ == "__main__":
    main()
