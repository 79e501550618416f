"""Run Optax's own test suite with jstep.optax in place of Optax's six aliases.

    python tests/optax_suite.py            # every Optax test file that builds one of the six
    python tests/optax_suite.py --quick    # without alias_test's 10000-step optimizations
    python tests/optax_suite.py --baseline # the same cases with Optax's own aliases

``optax.sgd``, ``adam``, ``adamw``, ``rmsprop``, ``adagrad`` and ``adadelta`` (in ``optax`` and in
``optax._src.alias``, where Optax's tests take them from) are replaced by jstep.optax's before the
test files are imported; no test or assertion is changed. Out of scope, and not run:
alias_test's cases for Optax's other optimizers (lion, lamb, ...; ``optax.nadam`` is a
``functools.partial`` of Optax's own adam) and its L-BFGS tests. A case is in scope when it calls
one of the substituted aliases or an optimizer they built; the others in these files run too
(they test Optax's wrappers with Optax's transformations) and are counted apart.

scikit-learn, which alias_test.py imports for its L-BFGS tests only, is replaced by an empty
module when it is not installed.
"""

from __future__ import annotations

import functools
import os
import sys
import types
from collections import Counter

import pytest

ALIASES = ("sgd", "adam", "adamw", "rmsprop", "adagrad", "adadelta")
# Optax's test files (relative to the optax package) that build one of the six aliases.
TEST_FILES = [
    "_src/alias_test.py",
    "_src/combine_test.py",
    "_src/float64_test.py",
    "_src/linesearch_test.py",
    "_src/lookahead_test.py",
    "_src/sharding_test.py",
    "_src/transform_test.py",
    "contrib/_schedule_free_test.py",
    "experimental/_aggregating_test.py",
    "transforms/_accumulation_test.py",
    "transforms/_combining_test.py",
    "transforms/_conditionality_test.py",
    "transforms/_freezing_test.py",
    "transforms/_layouts_test.py",
    "transforms/_masking_test.py",
    "transforms/_monitoring_test.py",
    "tree_utils/_state_utils_test.py",
]
ALIAS_TEST_OPTIMIZERS = (*ALIASES, "sgd_mom")  # test_explicit_dtype's name for sgd(momentum=0.9)


class _Usage:
    """Set while a test runs when it calls a substituted alias or an optimizer one built."""

    used = False


def _traced(function):
    @functools.wraps(function)
    def call(*args, **kwargs):
        _Usage.used = True
        return function(*args, **kwargs)

    return call


def _substitute(baseline: bool):
    """Put jstep.optax's aliases (Optax's own with `baseline`) where Optax's tests look them up,
    wrapped to record that a test used them."""
    import optax
    from optax._src import alias

    import jstep.optax

    for name in ALIASES:
        ours = getattr(alias if baseline else jstep.optax, name)

        @functools.wraps(ours)
        def factory(*args, __ours=ours, **kwargs):
            _Usage.used = True
            built = __ours(*args, **kwargs)
            return optax.GradientTransformationExtraArgs(_traced(built.init), _traced(built.update))

        setattr(alias, name, factory)
        setattr(optax, name, factory)


def _stub_sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        stub = types.ModuleType("sklearn")
        stub.datasets = types.ModuleType("sklearn.datasets")
        stub.linear_model = types.ModuleType("sklearn.linear_model")
        sys.modules.update(
            {"sklearn": stub, "sklearn.datasets": stub.datasets, "sklearn.linear_model": stub.linear_model}
        )


def _alias_test_case_in_scope(item) -> bool:
    """alias_test.py: AliasTest's common cases for the six aliases only."""
    if item.cls is None or item.cls.__name__ != "AliasTest":
        return False
    params = getattr(item.obj, "__x_params_repr__", "")
    return any(f"opt_name='{name}'" in params for name in ALIAS_TEST_OPTIMIZERS)


class SuitePlugin:
    def __init__(self, quick: bool):
        self.quick = quick
        self.outcomes: dict[str, tuple[str, bool, str]] = {}

    def pytest_collection_modifyitems(self, config, items):
        kept, dropped = [], []
        for item in items:
            in_alias_test = item.path.name == "alias_test.py"
            keep = not in_alias_test or _alias_test_case_in_scope(item)
            if keep and self.quick and in_alias_test and item.name.startswith("test_optimization"):
                keep = False
            (kept if keep else dropped).append(item)
        items[:] = kept
        config.hook.pytest_deselected(items=dropped)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        _Usage.used = False
        yield

    def pytest_runtest_logreport(self, report):
        outcome = "failed" if report.failed else report.outcome
        if report.when == "call" or report.failed or (report.when == "setup" and report.skipped):
            previous = self.outcomes.get(report.nodeid)
            if previous is None or previous[0] == "passed":
                reason = report.longreprtext.strip().splitlines()[-1] if report.longrepr else ""
                self.outcomes[report.nodeid] = (outcome, _Usage.used, reason)


def main(argv: list[str]) -> int:
    quick, baseline = "--quick" in argv, "--baseline" in argv
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    _stub_sklearn()
    _substitute(baseline)
    import optax

    root = os.path.dirname(optax.__file__)
    plugin = SuitePlugin(quick)
    files = [os.path.join(root, f) for f in TEST_FILES]
    pytest.main(["-q", "-p", "no:cacheprovider", "-o", "addopts=", "--rootdir", root, *files], plugins=[plugin])

    in_scope = {k: v for k, v in plugin.outcomes.items() if v[1] or "alias_test.py" in k}
    counts = Counter(outcome for outcome, _, _ in in_scope.values())
    others = Counter(outcome for k, (outcome, _, _) in plugin.outcomes.items() if k not in in_scope)
    whose = "Optax's own" if baseline else "jstep.optax's"
    print(f"\nOptax {optax.__version__}'s tests with {whose} {', '.join(ALIASES)}:")
    print(f"  in scope (built one of the six): {len(in_scope)} ran, {dict(counts)}")
    print(f"  the other cases of these files: {sum(others.values())} ran, {dict(others)}")
    for nodeid, (outcome, _, reason) in sorted(plugin.outcomes.items()):
        if outcome == "failed":
            print(f"  FAILED {nodeid}: {reason}")
    return 0 if counts.get("failed", 0) == 0 and others.get("failed", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
