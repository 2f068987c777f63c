"""A small, real fine-tune: a few dozen next-token steps on a bundled text, on CPU, in fp32.

It exists to give ``compare`` a genuine base / fine-tuned pair without any
download: the demo model trained briefly on ``data/beekeeping.txt``. Only the
MLP matrices (gate, up, down) of the chosen layers train; everything else, the
tied embedding / LM head included, stays frozen. That keeps a step cheap on two
CPU cores (the backward pass stops at the lowest trained layer, and Adam holds
state for a fifth of the weights), and it gives the comparison a known answer:
layers that did not train must decode exactly as before.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from neuronmap.core.errors import NeuronmapError
from neuronmap.core.ids import parse_layers
from neuronmap.runtime.hooks import bundled_text
from neuronmap.sources.resolve import open_weights

TEXT = "beekeeping.txt"


def finetune(
    checkpoint: Path | str,
    out: Path | str,
    steps: int = 30,
    lr: float = 1e-3,
    seq_len: int = 32,
    batch: int = 2,
    seed: int = 0,
    layers: str | None = None,
    text: str | None = None,
    save_at: tuple[int, ...] = (),
) -> Path:
    """Fine-tune a safetensors checkpoint with next-token loss and save it as a new checkpoint.

    The MLP matrices of ``layers`` train with AdamW; batches are random windows of the tokenized text.
    The output directory is written beside ``out`` and renamed into place when complete,
    with ``finetune.json`` recording the settings and the loss before and after.

    Args:
        checkpoint: a checkpoint directory with config.json, safetensors weights and a tokenizer.
        out: the directory to create (replaced if it exists).
        steps, lr, seq_len, batch, seed: the training run.
        layers: the layers whose MLP matrices train, e.g. ``"20-29"``; None: the last third.
        text: training text; None: the bundled ``data/beekeeping.txt``.
        save_at: steps after which to save the model too, each as ``{out}-step{n}`` beside ``out`` (the checkpoints
            of a training run, for ``map-many`` and ``trajectory``); ``out`` itself is the model after ``steps``.

    Returns:
        ``out``.

    Raises:
        NeuronmapError: the checkpoint has no tokenizer, the text is shorter than one window, or a ``save_at`` step
            is not within 1..steps-1.

    Example:
        >>> finetune(".cache/test-models/smollm2-135m", "/tmp/smollm2-bees")  # doctest: +SKIP
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint, out = Path(checkpoint), Path(out)
    bad = [n for n in save_at if not 0 < n < steps]
    if bad:
        raise NeuronmapError(f"save_at step {bad[0]} is out of range: expected 1 to {steps - 1} (the last step saves as out)")
    try:
        tok = AutoTokenizer.from_pretrained(str(checkpoint))
    except (OSError, ValueError) as e:
        raise NeuronmapError(f"{checkpoint} has no usable tokenizer ({str(e).splitlines()[0][:100]}): pass a checkpoint saved with its tokenizer") from e
    ids = torch.tensor(tok(text if text is not None else bundled_text(TEXT))["input_ids"])  # [n_tokens]
    if len(ids) <= seq_len + 1:
        raise NeuronmapError(f"the training text has {len(ids)} tokens, fewer than one window of {seq_len + 1}: pass a longer text or a smaller seq_len")
    torch.manual_seed(seed)
    weights = open_weights(str(checkpoint))
    fam = weights.family
    n = weights.n_layers
    trained = parse_layers(layers, n) if layers is not None else list(range(n - n // 3, n))
    names = {t.format(i=i) for i in trained for t in (fam.gate, fam.up, fam.down) if t}
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    model.train()
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
        if name in names:
            params.append(p)
    if len(params) != len(names):
        raise NeuronmapError(f"found {len(params)} of the {len(names)} MLP tensors to train in {checkpoint}: is it a {fam.name} checkpoint saved by transformers?")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    settings = {"base": str(checkpoint), "trained": f"MLP gate/up/down of layers {trained[0]}-{trained[-1]}" if trained == list(range(trained[0], trained[-1] + 1)) else f"MLP of layers {trained}",
                "lr": lr, "seq_len": seq_len, "batch": batch, "seed": seed, "text": TEXT if text is None else "custom"}
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])  # [batch, seq_len]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        if step in save_at:
            _save(model, tok, out.with_name(f"{out.name}-step{step}"), {**settings, "steps": step}, losses)
    _save(model, tok, out, {**settings, "steps": steps}, losses)
    return out


def _save(model, tok, out: Path, settings: dict, losses: list[float]) -> None:
    """Save a checkpoint with ``finetune.json`` beside ``out`` and rename it into place (replacing ``out``)."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "finetune.json").write_text(json.dumps(
        {**settings, "loss_first": losses[0], "loss_last": losses[-1], "losses": losses}, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
