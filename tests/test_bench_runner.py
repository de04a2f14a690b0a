"""`make bench SUITE=<suite>` runs a suite of several parts one process per part, each named <suite>.<part>:
that name must select exactly that part, or the child would run the whole suite again."""
from bench import run


def test_every_suite_part_key_names_exactly_its_part():
    for suite, suite_parts in run.SUITES.items():
        for part, module_and_result in suite_parts.items():
            assert run.parts(f"{suite}.{part}") == [module_and_result]


def test_a_suite_names_all_its_parts():
    assert run.parts("reversible") == list(run.SUITES["reversible"].values())
    assert len(run.parts("reversible")) > 1
