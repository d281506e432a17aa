"""Structured outputs in the engine (workers/engine/structured.py): whatever the model, a
constrained request's output parses and validates against its schema, ends at its stop token
when the grammar completes, and leaves the unconstrained rows of its batch alone."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from workers.engine.sampling_params import SamplingParams
from workers.engine.structured import StructuredSpec, check_spec
from workers.errors import ConfigError
from workers.launcher import start_worker_group
from workers.worker import WorkerSpec

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
     "required": ["color", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "score": {"type": "number", "minimum": 0,
                                                                           "maximum": 1}},
     "required": ["ok"], "additionalProperties": False},
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "null"}]},
]
PROMPT_TEXT = "Answer in JSON:"


@pytest.fixture(scope="module")
def group(smollm2_dir):
    with start_worker_group(WorkerSpec(str(smollm2_dir), tp_size=1, kv_cache_memory=32 << 20)) as g:
        yield g


def prompt(smollm2_reference, text=PROMPT_TEXT):
    return smollm2_reference[1](text)["input_ids"]


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_every_output_parses_and_validates_against_its_schema(group, smollm2_reference, temperature):
    tok = smollm2_reference[1]
    params = [SamplingParams(max_tokens=96, temperature=temperature, seed=i,
                             structured=StructuredSpec("json_schema", json.dumps(schema)))
              for i, schema in enumerate(SCHEMAS)]
    outs = group.engine.generate([prompt(smollm2_reference)] * len(SCHEMAS), params)
    for schema, out in zip(SCHEMAS, outs):
        assert out.finish_reason == "stop", (schema, out.finish_reason, out.token_ids)
        text = tok.decode(out.token_ids, skip_special_tokens=True)
        jsonschema.validate(json.loads(text), schema)
        # ended by the grammar, at a stop token (a special token: no text)
        assert out.stop_reason == out.token_ids[-1] and tok.decode(out.token_ids[-1:], skip_special_tokens=True) == ""


def test_json_object_regex_choice_and_grammar(group, smollm2_reference):
    tok = smollm2_reference[1]
    specs = [StructuredSpec("json_object"), StructuredSpec("regex", r"[0-9]{3}-[a-z]{2}"),
             StructuredSpec("choice", json.dumps(["Paris", "London", "Rome"])),
             StructuredSpec("grammar", 'root ::= "yes" | "no"')]
    outs = group.engine.generate([prompt(smollm2_reference, "The capital of France is")] * len(specs),
                                 [SamplingParams(max_tokens=64, temperature=0.0, structured=s) for s in specs])
    texts = [tok.decode(o.token_ids, skip_special_tokens=True) for o in outs]
    assert isinstance(json.loads(texts[0]), dict) and outs[0].finish_reason == "stop"
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", texts[1])
    assert texts[2] in ("Paris", "London", "Rome") and texts[3] in ("yes", "no")


def test_constrained_rows_leave_the_others_of_the_batch_alone(group, smollm2_reference):
    free = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = group.engine.generate([prompt(smollm2_reference, "Once upon a time")], free)[0].token_ids
    constrained = SamplingParams(max_tokens=32, temperature=0.0, structured=StructuredSpec("json_object"))
    outs = group.engine.generate([prompt(smollm2_reference, "Once upon a time"), prompt(smollm2_reference)],
                                 [free, constrained])
    assert outs[0].token_ids == alone


def test_a_spec_that_cannot_compile_is_refused_naming_the_field(group, smollm2_reference):
    for spec in (StructuredSpec("json_schema", "{not json"), StructuredSpec("regex", "(unclosed"),
                 StructuredSpec("grammar", "root ::= ")):
        with pytest.raises(ConfigError) as info:
            check_spec(spec, "response_format")
        assert info.value.field == "response_format"
        with pytest.raises(ConfigError) as info:  # the engine refuses it too, and serves on
            group.engine.generate([prompt(smollm2_reference)], SamplingParams(max_tokens=4, structured=spec))
        assert "structured_outputs" in info.value.field
    with pytest.raises(ConfigError):
        StructuredSpec("choice", "[]").validate()
    ok = group.engine.generate([prompt(smollm2_reference)], SamplingParams(max_tokens=4, temperature=0))[0]
    assert len(ok.token_ids) == 4
