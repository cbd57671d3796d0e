"""schemathesis, started from its virtualenv's Python with one guard.

CPython gh-106905 (3.11 before 3.11.8, 3.12 before 3.12.2) makes ast.parse raise a spurious
SystemError ("AST constructor recursion depth mismatch") when called deep in a stack. hypothesis
calls it only to write a lambda's source into a strategy's repr, and already falls back to
"lambda ...: <unknown>" when it cannot; this guard takes that fallback for the SystemError too,
so the interpreter bug cannot end a run. Nothing the checks see changes. On a fixed Python, or a
hypothesis without that function, the guard does nothing.
"""

import sys

try:
    from hypothesis.internal import lambda_sources
except ImportError:  # a hypothesis laid out differently: run unguarded
    lambda_sources = None

if lambda_sources is not None and hasattr(lambda_sources, "_lambda_description"):
    _describe = lambda_sources._lambda_description

    def _guarded(f, *args, **kwargs):
        try:
            return _describe(f, *args, **kwargs)
        except SystemError:
            return "lambda: <unknown>"

    lambda_sources._lambda_description = _guarded


def guard_check() -> int:
    """`--guard-check`: the guard catches the interpreter's SystemError on the path that crashed
    (a lazy strategy's repr naming a mapped lambda). 0 when it does."""
    if lambda_sources is None or not hasattr(lambda_sources, "_lambda_description"):
        print("schemathesis-run: hypothesis has no _lambda_description; guard not installed")
        return 1

    def boom(f, *args, **kwargs):
        raise SystemError("AST constructor recursion depth mismatch (simulated)")

    _describe_saved = globals()["_describe"]
    globals()["_describe"] = boom
    try:
        import hypothesis.strategies as st

        described = repr(st.integers().map(lambda x: x * 2))
    finally:
        globals()["_describe"] = _describe_saved
    print(f"schemathesis-run: guard ok ({described})")
    return 0


from schemathesis.cli import schemathesis  # noqa: E402

if __name__ == "__main__":
    if sys.argv[1:] == ["--guard-check"]:
        sys.exit(guard_check())
    sys.argv[0] = "schemathesis"
    sys.exit(schemathesis())
