"""Small real SAEs for tests and benchmarks: saved in SAELens's layout, trained on the demo model's own activations.

No trained SAE can be downloaded here, so the tests train one: a TopK SAE on one layer's residual stream and a
transcoder of one MLP, each on a few thousand tokens of GCIDE (or the bundled texts where GCIDE is absent), in about
a minute on two CPU cores. Shapes: ``n_tokens d_model d_sae``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from neuronmap.core.errors import NeuronmapError
from neuronmap.runtime.models import Model, find_module
from neuronmap.sources.families import HookPoint

GCIDE = Path("/usr/share/dictd/gcide.dict.dz")
SAELENS_LAYOUT = "6.0.0"


def save_sae(out: Path | str, tensors: dict[str, torch.Tensor], architecture: str, hook: str,
             k: int | None = None, hook_out: str | None = None, model_name: str = "smollm2-135m") -> Path:
    """Write ``cfg.json`` + ``sae_weights.safetensors`` as SAELens 6 saves them, whole or not at all.

    Args:
        tensors: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``, ``b_enc``, ``b_dec`` (and ``threshold`` ...).
        architecture: SAELens's name (standard, topk, jumprelu, gated, transcoder, jumprelu_transcoder).
        hook, hook_out: TransformerLens hook names (``hook_out``: where a transcoder writes).
    """
    from safetensors.torch import save_file

    out = Path(out)
    d_in, d_sae = tensors["W_enc"].shape
    cfg = {"architecture": architecture, "d_in": int(d_in), "d_sae": int(d_sae), "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": architecture not in ("transcoder", "jumprelu_transcoder"),
           "normalize_activations": "none", "reshape_activations": "none",
           # sae_lens_version marks the SAELens 6 layout: without it SAELens reads the file as pre-6 and drops metadata.
           "metadata": {"model_name": model_name, "hook_name": hook, "hook_head_index": None, "prepend_bos": False,
                        "sae_lens_version": SAELENS_LAYOUT, "sae_lens_training_version": SAELENS_LAYOUT,
                        "trained_by": "neuronmap.testing.sae"}}
    if tensors["W_dec"].shape[1] != d_in or hook_out:
        cfg["d_out"] = int(tensors["W_dec"].shape[1])
    if hook_out:
        cfg["metadata"]["hook_name_out"] = hook_out
    if k is not None:
        cfg["k"] = int(k)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: t.detach().float().contiguous() for n, t in tensors.items()}, str(tmp / "sae_weights.safetensors"))
    (tmp / "cfg.json").write_text(json.dumps(cfg, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def corpus_tokens(tokenizer, n_tokens: int, context: int = 64) -> list[list[int]]:
    """Sequences of ``context`` token ids, ``n_tokens`` in all, from GCIDE (every 40th entry) or the bundled texts."""
    from neuronmap.evidence.corpus import open_corpus, sequences

    if GCIDE.is_file():
        corpus = open_corpus(GCIDE, every=40)
    else:
        corpus = open_corpus(Path(__file__).resolve().parents[1] / "data" / "reference.txt")
    out, total = [], 0
    for seq in sequences(corpus, tokenizer, context):
        if len(seq.token_ids) < 8:
            continue
        out.append(seq.token_ids)
        total += len(seq.token_ids)
        if total >= n_tokens:
            return out
    if total < 256:
        raise NeuronmapError(f"the training corpus gave {total} tokens, fewer than 256")
    return out


def activations(m: Model, points: list[HookPoint], seqs: list[list[int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The activations at each hook point, ``[n_tokens, d_model]`` fp32, and the token that follows each one.

    Position 0 of every sequence is left out: the first token's residual stream is tens of times larger than the
    rest (an attention sink) and would dominate a small SAE. The next token is -1 at a sequence's end.
    """
    got: list[list[torch.Tensor]] = [[] for _ in points]
    handles = []
    last = max(p.layer for p in points)

    def stop(module, args, output):  # the layers above and the LM head are not needed: stop the forward here
        raise _Stop
    for i, p in enumerate(points):
        mod = find_module(m.model, p.module)

        def hook(module, args, output, i=i, side=p.side):
            x = args[0] if side == "input" else (output[0] if isinstance(output, tuple) else output)
            got[i].append(x[0, 1:].detach().float().cpu())
        handles.append(mod.register_forward_hook(hook))
    handles.append(find_module(m.model, m.family.block.format(i=last)).register_forward_hook(stop))
    nexts = []
    try:
        with torch.inference_mode():
            for ids in seqs:
                try:
                    m.model(torch.tensor([ids], device=m.device))
                except _Stop:
                    pass
                nexts.append(torch.tensor(ids[2:] + [-1]))
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(g) for g in got], torch.cat(nexts)


