"""The label-file parsers under a bounded Hypothesis fuzz: about a second each. benchmarks/fuzz_labels.py runs the
same properties for as long as it is asked to (label_fuzzing.py holds both)."""

import pytest
from hypothesis import given, settings

from label_fuzzing import PARSERS, outcome


@pytest.mark.parametrize("file", sorted(PARSERS))
def test_a_label_parser_accepts_what_it_promises_or_refuses_in_one_line(file):
    @settings(max_examples=150, deadline=None, database=None)
    @given(PARSERS[file][0])
    def keeps_its_promise(contents):
        outcome(file, contents)

    keeps_its_promise()
