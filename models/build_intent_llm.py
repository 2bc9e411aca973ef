"""Train the project's own tiny language model: smart-home commands → JSON intents.

Everything comes from this script: it generates the text (commands and the intents they
mean), builds a character-level SentencePiece-style vocabulary, trains a small
Llama-architecture transformer with PyTorch on the CPU, writes it as GGUF with the ``gguf``
package (tokenizer, chat template and all), and quantizes it (F32 → Q8_0) through llama.cpp's
quantize API. The result serves through ``/v1/chat/completions``; with the intent JSON
schema as ``response_format`` its answers are always schema-valid JSON.

    python models/build_intent_llm.py            # writes models/home-intent/
    python models/build_intent_llm.py --out DIR  # writes elsewhere
    python models/build_intent_llm.py --steps 50 # a quick smoke build (poor model)

Needs the ``train`` extra (``pip install -e '.[train,gguf]'``; torch is CPU-only here).
Seeded throughout; with the same torch version the weights are the same on every run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
NAME = "home-intent"
MODEL_VERSION = "1"
SEED = 20240611

# ------------------------------------------------------------------------------ the task

ROOMS = {
    "kitchen": ["kitchen"],
    "living_room": ["living room", "lounge"],
    "bedroom": ["bedroom"],
    "bathroom": ["bathroom"],
    "office": ["office", "study"],
    "garage": ["garage"],
    "hallway": ["hallway", "hall"],
    "garden": ["garden", "backyard"],
    "kids_room": ["kids room", "nursery"],
    "dining_room": ["dining room"],
}
INTENTS = ["turn_on", "turn_off", "set_brightness", "set_temperature", "set_volume",
           "open", "close", "lock", "unlock", "get_temperature", "get_state"]
DEVICES = ["light", "fan", "heater", "thermostat", "speaker", "tv", "blinds", "door",
           "window", "sensor", "plug"]

SCHEMA: dict[str, Any] = {
    "title": "Smart-home intent",
    "type": "object",
    "properties": {
        "intent": {"enum": INTENTS},
        "device": {"enum": DEVICES},
        "room": {"enum": list(ROOMS)},
        "value": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
    },
    "required": ["intent", "device", "room", "value"],
    "additionalProperties": False,
}

_SWITCHABLE = {"light": ["light", "lights", "lamp"], "fan": ["fan"], "heater": ["heater"],
               "tv": ["tv", "television"], "plug": ["plug", "socket"],
               "speaker": ["speaker", "music"]}
_PLEASE = ["", "please ", "could you ", "can you "]
_TAIL = ["", " please", " now"]


def _room(rng: random.Random) -> tuple[str, str]:
    room = rng.choice(list(ROOMS))
    return room, rng.choice(ROOMS[room])


def make_example(rng: random.Random) -> tuple[str, dict[str, Any]]:
    """One command and the intent it means."""
    room, said = _room(rng)
    kind = rng.randrange(9)
    value: int | None = None
    if kind <= 1:
        device = rng.choice(list(_SWITCHABLE))
        word = rng.choice(_SWITCHABLE[device])
        on = kind == 0
        verb = rng.choice(["turn on", "switch on"] if on else ["turn off", "switch off"])
        intent = "turn_on" if on else "turn_off"
        text = rng.choice([f"{verb} the {said} {word}", f"{verb} the {word} in the {said}"])
    elif kind == 2:
        device, value, intent = "light", rng.randrange(0, 101, 5), "set_brightness"
        word = rng.choice(["light", "lights", "lamp"])
        text = rng.choice([f"dim the {said} {word} to {value}%",
                           f"set the {word} in the {said} to {value} percent",
                           f"{said} {word} brightness {value}"])
    elif kind == 3:
        device, value, intent = rng.choice(["thermostat", "heater"]), rng.randrange(15, 29), \
            "set_temperature"
        text = rng.choice([f"set the {said} {device} to {value} degrees",
                           f"make the {said} {value} degrees",
                           f"heat the {said} to {value}"])
    elif kind == 4:
        device, value, intent = rng.choice(["speaker", "tv"]), rng.randrange(0, 101, 10), \
            "set_volume"
        text = rng.choice([f"set the {said} {device} volume to {value}",
                           f"{device} volume {value} in the {said}"])
    elif kind == 5:
        device = rng.choice(["blinds", "door", "window"])
        intent = rng.choice(["open", "close"])
        text = rng.choice([f"{intent} the {said} {device}", f"{intent} the {device} in the {said}"])
    elif kind == 6:
        device, intent = "door", rng.choice(["lock", "unlock"])
        text = rng.choice([f"{intent} the {said} door", f"{intent} the door to the {said}"])
    elif kind == 7:
        device, intent = rng.choice(["sensor", "thermostat"]), "get_temperature"
        text = rng.choice([f"what is the temperature in the {said}",
                           f"how warm is the {said}", f"{said} temperature"])
    else:
        device = rng.choice(list(_SWITCHABLE))
        word, intent = rng.choice(_SWITCHABLE[device]), "get_state"
        text = rng.choice([f"is the {said} {word} on", f"is the {word} in the {said} on"])
    text = rng.choice(_PLEASE) + text + rng.choice(_TAIL)
    if rng.random() < 0.3:
        text = text[0].upper() + text[1:]
    return text, {"intent": intent, "device": device, "room": room, "value": value}


def answer_text(intent: dict[str, Any]) -> str:
    # json.dumps' default separators (", " and ": ") are what the schema grammar allows.
    return json.dumps(intent)


# ------------------------------------------------------------------------- tokenizer

UNK, BOS, EOS, USER, ASSISTANT = 0, 1, 2, 3, 4
SPECIAL = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
SPACE = "▁"  # SentencePiece's visible space
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] | trim }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}"
    "{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class Vocab:
    """A character vocabulary in SentencePiece's form, with byte fallback for the rest.

    llama.cpp's SPM tokenizer splits text into characters and merges adjacent pieces that
    are in the vocabulary; with single characters only there is nothing to merge, so the
    simple encoder below tokenizes exactly as llama.cpp does.
    """

    tokens: list[str]
    types: list[int]
    index: dict[str, int]

    @classmethod
    def build(cls) -> Vocab:
        tokens = list(SPECIAL)
        types = [2, 3, 3, 3, 3]  # UNKNOWN, then CONTROL
        tokens += [f"<0x{b:02X}>" for b in range(256)]
        types += [6] * 256  # BYTE
        tokens += [SPACE] + [chr(c) for c in range(33, 127)]
        types += [1] * 95  # NORMAL
        return cls(tokens, types, {t: i for i, t in enumerate(tokens)})

    def encode(self, text: str) -> list[int]:
        out = []
        for ch in text.replace(" ", SPACE):
            if ch in self.index and self.types[self.index[ch]] == 1:
                out.append(self.index[ch])
            else:
                out += [self.index[f"<0x{b:02X}>"] for b in ch.encode("utf-8")]
        return out


# ---------------------------------------------------------------------------- model

@dataclass(frozen=True)
class Shape:
    vocab: int
    dim: int = 64
    layers: int = 3
    heads: int = 4
    ffn: int = 192
    context: int = 256
    eps: float = 1e-5
    rope_base: float = 10000.0


def build_model(shape: Shape) -> Any:
    import torch
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + shape.eps) * self.weight

    head = shape.dim // shape.heads
    inv = shape.rope_base ** (-torch.arange(0, head, 2, dtype=torch.float32) / head)
    angles = torch.arange(shape.context, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = angles.cos(), angles.sin()

    def rope(x: torch.Tensor) -> torch.Tensor:
        # llama.cpp's "normal" RoPE (LLAMA arch) rotates adjacent pairs (x0, x1), (x2, x3)...
        t = x.shape[2]
        pairs = x.reshape(*x.shape[:-1], head // 2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        c, s = cos[:t][None, None], sin[:t][None, None]
        return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn_norm = RMSNorm(shape.dim)
            self.q = nn.Linear(shape.dim, shape.dim, bias=False)
            self.k = nn.Linear(shape.dim, shape.dim, bias=False)
            self.v = nn.Linear(shape.dim, shape.dim, bias=False)
            self.o = nn.Linear(shape.dim, shape.dim, bias=False)
            self.ffn_norm = RMSNorm(shape.dim)
            self.gate = nn.Linear(shape.dim, shape.ffn, bias=False)
            self.up = nn.Linear(shape.dim, shape.ffn, bias=False)
            self.down = nn.Linear(shape.ffn, shape.dim, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, _ = x.shape
            h = self.attn_norm(x)

            def split(y: torch.Tensor) -> torch.Tensor:
                return y.view(b, t, shape.heads, head).transpose(1, 2)

            q, k, v = rope(split(self.q(h))), rope(split(self.k(h))), split(self.v(h))
            a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.o(a.transpose(1, 2).reshape(b, t, shape.dim))
            h = self.ffn_norm(x)
            return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(shape.vocab, shape.dim)
            self.blocks = nn.ModuleList(Block() for _ in range(shape.layers))
            self.norm = RMSNorm(shape.dim)
            self.out = nn.Linear(shape.dim, shape.vocab, bias=False)
            for p in self.parameters():
                if p.dim() == 2:
                    nn.init.normal_(p, std=0.02)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            x = self.embed(ids)
            for block in self.blocks:
                x = block(x)
            return self.out(self.norm(x))

    return Model()


def sequence(vocab: Vocab, command: str, intent: dict[str, Any]) -> tuple[list[int], int]:
    """Token ids of one chat turn as the chat template renders it; and where the answer starts."""
    prompt = [BOS, USER, *vocab.encode(command.strip()), ASSISTANT]
    return prompt + vocab.encode(answer_text(intent)) + [EOS], len(prompt)


def train(vocab: Vocab, shape: Shape, steps: int, log: Any) -> Any:
    import torch

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    rng = random.Random(SEED)
    model = build_model(shape)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.98))
    batch = 32
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(
            math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        seqs = [sequence(vocab, *make_example(rng)) for _ in range(batch)]
        width = max(len(s) for s, _ in seqs)
        ids = torch.zeros(batch, width, dtype=torch.long)
        target = torch.full((batch, width), -100, dtype=torch.long)
        for i, (s, start) in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            # Learn only the answer: the command is given, never predicted.
            target[i, start - 1 : len(s) - 1] = torch.tensor(s[start:])
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, shape.vocab), target.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step:5d}  loss {loss.item():.4f}  lr {lr:.2e}")
    return model


# ----------------------------------------------------------------------------- GGUF

def write_gguf(model: Any, vocab: Vocab, shape: Shape, path: Path) -> None:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(NAME)
    writer.add_description("Smart-home commands to JSON intents; trained by "
                           "models/build_intent_llm.py")
    writer.add_license("Apache-2.0")
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.dim)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.heads)
    writer.add_rope_dimension_count(shape.dim // shape.heads)
    writer.add_rope_freq_base(shape.rope_base)
    writer.add_layer_norm_rms_eps(shape.eps)
    writer.add_vocab_size(shape.vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores([0.0] * len(vocab.tokens))
    writer.add_token_types(vocab.types)
    writer.add_unk_token_id(UNK)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    def put(name: str, tensor: Any) -> None:
        writer.add_tensor(name, tensor.detach().numpy().astype(np.float32))

    put("token_embd.weight", model.embed.weight)
    for i, block in enumerate(model.blocks):
        put(f"blk.{i}.attn_norm.weight", block.attn_norm.weight)
        put(f"blk.{i}.attn_q.weight", block.q.weight)
        put(f"blk.{i}.attn_k.weight", block.k.weight)
        put(f"blk.{i}.attn_v.weight", block.v.weight)
        put(f"blk.{i}.attn_output.weight", block.o.weight)
        put(f"blk.{i}.ffn_norm.weight", block.ffn_norm.weight)
        put(f"blk.{i}.ffn_gate.weight", block.gate.weight)
        put(f"blk.{i}.ffn_up.weight", block.up.weight)
        put(f"blk.{i}.ffn_down.weight", block.down.weight)
    put("output_norm.weight", model.norm.weight)
    put("output.weight", model.out.weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ------------------------------------------------------------------------ evaluation

def evaluate(path: Path, count: int, seed: int) -> dict[str, float]:
    """Share of held-out commands the GGUF (through llama.cpp, schema-constrained) gets right."""
    from llama_cpp.llama_grammar import LlamaGrammar

    from appliance.runtimes.llama_open import open_llama

    llm = open_llama(cpu_repack=False, model_path=str(path), n_ctx=256, n_threads=2,
                     verbose=False, seed=0)
    grammar = LlamaGrammar.from_json_schema(json.dumps(SCHEMA), verbose=False)
    rng = random.Random(seed)
    exact = valid = 0
    for _ in range(count):
        command, intent = make_example(rng)
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": command}], grammar=grammar,
            temperature=0, max_tokens=200)
        text = out["choices"][0]["message"]["content"] or ""
        try:
            got = json.loads(text)
            valid += 1
        except ValueError:
            continue
        exact += got == intent
    llm.close()
    return {"json_valid": valid / count, "exact_match": exact / count}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    digest.update(path.read_bytes())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / NAME)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--retrain", action="store_true",
                        help="train even if weights of an earlier run are cached")
    parser.add_argument("--quant", default="q8_0", help="llama.cpp type of the committed file")
    parser.add_argument("--eval", type=int, default=100, help="held-out commands to check")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT.parent))
    from appliance.tools.quantize import quantize_gguf

    def log(msg: str) -> None:
        print(msg, flush=True)

    import torch

    vocab = Vocab.build()
    shape = Shape(vocab=len(vocab.tokens))
    # Trained weights are kept (outside the repository) so a failure after training, or a
    # re-run with other output options, does not train again; --retrain ignores them.
    cache = Path(tempfile.gettempdir()) / f"{NAME}-{MODEL_VERSION}-{args.steps}.pt"
    started = time.monotonic()
    if cache.is_file() and not args.retrain:
        model = build_model(shape)
        model.load_state_dict(torch.load(cache, weights_only=True))
        log(f"using the weights trained before ({cache})")
    else:
        model = train(vocab, shape, args.steps, log)
        torch.save(model.state_dict(), cache)
    trained_s = time.monotonic() - started
    params = sum(p.numel() for p in model.parameters())
    log(f"trained {params:,} parameters in {trained_s:.0f}s")

    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / f"{NAME}-{args.quant}.gguf"
    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / f"{NAME}-f32.gguf"
        write_gguf(model, vocab, shape, f32)
        report = quantize_gguf(f32, target, args.quant, eval_text=_eval_text(), threads=2,
                               cpu_repack=False)
        log(report.text())
        before = evaluate(f32, args.eval, SEED + 1) if args.eval else {}
    after = evaluate(target, args.eval, SEED + 1) if args.eval else {}
    log(f"held-out F32: {before}  {args.quant.upper()}: {after}")
    (args.out / "intent.schema.json").write_text(json.dumps(SCHEMA, indent=2) + "\n")
    manifest = (
        f'name = "{NAME}"\nruntime = "gguf"\nfile = "{target.name}"\n'
        f'version = "{MODEL_VERSION}"\nsha256 = "{sha256(target)}"\n'
        f'description = "Tiny Llama-architecture model turning smart-home commands into JSON '
        f'intents ({params // 1000}K parameters, {args.quant.upper()})"\n\n'
        "[options]\nthreads = 1\nn_ctx = 256\nembeddings = false\n"
        "# Four requests decode together in one batch; each slot's cache is only 256 tokens.\n"
        "parallel = 4\n"
        "# llama.cpp's repacked CPU layouts crash decoding this model's 64-wide Q8_0 rows\n"
        "# on AMX processors (llama-cpp-python 0.3.36).\n"
        "cpu_repack = false\n"
    )
    (args.out / "manifest.toml").write_text(manifest)
    log(f"wrote {target} ({target.stat().st_size:,} bytes) and its manifest")
    return 0


def _eval_text() -> str:
    """Held-out chat turns, rendered as the template does, for the perplexity report."""
    rng = random.Random(SEED + 2)
    turns = []
    for _ in range(40):
        command, intent = make_example(rng)
        turns.append(f"{command}\n{answer_text(intent)}")
    return "\n".join(turns)


if __name__ == "__main__":
    raise SystemExit(main())
