"""The groups of a study's problem: detected, minus ``exclude``, plus the user's ``[[symmetry.groups]]``."""

from __future__ import annotations

from flowlab.problem import Problem

from .config import SymmetrySection, parse_symmetry
from .detect import detect_problem
from .groups import Groups, Skipped, build_user_blocks

_KEY = "symmetry.groups"  # in problem.derived: (section, groups), detection traces the model once


def build_groups(problem: Problem, section: SymmetrySection | None = None) -> Groups:
    """Detect (unless ``detect = false``), drop ``exclude`` matches, add user groups.

    The result is cached on the problem (detection traces the model once per problem)."""
    section = section or parse_symmetry({})
    key = section.to_dict()
    cached = problem.derived.get(_KEY)
    if cached is not None and cached[0] == key:
        return cached[1]
    if section.detect:
        groups = detect_problem(problem).groups
    else:
        groups = Groups(problem.layout, [], [Skipped("(model)", "all", "detection off ([symmetry] detect = false)")])
    if section.exclude:
        mask = groups.matching(section.exclude)
        dropped = sorted({f"{k}:{la}" for k, la in zip(groups.kinds[mask], groups.layers[mask])})
        groups = groups.select(~mask)
        for d in dropped:
            kind, _, layer = d.partition(":")
            groups.skipped.append(Skipped(layer, kind, "excluded by [symmetry] exclude"))
    if section.groups:
        groups = groups.extend(build_user_blocks(section.groups, problem.layout))
    problem.derived[_KEY] = (key, groups)
    return groups


def study_groups(study, problem: Problem) -> Groups:
    """:func:`build_groups` with the study's ``[symmetry]`` section."""
    return build_groups(problem, study.section("symmetry"))


__all__ = ["build_groups", "study_groups"]
