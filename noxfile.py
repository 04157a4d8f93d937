"""Developer sessions.  They run in the current environment (``venv_backend="none"``):
torch is a 5.5 GB install, done once by ``pip install -e ".[dev]"``, not once per session.

    nox -s tests          # the default test run (slow tests excluded)
    nox -s tests -- -m slow
    nox -s lint
    nox -s bench          # benchmark tables (benchmarks/*.py)
"""

import nox

nox.options.sessions = ["lint", "tests"]


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    # pytest exits with 5 when a selection collects no tests: not a failure
    session.run("python", "-m", "pytest", *session.posargs, success_codes=[0, 5])


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    session.run("ruff", "check", "mct_fx", "tests", "benchmarks", "noxfile.py")


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    session.run("python", "benchmarks/zoo_sqnr.py", *session.posargs)
    session.run("python", "benchmarks/ptq_time.py", *session.posargs)
