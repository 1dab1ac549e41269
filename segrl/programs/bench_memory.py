"""Peak memory of one policy-gradient forward/backward: chunked vs unchunked log-probs.

Each configuration runs in a fresh subprocess that loads the model, builds a ``B x L`` batch
(``--prompt`` context tokens, the rest scored), and computes a DAPO-style token-mean loss
``-(logp * adv).sum() / tokens`` with :func:`segrl.algos.logprobs.sequence_logprobs`, then
backward. Memory is the process's peak resident set size (``VmHWM``) measured from a reset
taken right after the model and the batch are in memory (``/proc/self/clear_refs``), i.e. the
extra memory the forward/backward needs on top of the weights; on CUDA it is
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. Each child also
reports the loss and the gradient norm, so the chunked and unchunked runs can be compared::

    python -m segrl.programs.bench_memory --model smollm2-135m --batch 64 --length 256 --chunks 0,16

(with a 49,152-token vocabulary one unchunked 64 x 256 batch holds 3.2 GB of fp32 logits, and
about as much again for the softmax in backward).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def child(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from ..algos.logprobs import sequence_logprobs
    from ..configs import ModelConfig
    from ..models.loading import load_model_and_tokenizer

    mc = ModelConfig(name_or_path=a.model, device=a.device, dtype=a.dtype, gradient_checkpointing=a.grad_ckpt)
    model, _ = load_model_and_tokenizer(mc)
    model.train()
    V = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, V, (a.batch, a.length), generator=g).to(mc.device)
    attn = torch.ones_like(ids)
    adv = torch.randn(a.batch, a.length - a.prompt, generator=g).to(mc.device)
    cuda = str(mc.device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        if not _reset_peak():
            raise SystemExit("cannot reset the peak RSS (/proc/self/clear_refs): Linux only")
        base = _rss_kb("VmRSS") * 1024
    t0 = time.perf_counter()
    logp, _ = sequence_logprobs(model, ids, attn, a.prompt, 1.0, a.chunk)
    loss = -(logp * adv).sum() / adv.numel()
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _rss_kb("VmHWM") * 1024
    gn = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "chunk": a.chunk,
        "grad_ckpt": a.grad_ckpt,
        "batch": a.batch,
        "length": a.length,
        "vocab": V,
        "params_bytes": params,
        "baseline_bytes": base,
        "peak_bytes": peak,
        "extra_peak_bytes": peak - base,
        "loss": float(loss),
        "grad_norm": float(gn),
        "seconds": round(time.perf_counter() - t0, 1),
        "full_logits_bytes": a.batch * (a.length - a.prompt) * V * 4,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=256, help="total tokens per row (prompt + scored)")
    ap.add_argument("--prompt", type=int, default=32, help="context tokens per row that are not scored")
    ap.add_argument("--chunks", default="0,16", help="comma-separated chunk sizes (0 = unchunked)")
    ap.add_argument("--grad-ckpt", type=int, default=1, help="activation checkpointing of the decoder layers (1/0)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    a = ap.parse_args(argv)
    a.grad_ckpt = bool(a.grad_ckpt)
    if a.chunk is not None:
        print("RESULT " + json.dumps(child(a)), flush=True)
        return None
    results = []
    for c in [int(x) for x in a.chunks.split(",")]:
        cmd = [sys.executable, "-m", "segrl.programs.bench_memory", "--chunk", str(c)] + [
            f"--{k}={v}" for k, v in (("model", a.model), ("batch", a.batch), ("length", a.length), ("prompt", a.prompt),
                                      ("grad-ckpt", int(a.grad_ckpt)), ("device", a.device), ("dtype", a.dtype), ("threads", a.threads))
        ]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")})
        line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            results.append({"chunk": c, "error": (p.stderr or p.stdout)[-2000:], "returncode": p.returncode})
            print(f"chunk={c}: failed (rc={p.returncode})\n{(p.stderr or '')[-2000:]}", flush=True)
            continue
        r = json.loads(line[-1][7:])
        results.append(r)
        gb = 1024**3
        print(
            f"chunk={c:<4} grad_ckpt={int(r['grad_ckpt'])} extra peak={r['extra_peak_bytes'] / gb:6.2f} GiB "
            f"(total {r['peak_bytes'] / gb:5.2f} GiB; weights {r['params_bytes'] / gb:4.2f} GiB; full logits would be "
            f"{r['full_logits_bytes'] / gb:4.2f} GiB) loss={r['loss']:.6f} grad_norm={r['grad_norm']:.6f} {r['seconds']}s",
            flush=True,
        )
    ok = [r for r in results if "loss" in r]
    if len(ok) > 1:
        l0, g0 = ok[0]["loss"], ok[0]["grad_norm"]
        print(f"max |loss - loss[chunk={ok[0]['chunk']}]| = {max(abs(r['loss'] - l0) for r in ok):.2e}; "
              f"max rel. grad-norm difference = {max(abs(r['grad_norm'] - g0) / max(g0, 1e-12) for r in ok):.2e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
