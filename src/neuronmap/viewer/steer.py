"""The steering panel's jobs: ``clamp`` and ``generate`` on the atlas's own model, queued one at a time.

A request is checked in full before it is queued (the neuron, value, positions,
concept and message, with the CLI's messages), so a typo answers 400 at once
instead of failing after the model has loaded.
"""

from __future__ import annotations

import json
import re

from neuronmap.atlas.concepts import expand_concept, read_vocab, vocab_index
from neuronmap.intervene.effects import check_word, clamp
from neuronmap.intervene.generate import MAX_NEW_TOKENS, TEMPERATURE, generate
from neuronmap.core.errors import NeuronmapError
from neuronmap.core.ids import parse_neuron_id
from neuronmap.runtime.hooks import POSITIONS_DEFAULT, check_positions
from neuronmap.runtime.specs import check_values, parse_spec, parse_value
from neuronmap.atlas.scoring import check_weights
from neuronmap.atlas.search import check_concepts
from neuronmap.viewer.guard import MAX_DIGITS, shown
from neuronmap.viewer.jobs import JobQueue
from neuronmap.viewer.state import RequestError, Served

SAMPLES = 3  # per side: enough to see a shift, and the first result stays within seconds on a CPU
MAX_SAMPLES = 20
MAX_TEXT = 2000
MAX_ID = 24  # L{layer}N{index} with 9 digits each, and spaces
_DIGITS = re.compile(r"[0-9]+")


def _field(body: dict, key: str, default=None, kind: type = str):
    v = body.get(key, default)
    if v is None:
        raise RequestError(f"the request has no {key!r}: send it in the JSON body")
    if kind is bool:
        if not isinstance(v, bool):
            raise RequestError(f"{key!r} is {v!r}: expected true or false")
        return v
    if kind is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if not isinstance(v, str) or not _DIGITS.fullmatch(v.strip()):  # ASCII: "²".isdigit() holds, int("²") fails
            raise RequestError(f"{key!r} is {_shown(v)}: expected a whole number in digits 0-9")
        if len(v.strip()) > MAX_DIGITS:
            raise RequestError(f"{key!r} is {_shown(v)}: out of range, expected a whole number of at most {MAX_DIGITS} digits")
        return int(v)
    if not isinstance(v, str):
        raise RequestError(f"{key!r} is {_shown(v)}: expected a string")
    return v


def _shown(v: object) -> str:
    """A JSON value as the message shows it: short, whatever was sent."""
    return shown(v) if isinstance(v, str) else shown(json.dumps(v)[:1000]) if isinstance(v, (list, dict)) else shown(repr(v))


class SteerRunner:
    """Checks steering requests and runs them through one ``JobQueue``."""

    def __init__(self, served: Served, device: str = "auto", dtype: str = "auto"):
        self.served, self.device, self.dtype = served, device, dtype
        self.queue = JobQueue()

    def submit(self, body: object) -> dict:
        """Check a request and queue it; returns the job's status (``id``, ``state``, ``position``, ...).

        Body: ``{"atlas"?, "neuron", "value", "concept", "text", "chat"?, "positions"?, "n"?}``.

        Raises:
            RequestError: a missing or malformed field, with the CLI's message for a bad neuron, value or concept.
            NeuronmapError: the atlas's weights are missing or changed (steering runs the mapped model).
        """
        if not isinstance(body, dict):
            raise RequestError("the request body is not a JSON object: send {\"neuron\": ..., \"value\": ..., ...}")
        atlas = body.get("atlas")
        if atlas is not None and not isinstance(atlas, str):
            raise RequestError(f"'atlas' is {_shown(atlas)}: expected an atlas's name, a string")
        name, files = self.served.get(atlas)
        meta = files.meta
        neuron = _field(body, "neuron").strip()
        if len(neuron) > MAX_ID:  # int() refuses more than 4,300 digits with a ValueError, not a message
            raise RequestError(f"neuron id {shown(neuron)} is too long: expected L{{layer}}N{{index}}, e.g. L29N808")
        layer, idx = parse_neuron_id(neuron, int(meta["n_layers"]), int(meta["d_mlp"]))
        value = parse_value(_field(body, "value", "20x").strip())
        spec = parse_spec(f"L{layer}N{idx}={value}")
        check_values([spec], None)
        positions = _field(body, "positions", POSITIONS_DEFAULT)
        check_positions(positions)
        word = _field(body, "concept")
        check_word(word)
        check_concepts([word])
        expand_concept(word, vocab_index(read_vocab(files)))  # the model's strings are the atlas's: the CLI's message
        text = _field(body, "text", "What is your favourite animal?")
        if not text.strip() or len(text) > MAX_TEXT:
            raise RequestError(f"the message has {len(text.strip())} characters: expected 1 to {MAX_TEXT}")
        chat = _field(body, "chat", True, bool)
        n = _field(body, "n", SAMPLES, int)
        if not 1 <= n <= MAX_SAMPLES:
            raise RequestError(f"n {n} is out of range: expected 1 to {MAX_SAMPLES} samples per side")
        src = check_weights(files, fix="steering runs the mapped model, so its weights must be there")
        model = {}

        def load(_: dict) -> dict:
            from neuronmap.runtime.models import load_model, model_dtype

            model["m"] = m = load_model(src, self.device, self.dtype)
            return {"source": src.spec, "device": str(m.device), "dtype": model_dtype(self.dtype)}

        def run_clamp(_: dict) -> dict:
            return clamp(model["m"], [spec], word, None, None, positions).to_dict()

        def run_generate(_: dict) -> dict:
            return generate(model["m"], text, [spec], n, TEMPERATURE, 0, MAX_NEW_TOKENS, [word], positions, chat).to_dict()

        request = {"atlas": name, "neuron": spec.id, "value": str(value), "spec": str(spec), "positions": positions,
                   "concept": word, "text": text, "chat": chat, "n": n}
        job = self.queue.submit(request, [
            ("model", f"loading {src.spec}", load),
            ("clamp", f"clamp: P({word.strip()}) on the neutral prompts, baseline vs {spec}", run_clamp),
            ("generate", f"generate: {n} samples each side", run_generate),
        ])
        return self.queue.status(job.id)

    def status(self, job_id: str) -> dict:
        try:
            return self.queue.status(job_id)
        except NeuronmapError as e:
            raise RequestError(str(e), 404) from e
