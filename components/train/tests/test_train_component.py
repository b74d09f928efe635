"""`train`: its README states its interface, image and library calls."""

from tests.component_checks import check_component


def test_the_readme_is_the_interface():
    check_component("train")
