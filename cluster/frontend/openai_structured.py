"""The OpenAI API's structured-output fields onto one `StructuredSpec` (workers/engine/structured.py).

- OpenAI: `response_format` `{"type": "text" | "json_object"}` or `{"type": "json_schema",
  "json_schema": {"name", "schema", "strict"}}`;
- vLLM: `structured_outputs` `{"json": schema, "regex": str, "choice": [str], "grammar": str,
  "json_object": true}` (one of them), and its older `guided_json`, `guided_regex`,
  `guided_choice`, `guided_grammar` (also in KServe's `sampling_parameters`).
At most one of them per request; a malformed one is a 400 naming the field it came in.
"""
from __future__ import annotations

import json

from cluster.frontend.validate import InvalidArgument
from workers.engine.structured import StructuredSpec

VLLM_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
             "json_object": "json_object"}
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def structured_spec(body) -> tuple[StructuredSpec, str] | None:
    """(spec, the field it came in) or None when the output is free."""
    found = []
    rf = body.response_format
    if rf is not None:
        spec = _response_format(rf)
        if spec is not None:
            found.append((spec, "response_format"))
    if body.structured_outputs is not None:
        found.append((_vllm(body.structured_outputs, "structured_outputs"), "structured_outputs"))
    for name, key in GUIDED.items():
        value = getattr(body, name)
        if value is not None:
            found.append((_vllm({key: value}, name), name))
    if len(found) > 1:
        raise InvalidArgument(found[1][1], f"give one of {', '.join(f for _, f in found)}, not several")
    return found[0] if found else None


def structured_fields(obj: dict, prefix: str) -> tuple[StructuredSpec, str] | None:
    """KServe's `sampling_parameters` JSON: vLLM's `structured_outputs` or a `guided_*` key,
    taken out of `obj` (the rest are sampling fields), as (spec, field)."""
    found = []
    if "structured_outputs" in obj:
        found.append((_vllm(obj.pop("structured_outputs"), prefix + "structured_outputs"),
                      prefix + "structured_outputs"))
    for name, key in GUIDED.items():
        if name in obj:
            found.append((_vllm({key: obj.pop(name)}, prefix + name), prefix + name))
    if len(found) > 1:
        raise InvalidArgument(found[1][1], "give one structured-output field, not several")
    return found[0] if found else None


def _response_format(rf) -> StructuredSpec | None:
    field = "response_format"
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise InvalidArgument(field, 'must be an object with a "type": "text", "json_object" or "json_schema"')
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredSpec("json_object")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), (dict, bool)):
            raise InvalidArgument(f"{field}.json_schema", 'must be an object with a "schema" object')
        return StructuredSpec("json_schema", json.dumps(js.get("schema", {})))
    raise InvalidArgument(f"{field}.type", f'must be "text", "json_object" or "json_schema", got {kind!r}')


def _vllm(so, field: str) -> StructuredSpec:
    if not isinstance(so, dict):
        raise InvalidArgument(field, f"must be an object with one of {', '.join(VLLM_KEYS)}")
    given = [k for k in VLLM_KEYS if so.get(k) not in (None, False)]
    if len(given) != 1:
        raise InvalidArgument(field, f"give exactly one of {', '.join(VLLM_KEYS)}")
    key = given[0]
    value = so[key]
    if key == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise InvalidArgument(field, "json: is not valid JSON") from None
        if not isinstance(value, (dict, bool)):
            raise InvalidArgument(field, "json: must be a JSON schema object")
        return StructuredSpec("json_schema", json.dumps(value))
    if key == "json_object":
        return StructuredSpec("json_object")
    if key == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise InvalidArgument(field, "choice: must be a non-empty list of non-empty strings")
        return StructuredSpec("choice", json.dumps(value))
    if not isinstance(value, str):
        raise InvalidArgument(field, f"{key}: must be text")
    return StructuredSpec(VLLM_KEYS[key], value)
