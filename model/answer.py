"""The SLU target as one compact JSON object, and a parser for model output that never raises.

train.py renders the target with `render_answer`; infer.py parses what the model generated with
`parse_answer`. The format is

    {"scenario":"alarm","action":"set","entities":[{"type":"time","filler":"seven am"}]}

Compact separators and ensure_ascii=False: every character of the target is a token the model
must produce, and escaped French/Korean ("\\u00e9") would cost several tokens per letter.
Entities keep the given (utterance) order, so the target is a deterministic function of the row.

A generated answer can be cut at the token limit, wrapped in a code fence, surrounded by chat,
or not JSON at all. `parse_answer` recovers what it can (scenario, action and every complete
entity before a cut) and says what was wrong in `error`; it never raises, because one bad row
must not stop a 13k-row decoding run.
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

# The token limit of every decoding (infer.py, train.py's dev evaluation, grid.py): the 5,007 real SLURP
# devel/test gold answers need at most 76 tokens with <|im_end|> (5 need more than 64), and French and Italian
# answers are longer. Rows that reach it without an end token are counted by infer.py (their answers are cut).
MAX_NEW_TOKENS = 128

_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\n\r"
_ANSWER_KEYS = {"scenario", "action", "entities"}


def render_answer(scenario: str, action: str, entities: Iterable[Mapping[str, str]]) -> str:
    """The training target: compact JSON, keys in a fixed order, entities in the order given."""
    if not isinstance(scenario, str) or not isinstance(action, str):
        raise TypeError(f"scenario and action must be strings, got {scenario!r}, {action!r}")
    items = []
    for i, entity in enumerate(entities):
        if not isinstance(entity, Mapping) or not isinstance(entity.get("type"), str) \
                or not isinstance(entity.get("filler"), str):
            raise ValueError(f"entity {i} must be an object with string 'type' and 'filler', got {entity!r}")
        items.append({"type": entity["type"], "filler": entity["filler"]})
    answer = {"scenario": scenario, "action": action, "entities": items}
    return json.dumps(answer, ensure_ascii=False, separators=(",", ":"))


def empty_answer() -> dict:
    """The labels of an answer that could not be parsed at all: scored as wrong, never as missing."""
    return {"scenario": "", "action": "", "entities": []}


def parse_answer(text: Any) -> tuple[dict, str | None]:
    """Parse generated text into (labels, error). Never raises.

    labels is {"scenario": str, "action": str, "entities": [{"type": str, "filler": str}, ...]};
    error is None for a clean answer (a surrounding code fence or whitespace counts as clean),
    otherwise a short description of every problem found, "; "-separated.
    """
    try:
        return _parse(text)
    except Exception as e:  # a parser bug must cost one row, not the run
        return empty_answer(), f"internal parser error: {e!r}"


def _parse(text: Any) -> tuple[dict, str | None]:
    if not isinstance(text, str):
        return empty_answer(), f"expected a string, got {type(text).__name__}"
    body, problems = _strip_code_fence(text), []
    start = body.find("{")
    if start < 0:
        return empty_answer(), _join(problems + [f"no JSON object found in {_preview(body)}"])

    # The answer is the first '{' that decodes to an object with an answer key; the keys check
    # skips an entity object inside a truncated answer, and chat in braces before the answer.
    for pos in _brace_positions(body, start):
        try:
            value, end = _DECODER.raw_decode(body, pos)
        except ValueError:
            continue
        if isinstance(value, dict) and _ANSWER_KEYS & value.keys():
            if body[:pos].strip() or body[end:].strip():
                problems.append("extra text around the JSON object")
            labels, value_problems = _labels_from_object(value)
            return labels, _join(problems + value_problems)

    # Nothing decoded whole: most likely cut at the token limit. Read an object's members one
    # by one and keep every complete one.
    for pos in _brace_positions(body, start):
        members = _members_of_prefix(body, pos)
        if _ANSWER_KEYS & members.keys():
            labels, value_problems = _labels_from_object(members)
            # "missing 'x'" after a cut only restates the truncation; keep the type problems.
            value_problems = [p for p in value_problems if not p.startswith("missing '")]
            if body[:pos].strip():
                problems.append("extra text before the JSON object")
            return labels, _join(problems + ["truncated or malformed JSON"] + value_problems)
    return empty_answer(), _join(problems + [f"no answer object found in {_preview(body)}"])


def _strip_code_fence(text: str) -> str:
    """Remove a Markdown code fence (```json ... ```), which chat models add by habit."""
    body = text.strip()
    if body.startswith("```"):
        newline = body.find("\n")
        body = body[newline + 1:] if newline >= 0 else body[3:]
        fence_end = body.rfind("```")
        if fence_end >= 0:
            body = body[:fence_end]
    return body


def _brace_positions(body: str, start: int):
    pos = start
    while pos >= 0:
        yield pos
        pos = body.find("{", pos + 1)


def _labels_from_object(value: dict) -> tuple[dict, list[str]]:
    """Check the types of a decoded object, keeping every field that has the right type."""
    labels, problems = empty_answer(), []
    for key in ("scenario", "action"):
        if key not in value:
            problems.append(f"missing '{key}'")
        elif not isinstance(value[key], str):
            problems.append(f"'{key}' is {type(value[key]).__name__}, expected a string")
        else:
            labels[key] = value[key]
    if "entities" not in value:
        problems.append("missing 'entities'")
    elif not isinstance(value["entities"], list):
        problems.append(f"'entities' is {type(value['entities']).__name__}, expected a list")
    else:
        for i, entity in enumerate(value["entities"]):
            kept, problem = _entity(entity, i)
            if kept is not None:
                labels["entities"].append(kept)
            if problem:
                problems.append(problem)
    return labels, problems


def _entity(entity: Any, i: int) -> tuple[dict | None, str | None]:
    """An entity is kept only whole: a type without a filler is not a slot we can score."""
    if not isinstance(entity, dict):
        return None, f"entity {i} is {type(entity).__name__}, expected an object"
    for key in ("type", "filler"):
        if key not in entity:
            return None, f"entity {i} is missing '{key}'"
        if not isinstance(entity[key], str):
            return None, f"entity {i} '{key}' is {type(entity[key]).__name__}, expected a string"
    return {"type": entity["type"], "filler": entity["filler"]}, None


def _members_of_prefix(body: str, start: int) -> dict[str, Any]:
    """Decode the members of the object at `start` until the text runs out or stops being JSON."""
    members: dict[str, Any] = {}
    pos = _skip(body, start + 1)
    while pos < len(body) and body[pos] != "}":
        try:
            key, pos = _DECODER.raw_decode(body, pos)
        except ValueError:
            break
        pos = _skip(body, pos)
        if not isinstance(key, str) or pos >= len(body) or body[pos] != ":":
            break
        pos = _skip(body, pos + 1)
        if key == "entities" and pos < len(body) and body[pos] == "[":
            # The list itself may be cut, so decode it one element at a time.
            entities = members["entities"] = []
            pos = _skip(body, pos + 1)
            while pos < len(body) and body[pos] != "]":
                try:
                    element, pos = _DECODER.raw_decode(body, pos)
                except ValueError:
                    break
                entities.append(element)
                pos = _skip(body, pos)
                if pos < len(body) and body[pos] == ",":
                    pos = _skip(body, pos + 1)
            if pos >= len(body) or body[pos] != "]":
                break
            pos = _skip(body, pos + 1)
        else:
            try:
                members[key], pos = _DECODER.raw_decode(body, pos)
            except ValueError:
                break
            pos = _skip(body, pos)
        if pos < len(body) and body[pos] == ",":
            pos = _skip(body, pos + 1)
        else:
            break
    return members


def _skip(body: str, pos: int) -> int:
    while pos < len(body) and body[pos] in _WHITESPACE:
        pos += 1
    return pos


def _join(problems: list[str]) -> str | None:
    return "; ".join(problems) if problems else None


def _preview(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
