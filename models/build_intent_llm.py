"""Train the project's own tiny language model: smart-home commands → tool calls and intents.

Everything comes from this script: it generates the text (commands, the Home Assistant
intent tool calls and the JSON intents they mean, tool results and the answers to them),
builds a character-level SentencePiece-style vocabulary, trains a small Llama-architecture
transformer with PyTorch, writes it as GGUF with the ``gguf`` package (tokenizer, chat
template and all), and quantizes it through llama.cpp's quantize API. The result serves
through ``/v1/chat/completions`` and ``/api/chat``: offered ``tools`` it answers with a call
of Home Assistant's intent tools (``HassTurnOn``, ``HassLightSet``, ...), otherwise with the
JSON intent of ``intent.schema.json``.

    python models/build_intent_llm.py            # writes models/home-intent/
    python models/build_intent_llm.py --out DIR  # writes elsewhere
    python models/build_intent_llm.py --steps 50 # a quick smoke build (poor model)
    python models/build_intent_llm.py --train-only --device cuda --weights W.pt
                                                 # train elsewhere; --weights W.pt later

Needs the ``train`` extra (``pip install -e '.[train,gguf]'``; torch is CPU-only here).
Seeded throughout; with the same torch version the weights are the same on every run.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
NAME = "home-intent"
MODEL_VERSION = "2"
SEED = 20240611
STEPS = 5000

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
INTENTS = [
    "turn_on",
    "turn_off",
    "set_brightness",
    "set_temperature",
    "set_volume",
    "open",
    "close",
    "lock",
    "unlock",
    "get_temperature",
    "get_state",
]
DEVICES = [
    "light",
    "fan",
    "heater",
    "thermostat",
    "speaker",
    "tv",
    "blinds",
    "door",
    "window",
    "sensor",
    "plug",
]

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

_SWITCHABLE = {
    "light": ["light", "lights", "lamp"],
    "fan": ["fan"],
    "heater": ["heater"],
    "tv": ["tv", "television"],
    "plug": ["plug", "socket"],
    "speaker": ["speaker", "music"],
}
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
        text = rng.choice(
            [
                f"dim the {said} {word} to {value}%",
                f"set the {word} in the {said} to {value} percent",
                f"{said} {word} brightness {value}",
            ]
        )
    elif kind == 3:
        device, value, intent = (
            rng.choice(["thermostat", "heater"]),
            rng.randrange(15, 29),
            "set_temperature",
        )
        text = rng.choice(
            [
                f"set the {said} {device} to {value} degrees",
                f"make the {said} {value} degrees",
                f"heat the {said} to {value}",
            ]
        )
    elif kind == 4:
        device, value, intent = (
            rng.choice(["speaker", "tv"]),
            rng.randrange(0, 101, 10),
            "set_volume",
        )
        text = rng.choice(
            [f"set the {said} {device} volume to {value}", f"{device} volume {value} in the {said}"]
        )
    elif kind == 5:
        device = rng.choice(["blinds", "door", "window"])
        intent = rng.choice(["open", "close"])
        text = rng.choice([f"{intent} the {said} {device}", f"{intent} the {device} in the {said}"])
    elif kind == 6:
        device, intent = "door", rng.choice(["lock", "unlock"])
        text = rng.choice([f"{intent} the {said} door", f"{intent} the door to the {said}"])
    elif kind == 7:
        device, intent = rng.choice(["sensor", "thermostat"]), "get_temperature"
        text = rng.choice(
            [
                f"what is the temperature in the {said}",
                f"how warm is the {said}",
                f"{said} temperature",
            ]
        )
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


# -------------------------------------------------------- Home Assistant's intent tools

# Area names people give rooms; arguments copy them as said (Home Assistant matches area
# names and aliases case-insensitively, so "lounge" only works where it is an alias).
AREAS = [
    "kitchen",
    "living room",
    "lounge",
    "bedroom",
    "master bedroom",
    "guest room",
    "bathroom",
    "office",
    "study",
    "garage",
    "hallway",
    "hall",
    "garden",
    "backyard",
    "kids room",
    "nursery",
    "dining room",
    "basement",
    "attic",
    "porch",
    "patio",
    "laundry room",
    "playroom",
    "den",
    "library",
    "entrance",
    "upstairs",
    "downstairs",
    "front yard",
    "workshop",
]
# Device words and the Home Assistant domain each means.
DOMAIN_WORDS = {
    "light": ["light", "lights", "lamp", "lamps"],
    "fan": ["fan", "fans"],
    "switch": ["switch", "plug", "socket"],
    "media_player": ["tv", "television", "speaker"],
    "cover": ["blinds", "shades", "curtains", "shutters"],
}
# First and second words of device names (never an area word, so "the X Y" is a name).
_NAME_FIRST = [
    "desk",
    "ceiling",
    "reading",
    "floor",
    "corner",
    "bedside",
    "christmas",
    "coffee",
    "window",
    "accent",
    "left",
    "right",
    "big",
    "small",
    "blue",
    "red",
    "wall",
    "table",
    "cabinet",
    "bookshelf",
    "sofa",
    "bed",
    "mirror",
    "tree",
    "counter",
    "pool",
    "fountain",
    "aquarium",
    "star",
    "moon",
    "kettle",
    "heater",
    "air",
    "water",
    "stair",
    "closet",
    "balcony",
    "shed",
    "driveway",
    "front",
    "back",
    "side",
    "gaming",
    "tv",
    "piano",
    "nightstand",
    "vanity",
    "oven",
]
_NAME_SECOND = {
    "light": ["lamp", "light", "lights", "strip", "bulb", "spotlight"],
    "fan": ["fan"],
    "switch": [
        "plug",
        "switch",
        "socket",
        "heater",
        "pump",
        "purifier",
        "maker",
        "machine",
        "kettle",
    ],
    "cover": ["blinds", "shade", "curtain"],
}
_SOLO_NAMES = [
    "christmas tree",
    "coffee maker",
    "kettle",
    "aquarium",
    "fountain",
    "dehumidifier",
    "air purifier",
    "washing machine",
    "dishwasher",
    "nightlight",
    "tv",
    "heater",
    "boiler",
    "router",
    "printer",
    "sprinkler",
    "pool pump",
]
_LOCKS = ["front door", "back door", "garage door", "side door", "gate", "patio door"]
_COLORS = [
    "red",
    "green",
    "blue",
    "white",
    "warm white",
    "yellow",
    "orange",
    "purple",
    "pink",
    "cyan",
]
_ON = ["turn on", "switch on", "put on"]
_OFF = ["turn off", "switch off", "shut off"]


def _string(*names: str) -> dict[str, Any]:
    return {name: {"type": "string"} for name in names}


_LIST = {"type": "array", "items": {"type": "string"}}
_TARGET = {**_string("name", "area", "floor"), "domain": _LIST, "device_class": _LIST}
_PERCENT = {"type": "integer", "minimum": 0, "maximum": 100}

# The parameters Home Assistant's Assist API gives these tools (converted from the intents'
# voluptuous slot schemas): the order matters, since the schema grammar keeps required
# properties first and the others in this order.
HA_TOOLS: dict[str, dict[str, Any]] = {
    "HassTurnOn": {"type": "object", "properties": _TARGET},
    "HassTurnOff": {"type": "object", "properties": _TARGET},
    "HassLightSet": {
        "type": "object",
        "properties": {
            **_string("name", "area", "floor"),
            "domain": _LIST,
            "color": {"type": "string"},
            "temperature": {"type": "integer", "minimum": 0},
            "brightness": _PERCENT,
        },
    },
    "HassClimateSetTemperature": {
        "type": "object",
        "properties": {"temperature": {"type": "number"}, **_string("area", "name", "floor")},
        "required": ["temperature"],
    },
    "HassSetVolume": {
        "type": "object",
        "properties": {**_TARGET, "volume_level": _PERCENT},
        "required": ["volume_level"],
    },
    "HassFanSetSpeed": {
        "type": "object",
        "properties": {**_string("name", "area", "floor"), "percentage": _PERCENT},
        "required": ["percentage"],
    },
    "HassMediaPause": {"type": "object", "properties": _TARGET},
    "HassMediaUnpause": {"type": "object", "properties": _TARGET},
    "HassMediaNext": {"type": "object", "properties": _TARGET},
    "HassMediaPrevious": {"type": "object", "properties": _TARGET},
}


def ordered(tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """Arguments in the order the schema grammar writes them: required first."""
    schema = HA_TOOLS[tool]
    keys = [k for k in schema["properties"] if k in schema.get("required", [])]
    keys += [k for k in schema["properties"] if k not in keys]
    assert set(arguments) <= set(keys), (tool, arguments)
    return {k: arguments[k] for k in keys if k in arguments}


def call_text(name: str, arguments: dict[str, Any]) -> str:
    """One call as the chat template renders it (and the tool-call grammar allows it)."""
    return f'<tool_call>{{"name": "{name}", "arguments": {json.dumps(arguments)}}}</tool_call>'


def _device_name(rng: random.Random) -> tuple[str, str | None]:
    """A device name and the domain its last word implies (None: say none)."""
    if rng.random() < 0.3:
        return rng.choice(_SOLO_NAMES), None
    domain = rng.choice(list(_NAME_SECOND))
    return f"{rng.choice(_NAME_FIRST)} {rng.choice(_NAME_SECOND[domain])}", domain


def _percent(rng: random.Random, value: int) -> str:
    return rng.choice([f"{value}%", f"{value} percent", f"{value}"])


def make_tool_example(rng: random.Random) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """One command and the intent tool calls it means."""
    area = rng.choice(AREAS)
    kind = rng.randrange(12)
    if kind <= 2:  # on/off by area and device kind
        on = rng.random() < 0.5
        verb = rng.choice(_ON if on else _OFF)
        domain = rng.choice(["light", "light", "light", "fan", "switch", "media_player"])
        word = rng.choice(DOMAIN_WORDS[domain])
        text = rng.choice(
            [
                f"{verb} the {area} {word}",
                f"{verb} the {word} in the {area}",
                f"{verb} all the {word} in the {area}",
            ]
        )
        return text, [("HassTurnOn" if on else "HassTurnOff", {"area": area, "domain": [domain]})]
    if kind <= 4:  # on/off by name
        on = rng.random() < 0.5
        name, domain = _device_name(rng)
        text = f"{rng.choice(_ON if on else _OFF)} the {name}"
        args: dict[str, Any] = {"name": name}
        if domain is not None:
            args["domain"] = [domain]
        return text, [("HassTurnOn" if on else "HassTurnOff", args)]
    if kind == 5:  # covers and locks: Home Assistant opens and locks with HassTurnOn
        if rng.random() < 0.5:
            opening = rng.random() < 0.5
            word = rng.choice(DOMAIN_WORDS["cover"])
            verb = "open" if opening else "close"
            text = rng.choice([f"{verb} the {area} {word}", f"{verb} the {word} in the {area}"])
            return text, [
                ("HassTurnOn" if opening else "HassTurnOff", {"area": area, "domain": ["cover"]})
            ]
        locking = rng.random() < 0.5
        door = rng.choice(_LOCKS)
        text = f"{'lock' if locking else 'unlock'} the {door}"
        return text, [
            ("HassTurnOn" if locking else "HassTurnOff", {"name": door, "domain": ["lock"]})
        ]
    if kind == 6:  # brightness and colour
        value = rng.randrange(0, 101, 5)
        by_name = rng.random() < 0.35
        name = f"{rng.choice(_NAME_FIRST)} {rng.choice(_NAME_SECOND['light'])}"
        word = rng.choice(["light", "lights", "lamp"])
        target = {"name": name} if by_name else {"area": area}
        thing = (
            f"the {name}"
            if by_name
            else rng.choice([f"the {area} {word}", f"the {word} in the {area}"])
        )
        if rng.random() < 0.7:
            text = rng.choice(
                [
                    f"dim {thing} to {_percent(rng, value)}",
                    f"set {thing} to {_percent(rng, value)}",
                    f"set {thing} brightness to {_percent(rng, value)}",
                    f"brighten {thing} to {_percent(rng, value)}",
                ]
            )
            return text, [("HassLightSet", {**target, "brightness": value})]
        color = rng.choice(_COLORS)
        text = rng.choice(
            [f"make {thing} {color}", f"turn {thing} {color}", f"set {thing} to {color}"]
        )
        return text, [("HassLightSet", {**target, "color": color})]
    if kind == 7:  # temperature
        degrees: float = rng.randrange(15, 29)
        if rng.random() < 0.2:
            degrees += 0.5
        said = f"{degrees:g}"
        if rng.random() < 0.25:
            text = rng.choice(
                [
                    f"set the thermostat to {said} degrees",
                    f"set the temperature to {said}",
                    f"make it {said} degrees",
                ]
            )
            return text, [("HassClimateSetTemperature", {"temperature": degrees})]
        text = rng.choice(
            [
                f"set the {area} to {said} degrees",
                f"set the {area} thermostat to {said}",
                f"heat the {area} to {said} degrees",
                f"set the temperature in the {area} to {said}",
            ]
        )
        return text, [("HassClimateSetTemperature", {"temperature": degrees, "area": area})]
    if kind == 8:  # volume
        value = rng.randrange(0, 101, 5)
        if rng.random() < 0.3:
            text = rng.choice([f"set the volume to {value}", f"volume {value}"])
            return text, [("HassSetVolume", {"volume_level": value})]
        word = rng.choice(["speaker", "tv", "music"])
        text = rng.choice(
            [
                f"set the {area} {word} volume to {_percent(rng, value)}",
                f"set the volume in the {area} to {_percent(rng, value)}",
                f"turn the {area} {word} to volume {value}",
            ]
        )
        return text, [("HassSetVolume", {"volume_level": value, "area": area})]
    if kind == 9:  # media
        tool, phrases = rng.choice(
            [
                ("HassMediaPause", ["pause the music", "pause the tv", "stop the music", "pause"]),
                (
                    "HassMediaUnpause",
                    ["resume the music", "play the music again", "unpause", "resume"],
                ),
                ("HassMediaNext", ["next song", "skip this song", "next track", "skip"]),
                ("HassMediaPrevious", ["previous song", "previous track", "go back a song"]),
            ]
        )
        text = rng.choice(phrases)
        if rng.random() < 0.4 and " " in text:
            return f"{text} in the {area}", [(tool, {"area": area})]
        return text, [(tool, {})]
    if kind == 10:  # fan speed
        value = rng.randrange(0, 101, 10)
        text = rng.choice(
            [
                f"set the {area} fan to {_percent(rng, value)}",
                f"set the fan speed in the {area} to {_percent(rng, value)}",
            ]
        )
        return text, [("HassFanSetSpeed", {"percentage": value, "area": area})]
    # two areas at once: parallel calls
    on = rng.random() < 0.5
    other = rng.choice([a for a in AREAS if a != area])
    word = rng.choice(["light", "lights"])
    verb = rng.choice(_ON if on else _OFF)
    text = rng.choice(
        [
            f"{verb} the {area} {word} and the {other} {word}",
            f"{verb} the {word} in the {area} and the {other}",
        ]
    )
    tool = "HassTurnOn" if on else "HassTurnOff"
    return text, [
        (tool, {"area": area, "domain": ["light"]}),
        (tool, {"area": other, "domain": ["light"]}),
    ]


# What a tool result is answered with: Home Assistant's results say "action_done" (or
# answer a query); failures carry an error.
DONE = "Done."
FAILED = "Sorry, that did not work."
NO_TOOL = "Sorry, I can only control devices."
_QUESTIONS = [
    "what is the weather like",
    "tell me a joke",
    "who are you",
    "what time is it",
    "how are you",
    "what can you do",
    "hello",
    "thank you",
    "what is the capital of france",
    "good morning",
]
TOOL_RESULT_CHARS = 160  # the chat template shows the model this much of a tool result


def tool_result(rng: random.Random, name: str, arguments: dict[str, Any]) -> tuple[str, str]:
    """A Home Assistant tool result for a call, and the answer to it."""
    target = arguments.get("name") or arguments.get("area") or "the device"
    kind = "entity" if "name" in arguments else "area"
    if rng.random() < 0.75:
        result: dict[str, Any] = {
            "speech": {},
            "response_type": "action_done",
            "data": {
                "targets": [],
                "success": [
                    {"name": str(target).title(), "type": kind, "id": str(target).replace(" ", "_")}
                ],
                "failed": [],
            },
        }
        answer = DONE
    else:
        error = rng.choice(
            ["MatchFailedError", "NoStatesMatchedError", "IntentHandleError", "HomeAssistantError"]
        )
        result = {
            "error": error,
            "error_text": rng.choice(
                [
                    f"No device named {target}",
                    f"No area named {target}",
                    "Service light.turn_on not found",
                    f"{name} failed",
                ]
            ),
        }
        answer = FAILED
    if rng.random() < 0.5:  # newer integrations wrap the result in data/error
        if "error" in result:
            result = {"data": None, "error": result}
        else:
            result = {"data": result, "error": None}
    return json.dumps(result), answer


def make_chat(rng: random.Random) -> tuple[list[dict[str, Any]], bool, str]:
    """One training conversation: messages, whether tools are offered, and the answer."""
    if rng.random() < 0.35:  # no tools: the JSON intent, as version 1 answered
        command, intent = make_example(rng)
        return [{"role": "user", "content": command}], False, answer_text(intent)
    roll = rng.random()
    if roll < 0.06:
        question = rng.choice(_QUESTIONS)
        if rng.random() < 0.3:
            question = question[0].upper() + question[1:] + "?"
        return [{"role": "user", "content": question}], True, NO_TOOL
    command, calls = make_tool_example(rng)
    command = rng.choice(_PLEASE) + command + rng.choice(_TAIL)
    if rng.random() < 0.3:
        command = command[0].upper() + command[1:]
    messages: list[dict[str, Any]] = [{"role": "user", "content": command}]
    answer = "".join(call_text(name, ordered(name, args)) for name, args in calls)
    if roll < 0.3:  # the round after Home Assistant ran the calls
        messages.append(
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"function": {"name": name, "arguments": ordered(name, args)}}
                    for name, args in calls
                ],
            }
        )
        answers = []
        for name, args in calls:
            content, said = tool_result(rng, name, args)
            messages.append({"role": "tool", "content": content})
            answers.append(said)
        answer = FAILED if FAILED in answers else DONE
    return messages, True, answer


# ------------------------------------------------------------------------- tokenizer

UNK, BOS, EOS, USER, ASSISTANT = 0, 1, 2, 3, 4
SPECIAL = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
# User-defined tokens (llama.cpp splits them out of any text and prints them as text, so the
# tool-call parser sees them): tools offered, a tool result, and a call's delimiters.
TOOLS_MARK, TOOL_RESULT, CALL_OPEN, CALL_CLOSE = (
    "<|tools|>",
    "<|tool|>",
    "<tool_call>",
    "</tool_call>",
)
USER_DEFINED = [TOOLS_MARK, TOOL_RESULT, CALL_OPEN, CALL_CLOSE]
SPACE = "▁"  # SentencePiece's visible space
# Only the conversation from the last user message on is shown: earlier rounds (Home
# Assistant sends up to twenty) would not fit this model's context, and it needs none of
# them. System messages and the tools' descriptions are left out for the same reason; the
# model knows Home Assistant's intent tools by name, and the schema grammar keeps each
# call to the tools actually offered.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|tools|>{% endif %}"
    "{% set ns = namespace(start=0) %}"
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% set ns.start = loop.index0 %}{% endif %}{% endfor %}"
    "{% for message in messages[ns.start:] %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] | trim }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] or '' }}"
    "{% for call in message['tool_calls'] or [] %}"
    '<tool_call>{"name": "{{ call[\'function\'][\'name\'] }}", "arguments": '
    "{{ call['function']['arguments'] | tojson }}}</tool_call>{% endfor %}{{ eos_token }}"
    "{% elif message['role'] == 'tool' %}<|tool|>"
    "{{ (message['content'] or '')[:160] }}{% endif %}{% endfor %}"
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
        tokens = list(SPECIAL) + list(USER_DEFINED)
        types = [2, 3, 3, 3, 3] + [4] * len(USER_DEFINED)  # UNKNOWN, CONTROL, USER_DEFINED
        tokens += [f"<0x{b:02X}>" for b in range(256)]
        types += [6] * 256  # BYTE
        tokens += [SPACE] + [chr(c) for c in range(33, 127)]
        types += [1] * 95  # NORMAL
        return cls(tokens, types, {t: i for i, t in enumerate(tokens)})

    def encode(self, text: str) -> list[int]:
        # llama.cpp splits user-defined tokens out of the text first, then runs SPM.
        out: list[int] = []
        pattern = "(" + "|".join(re.escape(t) for t in USER_DEFINED) + ")"
        for part in re.split(pattern, text):
            if part in USER_DEFINED:
                out.append(self.index[part])
            elif part:
                out += self._encode_plain(part)
        return out

    def _encode_plain(self, text: str) -> list[int]:
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
    dim: int = 128
    layers: int = 4
    heads: int = 4
    ffn: int = 384
    context: int = 768
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
        c, s = cos[:t][None, None].to(x.device), sin[:t][None, None].to(x.device)
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


@functools.cache
def _template() -> Any:
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x: json.dumps(x, ensure_ascii=False)
    return env.from_string(CHAT_TEMPLATE)


def render(messages: list[dict[str, Any]], tools: bool) -> str:
    """The prompt as llama-cpp-python's Jinja formatter renders the chat template."""
    offered = (
        [
            {"type": "function", "function": {"name": n, "parameters": p}}
            for n, p in HA_TOOLS.items()
        ]
        if tools
        else None
    )
    return _template().render(
        messages=messages,
        tools=offered,
        bos_token=SPECIAL[BOS],
        eos_token=SPECIAL[EOS],
        add_generation_prompt=True,
    )


