"""Hand-written JSON Schemas (2020-12) for the bodies that have no pydantic model.

The OpenAI-compatible bodies are described by the pydantic models in `openai_schema.py`;
everything else is built from dicts by the handlers, so its shape is written down here:
Open Inference Protocol v2 tensors and metadata, the `/health` body and both error shapes.
Keep these in step with `../oip.py`, `../ops.py`, `../errors.py` and `protocol/oip.py`: the tests
validate real responses of the daemon against them.
"""

from __future__ import annotations

from typing import Any

from appliance.core.types import DATATYPES, ModelState

REF = "#/components/schemas/"


def ref(name: str) -> dict[str, str]:
    """A reference to the component schema `name`."""
    return {"$ref": REF + name}


_SHAPE = {
    "type": "array",
    "items": {"type": "integer", "minimum": -1},
    "description": "Dimensions of the tensor; -1 is a dynamic dimension (metadata only).",
}
_CONCRETE_SHAPE = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0},
    "description": "Dimensions of the tensor, outermost first.",
}
_BINARY_SIZE = {
    "type": "object",
    "properties": {
        "binary_data_size": {
            "type": "integer",
            "minimum": 0,
            "description": "Bytes of this tensor in the binary part of the body "
            "(binary tensor data extension), in the order of the tensors.",
        }
    },
}

