"""Feed-forward input projection + tanh-GELU: ``python -m bench.ops.bench_gemm_gelu``.

Times, at production sizes, ``gelu(linear(x, w, b), "tanh")`` unfused, torch.compile of it, the
``gelu_tanh`` pass's form (bias-free GEMM, then ``diffc.gelu_tanh`` adding the bias), and cuBLASLt's
GELU epilogue (``aten._addmm_activation(b, x, w.t(), use_gelu=True)``: bias and tanh-GELU applied to
the float32 accumulator inside the GEMM), each with its relative error against a float32 reference.
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F

from bench.ops import randn, require_cuda

# name: (tokens, in_features, out_features)
SHAPES = {
    "flux ff 4096tok 3072->12288": (4096, 3072, 12288),
    "flux single proj_mlp 4608tok 3072->12288": (4608, 3072, 12288),
    "wan-1.3b ffn 32760tok 1536->8960": (32760, 1536, 8960),
    "wan-14b ffn 32760tok 5120->13824": (32760, 5120, 13824),
}


def main() -> None:
    require_cuda()
    import triton

    from diffc.ops.gelu_tanh import gelu_tanh  # noqa: F401  (registers torch.ops.diffc.gelu_tanh)

    dev, dt = "cuda", torch.bfloat16
    print(f"# linear + gelu(tanh); {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}, python {platform.python_version()}; do_bench median ms")
    print(f"{'case':42s} {'unfused':>8s} {'compiled':>8s} {'pass':>8s} {'epilogue':>8s}  "
          f"{'err pass':>9s} {'err epi':>9s}")
    unfused = lambda x, w, b: F.gelu(F.linear(x, w, b), approximate="tanh")  # noqa: E731
    compiled = torch.compile(unfused, fullgraph=True)
    for name, (m, k, n) in SHAPES.items():
        x = randn(m, k, dtype=dt, device=dev, seed=1)
        w = randn(n, k, dtype=dt, device=dev, seed=2, scale=k**-0.5)
        b = randn(n, dtype=dt, device=dev, seed=3, scale=0.1)
        h = torch.empty(m, n, dtype=dt, device=dev)
        out = torch.empty(m, n, dtype=dt, device=dev)

        def via_pass():
            torch.mm(x, w.t(), out=h)
            torch.ops.diffc.gelu_tanh(h, b, out)
            return out

        def via_epilogue():
            return torch._addmm_activation(b, x, w.t(), use_gelu=True)

        ref = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate="tanh")
        err = lambda y: float((y.float() - ref).norm() / ref.norm())  # noqa: E731
        times = [triton.testing.do_bench(fn, warmup=25, rep=100)
                 for fn in (lambda: unfused(x, w, b), lambda: compiled(x, w, b), via_pass, via_epilogue)]
        print(f"{name:42s} " + " ".join(f"{t:8.3f}" for t in times) + f"  {err(via_pass()):9.2e} {err(via_epilogue()):9.2e}")


if __name__ == "__main__":
    main()