def encode_prompt(vocab: Vocab, text: str) -> list[int]:
    """Token ids of a rendered prompt, control tokens parsed (as the runtime does)."""
    pattern = "(" + "|".join(re.escape(t) for t in SPECIAL[1:]) + ")"
    out: list[int] = []
    for part in re.split(pattern, text):
        if part in SPECIAL:
            out.append(vocab.index[part])
        elif part:
            out += vocab.encode(part)
    return out


def sequence(
    vocab: Vocab, messages: list[dict[str, Any]], tools: bool, answer: str
) -> tuple[list[int], int]:
    """Token ids of one conversation as the chat template renders it, then the answer; and
    where the answer starts."""
    prompt = encode_prompt(vocab, render(messages, tools))
    return prompt + vocab.encode(answer) + [EOS], len(prompt)


def train(vocab: Vocab, shape: Shape, steps: int, log: Any, device: str = "cpu") -> Any:
    import torch

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    rng = random.Random(SEED)
    model = build_model(shape).to(device)
    peak = 2e-3
    opt = torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=0.01, betas=(0.9, 0.98))
    batch = 64
    for step in range(steps):
        lr = (
            peak
            * min(1.0, (step + 1) / 200)
            * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        )
        for group in opt.param_groups:
            group["lr"] = lr
        seqs = [sequence(vocab, *make_chat(rng)) for _ in range(batch)]
        width = min(max(len(s) for s, _ in seqs), shape.context)
        ids = torch.zeros(batch, width, dtype=torch.long)
        target = torch.full((batch, width), -100, dtype=torch.long)
        for i, (s, start) in enumerate(seqs):
            s = s[:width]
            ids[i, : len(s)] = torch.tensor(s)
            # Learn only the answer: the conversation is given, never predicted.
            target[i, start - 1 : len(s) - 1] = torch.tensor(s[start:])
        logits = model(ids.to(device))
        loss = torch.nn.functional.cross_entropy(
            logits.view(-1, shape.vocab), target.to(device).view(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"step {step:5d}  loss {loss.item():.4f}  lr {lr:.2e}")
    return model.cpu()


# ----------------------------------------------------------------------------- GGUF


def write_gguf(weights: dict[str, Any], vocab: Vocab, shape: Shape, path: Path) -> None:
    """Write the trained weights (numpy arrays by state-dict name) as a llama GGUF."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(NAME)
    writer.add_description(
        "Smart-home commands to Home Assistant intent tool calls and "
        "JSON intents; trained by models/build_intent_llm.py"
    )
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

    def put(name: str, key: str) -> None:
        writer.add_tensor(name, np.asarray(weights[key], dtype=np.float32))

    put("token_embd.weight", "embed.weight")
    for i in range(shape.layers):
        for ours, theirs in (
            ("attn_norm", "attn_norm"),
            ("q", "attn_q"),
            ("k", "attn_k"),
            ("v", "attn_v"),
            ("o", "attn_output"),
            ("ffn_norm", "ffn_norm"),
            ("gate", "ffn_gate"),
            ("up", "ffn_up"),
            ("down", "ffn_down"),
        ):
            put(f"blk.{i}.{theirs}.weight", f"blocks.{i}.{ours}.weight")
    put("output_norm.weight", "norm.weight")
    put("output.weight", "out.weight")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ------------------------------------------------------------------------ evaluation


def evaluate(path: Path, count: int, seed: int) -> dict[str, float]:
    """Share of held-out commands the GGUF (through llama.cpp, schema-constrained) gets right
    as JSON intents, with no tools offered."""
    from llama_cpp.llama_grammar import LlamaGrammar

    from appliance.runtimes.llama_open import open_llama

    llm = open_llama(
        cpu_repack=False, model_path=str(path), n_ctx=256, n_threads=2, verbose=False, seed=0
    )
    grammar = LlamaGrammar.from_json_schema(json.dumps(SCHEMA), verbose=False)
    rng = random.Random(seed)
    exact = valid = 0
    for _ in range(count):
        command, intent = make_example(rng)
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": command}],
            grammar=grammar,
            temperature=0,
            max_tokens=200,
        )
        text = out["choices"][0]["message"]["content"] or ""
        try:
            got = json.loads(text)
            valid += 1
        except ValueError:
            continue
        exact += got == intent
    llm.close()
    return {"json_valid": valid / count, "exact_match": exact / count}


def evaluate_tools(path: Path, count: int, seed: int) -> dict[str, float]:
    """Held-out commands through the appliance's own GGUF runtime and tool-call parser, with
    Home Assistant's intent tools offered (``tool_choice: auto``, greedy): the share with a
    call of the right tool, and with the right tool and exactly the right arguments; and the
    share of follow-up rounds (a tool result given) answered right."""
    import asyncio

    from appliance.core.toolcalls import with_tool_calls
    from appliance.core.tools import tool_calls_of, tool_use
    from appliance.core.types import ChatMessage, GenerateRequest, SamplingParams
    from appliance.runtimes.gguf import GgufOptions, GgufRuntime

    use = tool_use(
        [
            {"type": "function", "function": {"name": n, "parameters": p}}
            for n, p in HA_TOOLS.items()
        ]
    )
    assert use is not None
    runtime = GgufRuntime(
        NAME, path, GgufOptions(threads=2, n_ctx=Shape.context, cpu_repack=False), 1
    )
    runtime.load_blocking()

    async def answer(messages: list[dict[str, Any]]) -> tuple[str, list[Any]]:
        turns = tuple(
            ChatMessage(
                role=m["role"],
                content=m["content"],
                tool_calls=tool_calls_of(m.get("tool_calls"), "tool_calls"),
            )
            for m in messages
        )
        request = GenerateRequest(
            messages=turns, tools=use, params=SamplingParams(temperature=0, max_tokens=300)
        )
        parser_out = [c async for c in with_tool_calls(runtime.generate(request), use)]
        text = "".join(c.text for c in parser_out)
        calls: dict[int, list[str]] = {}
        for chunk in parser_out:
            for delta in chunk.tool_calls:
                entry = calls.setdefault(delta.index, ["", ""])
                entry[0] += delta.name or ""
                entry[1] += delta.arguments
        return text, [(name, json.loads(args)) for name, args in calls.values()]

    async def run() -> dict[str, float]:
        rng = random.Random(seed)
        tool = exact = follow = follow_right = 0
        for _ in range(count):
            command, expected = make_tool_example(rng)
            _, calls = await answer([{"role": "user", "content": command}])
            tool += [n for n, _ in calls] == [n for n, _ in expected]
            exact += calls == [(n, a) for n, a in expected]
        while follow < count // 4:
            messages, _, said = make_chat(rng)
            if len(messages) < 2:
                continue
            follow += 1
            text, _ = await answer(messages)
            follow_right += text.strip() == said
        return {
            "right_tool": tool / count,
            "right_arguments": exact / count,
            "follow_ups": follow,
            "follow_up_right": follow_right / max(follow, 1),
        }

    try:
        return asyncio.run(run())
    finally:
        runtime.close_blocking()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    digest.update(path.read_bytes())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / NAME)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument(
        "--retrain", action="store_true", help="train even if weights of an earlier run are cached"
    )
    parser.add_argument("--quant", default="q8_0", help="llama.cpp type of the committed file")
    parser.add_argument("--eval", type=int, default=200, help="held-out commands to check")
    parser.add_argument("--device", default="cpu", help="torch device to train on (cuda: a GPU)")
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="trained weights to use or (with --train-only) to write; default "
        "a file in the temporary directory",
    )
    parser.add_argument(
        "--train-only",
        action="store_true",
        help="train and save the weights, nothing else (needs only torch "
        "and jinja2, e.g. on a GPU machine)",
    )
    args = parser.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    vocab = Vocab.build()
    shape = Shape(vocab=len(vocab.tokens))
    # Trained weights are kept (outside the repository, as safetensors) so a failure after
    # training, or a re-run with other output options, does not train again; --retrain
    # ignores them. Only training needs torch: the rest reads them with numpy.
    cache = args.weights or (
        Path(tempfile.gettempdir()) / f"{NAME}-{MODEL_VERSION}-{args.steps}.safetensors"
    )
    started = time.monotonic()
    if cache.is_file() and not args.retrain and not args.train_only:
        log(f"using the weights trained before ({cache})")
    else:
        from safetensors.torch import save_file

        model = train(vocab, shape, args.steps, log, device=args.device)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(cache))
        log(f"trained in {time.monotonic() - started:.0f}s; weights in {cache}")
        if args.train_only:
            return 0
    from safetensors.numpy import load_file

    weights = load_file(str(cache))
    params = sum(int(w.size) for w in weights.values())
    log(f"{params:,} parameters")

    sys.path.insert(0, str(ROOT.parent))
    from appliance.tools.quantize import quantize_gguf

    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / f"{NAME}-{args.quant}.gguf"
    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / f"{NAME}-f32.gguf"
        write_gguf(weights, vocab, shape, f32)
        report = quantize_gguf(
            f32, target, args.quant, eval_text=_eval_text(), threads=2, cpu_repack=False
        )
        log(report.text())
        before = evaluate(f32, args.eval, SEED + 1) if args.eval else {}
    after = evaluate(target, args.eval, SEED + 1) if args.eval else {}
    log(f"held-out JSON intents, F32: {before}  {args.quant.upper()}: {after}")
    if args.eval:
        tools = evaluate_tools(target, args.eval, SEED + 3)
        log(f"held-out tool calls, {args.quant.upper()}: {tools}")
    (args.out / "intent.schema.json").write_text(json.dumps(SCHEMA, indent=2) + "\n")
    manifest = (
        f'name = "{NAME}"\nruntime = "gguf"\nfile = "{target.name}"\n'
        f'version = "{MODEL_VERSION}"\nsha256 = "{sha256(target)}"\n'
        f'description = "Tiny Llama-architecture model turning smart-home commands into Home '
        f"Assistant intent tool calls or JSON intents ({params // 1000}K parameters, "
        f'{args.quant.upper()})"\n\n'
        f"[options]\nthreads = 1\nn_ctx = {shape.context}\nembeddings = false\n"
        f"# Four requests decode together in one batch; each slot's cache is only "
        f"{shape.context} tokens.\n"
        "parallel = 4\n"
        "# llama.cpp's repacked CPU layouts crash decoding tiny Q8_0 models (64-wide rows)\n"
        "# on AMX processors (llama-cpp-python 0.3.36); kept off for this one too.\n"
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
