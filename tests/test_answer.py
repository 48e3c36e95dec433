"""model/answer.py: the compact JSON target and a parser of model output that never raises."""
import json

import pytest

from model.answer import empty_answer, parse_answer, render_answer

ENTITIES = [{"type": "time", "filler": "sept heures"}, {"type": "date", "filler": "마르디 é"}]
ANSWER = {"scenario": "alarm", "action": "set", "entities": ENTITIES}


def test_render_is_compact_json_with_readable_non_ascii_and_entities_in_given_order():
    text = render_answer("alarm", "set", ENTITIES)
    assert text == ('{"scenario":"alarm","action":"set","entities":'
                    '[{"type":"time","filler":"sept heures"},{"type":"date","filler":"마르디 é"}]}')
    assert json.loads(text) == ANSWER


def test_render_keeps_only_type_and_filler_of_manifest_entities():
    text = render_answer("alarm", "set", [{"filler": "six", "type": "time", "span": [3]}])
    assert text.endswith('"entities":[{"type":"time","filler":"six"}]}')


def test_render_rejects_entity_without_filler_naming_it():
    with pytest.raises(ValueError, match="entity 1"):
        render_answer("alarm", "set", [ENTITIES[0], {"type": "time"}])


def test_round_trip_render_then_parse_is_clean_and_identical():
    for entities in (ENTITIES, []):
        labels, error = parse_answer(render_answer("alarm", "set", entities))
        assert (labels, error) == ({"scenario": "alarm", "action": "set", "entities": entities}, None)


def test_code_fence_around_the_answer_is_clean():
    text = "```json\n" + render_answer("alarm", "set", ENTITIES) + "\n```"
    assert parse_answer(text) == (ANSWER, None)


def test_extra_text_around_the_json_keeps_labels_and_reports_it():
    text = "Sure! Here it is: " + render_answer("alarm", "set", ENTITIES) + " Hope this helps."
    labels, error = parse_answer(text)
    assert labels == ANSWER
    assert "extra text" in error


def test_chat_in_braces_before_the_answer_is_skipped():
    text = "{thinking} " + render_answer("alarm", "set", ENTITIES)
    assert parse_answer(text)[0] == ANSWER


def test_truncated_mid_entity_recovers_scenario_action_and_complete_entities():
    full = render_answer("alarm", "set", ENTITIES)
    cut = full[: full.index("마르디") + 2]  # inside the second entity's filler
    labels, error = parse_answer(cut)
    assert labels == {"scenario": "alarm", "action": "set", "entities": ENTITIES[:1]}
    assert "truncated" in error


def test_truncated_inside_the_action_keeps_the_scenario():
    labels, error = parse_answer('{"scenario":"alarm","action":"se')
    assert labels == {"scenario": "alarm", "action": "", "entities": []}
    assert "truncated" in error


def test_truncated_after_entities_written_first_keeps_them():
    labels, _ = parse_answer('{"entities":[{"type":"time","filler":"six"}],"scenario":"ala')
    assert labels == {"scenario": "", "action": "", "entities": [{"type": "time", "filler": "six"}]}


@pytest.mark.parametrize("text", ["", "set an alarm for six", "{{{", "[1, 2]", '"alarm"', "null"])
def test_text_without_an_answer_object_gives_empty_labels_and_an_error(text):
    labels, error = parse_answer(text)
    assert labels == empty_answer()
    assert error


def test_non_string_input_gives_empty_labels_and_an_error():
    assert parse_answer(None) == (empty_answer(), "expected a string, got NoneType")


def test_entities_not_a_list_keeps_scenario_and_action():
    labels, error = parse_answer('{"scenario":"alarm","action":"set","entities":{"type":"time"}}')
    assert labels == {"scenario": "alarm", "action": "set", "entities": []}
    assert "'entities' is dict, expected a list" in error


def test_entity_missing_filler_is_dropped_and_the_rest_kept():
    text = ('{"scenario":"alarm","action":"set","entities":'
            '[{"type":"time"},{"type":"date","filler":"today"},{"type":"x","filler":3},"junk"]}')
    labels, error = parse_answer(text)
    assert labels["entities"] == [{"type": "date", "filler": "today"}]
    assert "entity 0 is missing 'filler'" in error
    assert "entity 2 'filler' is int" in error
    assert "entity 3 is str" in error


def test_wrong_scalar_types_are_reported_and_left_empty():
    labels, error = parse_answer('{"scenario":null,"action":["set"],"entities":[]}')
    assert labels == empty_answer()
    assert "'scenario' is NoneType" in error and "'action' is list" in error


def test_missing_key_is_reported():
    labels, error = parse_answer('{"scenario":"alarm","entities":[]}')
    assert labels == {"scenario": "alarm", "action": "", "entities": []}
    assert error == "missing 'action'"


# Property tests: whatever the model writes, the parser returns labels of the right shape.
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


def _well_formed(labels):
    return (isinstance(labels["scenario"], str) and isinstance(labels["action"], str)
            and all(set(e) == {"type", "filler"} and all(isinstance(v, str) for v in e.values())
                    for e in labels["entities"]))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('{}[]":, \\abc\n`é')) | st.characters(), max_size=80))
def test_parse_never_raises_on_arbitrary_text(text):
    labels, error = parse_answer(text)
    assert _well_formed(labels)
    assert error is None or isinstance(error, str)


_label = st.text(min_size=0, max_size=12)


@settings(max_examples=100, deadline=None)
@given(_label, _label, st.lists(st.fixed_dictionaries({"type": _label, "filler": _label}), max_size=4), st.data())
def test_every_truncation_of_a_valid_answer_parses_to_a_prefix_of_its_labels(scenario, action, entities, data):
    text = render_answer(scenario, action, entities)
    cut = data.draw(st.integers(0, len(text)))
    labels, error = parse_answer(text[:cut])
    assert _well_formed(labels)
    # A cut answer never invents labels: whatever is recovered is the true value or empty.
    assert labels["scenario"] in (scenario, "")
    assert labels["action"] in (action, "")
    assert labels["entities"] == entities[: len(labels["entities"])]
    assert (error is None) == (cut == len(text))
