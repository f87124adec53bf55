"""One test per row of docs/architectures.md: the map keeps its promises on every architecture of the
table, and the table says what the map finds today (scripts/architecture_table.py writes it)."""

from __future__ import annotations

import warnings

import pytest

from scripts.architecture_table import ARCHITECTURES, DOC, build, describe, markdown, problems, quiet_map
from spectral_plugins import map_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def documented_rows() -> dict[str, str]:
    lines = [line for line in DOC.read_text().splitlines() if line.startswith("| ")][1:]
    return {line.split(" | ")[0].removeprefix("| "): line for line in lines}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_block_matrix_has_stack_depth_and_role_keys_are_unique_and_experts_complete(name):
    model = build(name)
    model_map = quiet_map(model)
    assert problems(name, model, model_map) == []
    assert model_map.num_blocks >= 2
    # The documented row is what the map finds now.
    assert markdown([describe(name, model_map)]).splitlines()[-1] == documented_rows()[name]


def test_the_table_lists_exactly_the_architectures_tested():
    assert list(documented_rows()) == list(ARCHITECTURES)


def test_problems_reports_what_a_broken_map_would_look_like():
    model = build("Mixtral")
    model_map = quiet_map(model)
    broken = type(model_map)(tuple(m for m in model_map if m.expert != 3), model_map.model_type,
                             model_map.blocks_path, model_map.num_blocks, model_map.stacks)
    found = problems("Mixtral", model, broken)
    assert any("experts cover" in p for p in found) and any("gate_up_proj" in p for p in found)


def test_the_unknown_architecture_says_once_what_it_could_not_classify():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model_map = map_model(build("unknown architecture"))
    assert len([w for w in record if "no recognised role" in str(w.message)]) == 1
    assert {m.role for m in model_map} == {"other"}
    assert [m.depth for m in model_map if m.depth is not None] == [0, 0, 1, 1, 2, 2]
