"""Run the fuzz targets of ``tests/fuzz_targets.py`` under atheris.

    python tests/fuzz.py [--seconds 60] [--target NAME ...] [--merge]

Each target runs in a process of its own (libFuzzer exits when it is
done) for ``--seconds``, instrumented (atheris' coverage of the
``sense_gateway`` modules and the example plugin), starting from its
kept inputs in ``tests/fuzz_corpus/NAME/`` (and the tokens of
``tests/fuzz_corpus/NAME.dict``, if there is one). New inputs it finds go to a
scratch directory; ``--merge`` adds to the kept corpus only those that
reach code the corpus does not (libFuzzer's ``-merge=1``), so it stays
small. An input that breaks the target's contract is written to
``var/fuzz/NAME-crash-*`` and the run fails naming it: add it to the
corpus (and a test saying what it broke) once it is fixed.

``make fuzz FUZZ_SECONDS=600`` runs every target; ``make test`` runs each
for a few seconds as a regression guard.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.fuzz_targets import CORPUS, REPO, TARGETS  # noqa: E402

ARTIFACTS = REPO / "var" / "fuzz"


def child(name: str, libfuzzer_args: list[str]) -> None:
    """In the fuzzing process: instrument, then hand over to libFuzzer."""
    import atheris

    with atheris.instrument_imports(include=["sense_gateway", "example_kv"]):
        from tests.fuzz_targets import target

        one_input = target(name)
        # Imported lazily inside the target; pull them in while instrumenting.
        if name != "coap-parse":
            from tests.fuzz_targets import _after_decode
            _after_decode()
    # libFuzzer starts its helpers (-merge) through the shell from argv[0]:
    # make that this interpreter running this script.
    atheris.Setup([f"{sys.executable} {Path(__file__).resolve()}", *libfuzzer_args], one_input)
    atheris.Fuzz()


def child_env(name: str) -> dict:
    # The target travels in the environment, not the command line: for
    # -merge, libFuzzer starts this script again with flags of its own.
    return {**os.environ, "PYTHONPATH": str(REPO), "FUZZ_TARGET": name}


def run_target(name: str, seconds: float, merge: bool) -> tuple[bool, str]:
    corpus = CORPUS / name
    corpus.mkdir(parents=True, exist_ok=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as scratch:
        args = [f"-max_total_time={max(1, int(seconds))}", "-max_len=1200", "-timeout=10",
                "-rss_limit_mb=1024", f"-artifact_prefix={ARTIFACTS}/{name}-",
                "-print_final_stats=1"]
        dictionary = CORPUS / f"{name}.dict"  # libFuzzer's tokens to splice in
        if dictionary.exists():
            args.append(f"-dict={dictionary}")
        args += [scratch, str(corpus)]
        started = time.monotonic()
        done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                              env=child_env(name))
        elapsed = time.monotonic() - started
        tail = done.stderr.strip().splitlines()[-40:]
        stats = " ".join(line.rsplit(":", 1)[1].strip() for line in tail
                         if line.startswith("stat::number_of_executed_units"))
        if done.returncode != 0:
            return False, "\n".join(tail)
        if merge:
            subprocess.run([sys.executable, __file__, "-merge=1", str(corpus), scratch],
                           capture_output=True, text=True, env=child_env(name))
        kept = sum(1 for p in corpus.iterdir() if p.is_file())
        return True, f"{stats or '?'} runs in {elapsed:.1f} s, corpus {kept} inputs"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("FUZZ_TARGET"):
        child(os.environ["FUZZ_TARGET"], argv)
        return 0
    p = argparse.ArgumentParser(prog="python tests/fuzz.py", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="per target (default 60)")
    p.add_argument("--target", action="append", choices=TARGETS,
                   help="only this target (repeatable; default every one)")
    p.add_argument("--merge", action="store_true",
                   help="keep the new inputs that add coverage in tests/fuzz_corpus/")
    args = p.parse_args(argv)
    failed = []
    for name in args.target or TARGETS:
        ok, report = run_target(name, args.seconds, args.merge)
        print(f"fuzz {name:<11} {'ok' if ok else 'FAILED'}: {report if ok else ''}", flush=True)
        if not ok:
            print(report, flush=True)
            failed.append(name)
    if failed:
        print(f"fuzz: {len(failed)} target(s) broke their contract: {', '.join(failed)} "
              f"(inputs in {ARTIFACTS})", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