SCHEMAS: dict[str, dict[str, Any]] = {
    # ------------------------------------------------------------------ errors
    "OpenAIError": {
        "type": "object",
        "description": "Error body of the OpenAI-compatible routes (`/v1/...`), in OpenAI's "
        "own shape so its clients raise the matching exception.",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string", "description": "What is wrong."},
                    "type": {
                        "type": "string",
                        "description": "invalid_request_error, not_found_error, "
                        "rate_limit_error, server_error, ...",
                    },
                    "param": {
                        "type": ["string", "null"],
                        "description": "The request field at fault, when there is one.",
                    },
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    },
    "Error": {
        "type": "object",
        "description": "Error body of every route outside `/v1/` (the Open Inference "
        "Protocol's shape).",
        "required": ["error"],
        "properties": {"error": {"type": "string", "description": "What is wrong."}},
    },
    # ------------------------------------------------------------------ health
    "Health": {
        "type": "object",
        "description": "The appliance's own view of its health.",
        "required": ["status", "version", "device", "uptime_s", "models", "units"],
        "properties": {
            "status": {
                "enum": ["ok", "degraded", "loading", "unavailable"],
                "description": "ok: every model is ready; degraded: some model failed to "
                "load but others serve (200); loading: models are still loading; "
                "unavailable: stopping, or no model can serve (503).",
            },
            "version": {"type": "string", "description": "Appliance software version."},
            "device": {
                "type": "object",
                "required": ["id", "name"],
                "properties": {
                    "id": {"type": "string", "description": "Stable device id."},
                    "name": {"type": "string", "description": "Human name of the box."},
                },
            },
            "uptime_s": {"type": "number", "minimum": 0, "description": "Seconds since start."},
            "models": {
                "type": "object",
                "additionalProperties": ref("HealthModel"),
                "description": "Every model in the repository, by name.",
            },
            "units": {
                "type": "object",
                "additionalProperties": {"type": "object"},
                "description": "What each running part of the appliance (health checks, "
                "alerts, hub sync, ...) reports about itself, by name; `error` when it "
                "could not report.",
            },
        },
    },
    "HealthModel": {
        "type": "object",
        "required": ["state", "runtime", "version"],
        "properties": {
            "state": {"enum": [s.value for s in ModelState]},
            "runtime": {"type": "string", "description": "onnx or gguf."},
            "version": {"type": "string"},
            "error": {"type": "string", "description": "Why the model failed to load."},
        },
    },
    # ------------------------------------------------- Open Inference Protocol v2
    "Datatype": {
        "enum": list(DATATYPES),
        "description": "Open Inference Protocol tensor datatype.",
    },
    "TensorData": {
        "description": "Tensor elements in row-major order, flat or nested to the shape. "
        "BYTES elements are strings; BOOL elements are true/false.",
        "anyOf": [
            {"type": "array", "items": ref("TensorData")},
            {"type": ["number", "boolean", "string"]},
        ],
    },
    "ServerMetadataResponse": {
        "type": "object",
        "required": ["name", "version", "extensions"],
        "properties": {
            "name": {"type": "string", "description": "Always `appliance`."},
            "version": {"type": "string", "description": "Appliance software version."},
            "extensions": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Protocol extensions implemented, e.g. `binary_tensor_data`.",
            },
        },
    },
    "ServerLiveResponse": {
        "type": "object",
        "required": ["live"],
        "properties": {"live": {"type": "boolean", "description": "Always true."}},
    },
    "ServerReadyResponse": {
        "type": "object",
        "required": ["ready"],
        "properties": {
            "ready": {"type": "boolean", "description": "Always true (503 when not ready)."}
        },
    },
    "MetadataTensor": {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string", "description": "Tensor name."},
            "datatype": ref("Datatype"),
            "shape": _SHAPE,
        },
    },
    "ModelMetadataResponse": {
        "type": "object",
        "required": ["name", "versions", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string", "description": "Model name."},
            "versions": {
                "type": "array",
                "items": {"type": "string"},
                "description": "The version served (one per model).",
            },
            "platform": {
                "type": "string",
                "description": "onnxruntime_onnx or llama_cpp_gguf.",
            },
            "inputs": {
                "type": "array",
                "items": ref("MetadataTensor"),
                "description": "Input tensors; empty for language models and models not loaded.",
            },
            "outputs": {
                "type": "array",
                "items": ref("MetadataTensor"),
                "description": "Output tensors, in the model's order.",
            },
            "state": {
                "enum": [s.value for s in ModelState],
                "description": "Appliance extension: the model's lifecycle state.",
            },
            "error": {
                "type": "string",
                "description": "Appliance extension: why the model failed to load.",
            },
        },
    },
    "ModelVersions": {
        "type": "object",
        "required": ["name", "versions"],
        "properties": {
            "name": {"type": "string", "description": "Model name."},
            "versions": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "Each served version and its state.",
            },
        },
    },
    "CanaryDecision": {
        "type": "object",
        "required": ["model", "stable", "canary", "decision", "reason"],
        "properties": {
            "model": {"type": "string"},
            "stable": {"type": "string", "description": "The stable version."},
            "canary": {"type": "string", "description": "The canary version."},
            "decision": {"enum": ["promoted", "rolled_back"]},
            "reason": {"type": "string"},
        },
    },
    "ModelReadyResponse": {
        "type": "object",
        "required": ["name", "ready"],
        "properties": {
            "name": {"type": "string", "description": "Model name."},
            "ready": {"const": True, "description": "Always true (503 when not ready)."},
        },
    },
    "InferenceRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string", "description": "Echoed in the response."},
            "parameters": {
                "type": "object",
                "properties": {
                    "binary_data_output": {
                        "type": "boolean",
                        "description": "Return every output as binary tensor data.",
                    }
                },
            },
            "inputs": {"type": "array", "minItems": 1, "items": ref("RequestInput")},
            "outputs": {
                "type": "array",
                "items": ref("RequestOutput"),
                "description": "Outputs to return; all of them when absent.",
            },
        },
    },
    "RequestInput": {
        "type": "object",
        "description": "One input tensor: `data` inline, or `parameters.binary_data_size` "
        "bytes in the binary part of the body.",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {
                "type": "string",
                "minLength": 1,
                "description": "Input name, from the model's metadata.",
            },
            "datatype": ref("Datatype"),
            "shape": _CONCRETE_SHAPE,
            "parameters": _BINARY_SIZE,
            "data": ref("TensorData"),
        },
        "anyOf": [
            {"required": ["data"]},
            {
                "required": ["parameters"],
                "properties": {"parameters": {"required": ["binary_data_size"]}},
            },
        ],
    },
    "RequestOutput": {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "description": "Output name, from the model's metadata."},
            "parameters": {
                "type": "object",
                "properties": {
                    "binary_data": {
                        "type": "boolean",
                        "description": "Return this output as binary tensor data.",
                    }
                },
            },
        },
    },
    "InferenceResponse": {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string", "description": "The model that ran."},
            "model_version": {"type": "string", "description": "Its version."},
            "id": {"type": "string", "description": "The request's id, when it had one."},
            "outputs": {
                "type": "array",
                "items": ref("ResponseOutput"),
                "description": "The outputs asked for, in the model's order.",
            },
        },
    },
    "ResponseOutput": {
        "type": "object",
        "description": "One output tensor: `data` inline, or `parameters.binary_data_size` "
        "bytes in the binary part of the body.",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string", "description": "Output name."},
            "datatype": ref("Datatype"),
            "shape": _CONCRETE_SHAPE,
            "parameters": _BINARY_SIZE,
            "data": {
                "type": "array",
                "items": {"type": ["number", "boolean", "string"]},
                "description": "Elements, flat, in row-major order.",
            },
        },
    },
}