class _Stop(Exception):
    pass


def build_test_saes(out: Path, layer: int = 20, n_tokens: int = 2048, d_sae: int = 2048, k: int = 16,
                    steps: int = 300, seed: int = 0) -> Path:
    """The tests' SAEs, trained once on the demo model into ``out``: ``topk`` (a TopK SAE on ``layer``'s residual
    stream), ``transcoder`` (a ReLU transcoder of ``layer``'s MLP with an L1 penalty, SAELens ``transcoder``), and
    ``acts.safetensors`` (the residual activations ``x [n_tokens, d_model]`` and each one's next token ``next``).
    Written beside ``out`` and renamed into place when complete.
    """
    from safetensors.torch import save_file

    from neuronmap.runtime.models import load_model

    if (out / "acts.safetensors").is_file():
        return out
    torch.manual_seed(seed)
    m = load_model(None)
    seqs = corpus_tokens(m.tokenizer, n_tokens)
    hooks = [f"blocks.{layer}.hook_resid_post", f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"]
    (x, xin, xout), nxt = activations(m, [m.family.hook_point(h, m.n_layers) for h in hooks], seqs)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_sae(tmp / "topk", train(x, x, d_sae, k, steps=steps, seed=seed), "topk", hooks[0], k=k)
    tc = train(xin, xout, d_sae, None, l1=3e-4, steps=steps, seed=seed, subtract_b_dec=False)  # ReLU, as SAELens's
    save_sae(tmp / "transcoder", tc, "transcoder", hooks[1], hook_out=hooks[2])
    save_file({"x": x.contiguous(), "next": nxt.to(torch.int64)}, str(tmp / "acts.safetensors"))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def train(x: torch.Tensor, y: torch.Tensor, d_sae: int, k: int | None, l1: float = 0.0, steps: int = 600,
          batch: int = 512, lr: float = 2e-3, seed: int = 0, subtract_b_dec: bool = True) -> dict[str, torch.Tensor]:
    """Train a TopK (``k``) or ReLU (``l1``) dictionary mapping ``x`` to ``y`` (an SAE where ``y is x``).

    Returns:
        SAELens tensors ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``, ``b_enc``, ``b_dec``, fp32.
    """
    g = torch.Generator().manual_seed(seed)
    d_in, d_out = x.shape[1], y.shape[1]
    W_dec = torch.randn(d_sae, d_out, generator=g)
    W_dec = (W_dec / W_dec.norm(dim=1, keepdim=True)).requires_grad_()
    W_enc = (W_dec.detach().T.clone() if d_in == d_out else torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5)
    W_enc.requires_grad_()
    b_enc = torch.zeros(d_sae, requires_grad=True)
    b_dec = y.mean(0).clone().requires_grad_()
    opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=lr)
    scale = y.var(0).sum()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        xb, yb = x[idx], y[idx]
        pre = (xb - b_dec if subtract_b_dec else xb) @ W_enc + b_enc  # [batch, d_sae]
        acts = topk(pre, k) if k else torch.relu(pre)
        loss = ((acts @ W_dec + b_dec - yb).pow(2).sum(-1).mean()) / scale
        if l1:
            loss = loss + l1 * (acts * W_dec.norm(dim=1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():  # unit decoder rows, as SAELens trains them
            W_dec /= W_dec.norm(dim=1, keepdim=True)
    return {"W_enc": W_enc.detach(), "W_dec": W_dec.detach(), "b_enc": b_enc.detach(), "b_dec": b_dec.detach()}


def topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """SAELens's TopK activation: the ``k`` largest pre-activations, through a ReLU, the rest zero."""
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
