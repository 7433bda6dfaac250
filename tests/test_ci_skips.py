"""With CI=true a test that would skip for a missing dataset or reference library fails instead."""

from conftest import ci_fails_skip


def test_ci_turns_missing_prerequisites_into_failures():
    ci = {"CI": "true"}
    assert ci_fails_skip("Fashion-MNIST not installed", ci)
    assert ci_fails_skip("could not import 'foolbox': No module named 'foolbox'", ci)
    assert not ci_fails_skip("supports every norm", ci)                  # a case that does not apply
    assert not ci_fails_skip("Fashion-MNIST not installed", {})          # a developer's machine: a skip
    assert not ci_fails_skip("Fashion-MNIST not installed", {"CI": "false"})
