"""``sense package-lambda``: the processor's AWS Lambda package, one zip.

The zip holds the part of ``sense_gateway`` the handler
(``sense_gateway.aws.lambda_handler.handler``) imports, found by reading
the imports of its modules and of every plugin in ``PROCESSOR_PLUGINS``,
and the third-party distributions those need, minus what the Lambda
Python runtime already has (boto3 and its dependencies). Twisted and
txthings are never in it: a module of the closure that imports them
stops the build.

Reproducible: the same sources and installed versions give the same
bytes (sorted entries, fixed timestamps and permissions, no byte code),
so a deployment can compare the zip's SHA-256 with the function's
``CodeSha256`` and leave an unchanged function alone.

Third-party files come from the distributions installed next to
``sense_gateway`` when their wheels fit the Lambda platform (CPython
3.11, manylinux up to glibc 2.26, the chosen architecture); ``--pip``
fetches wheels built for that platform instead (same versions), for
building on another machine or for arm64.

    sense package-lambda [-o dist/sense-gateway-lambda.zip] [--architecture x86_64|arm64] [--pip]
"""

from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import sense_gateway
from sense_gateway.plugins import PROCESSOR_PLUGINS

HANDLER_MODULE = "sense_gateway.aws.lambda_handler"
HANDLER = f"{HANDLER_MODULE}.handler"
DEFAULT_OUTPUT = Path("dist") / "sense-gateway-lambda.zip"

#: Distributions the Lambda python3.11 runtime provides (the AWS SDK and
#: what it depends on); bundling them would shadow the runtime's copies.
RUNTIME_PROVIDED = frozenset({"boto3", "botocore", "s3transfer", "jmespath",
                              "python-dateutil", "six", "urllib3"})
#: What the Lambda must never contain.
FORBIDDEN = frozenset({"twisted", "txthings"})
#: The Lambda runtime's interpreter and platform.
PYTHON = (3, 11)
PYTHON_VERSION = f"{PYTHON[0]}.{PYTHON[1]}"
CPYTHON_TAG = f"cp{PYTHON[0]}{PYTHON[1]}"
MAX_GLIBC = (2, 26)  # Amazon Linux 2
ARCHITECTURES = {"x86_64": "x86_64", "arm64": "aarch64"}

# 1980-01-01, the earliest time a zip entry can carry.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_FILE_MODE = 0o100644
# dist-info files that describe one installation, not the distribution.
_INSTALL_RECORDS = frozenset({"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"})


class PackageError(Exception):
    """The package cannot be built; the message says why."""


@dataclass(frozen=True)
class Package:
    path: Path
    size: int
    files: int
    sha256: str
    distributions: tuple[str, ...]

    @property
    def code_sha256(self) -> str:
        """The digest as Lambda reports it (``CodeSha256``: base64)."""
        return base64.b64encode(bytes.fromhex(self.sha256)).decode()


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# -- what the handler imports ------------------------------------------------

def _module_file(package_dir: Path, name: str) -> Path | None:
    parts = name.split(".")[1:]
    base = package_dir.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """Absolute names imported anywhere in *tree* (function bodies too),
    leaving out ``if TYPE_CHECKING:`` blocks."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = module.split(".")
                parent = parent[:len(parent) - node.level + (1 if is_package else 0)]
                base = ".".join(parent + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.append(base)
            # ``from package import submodule`` imports the submodule.
            names.extend(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def handler_closure(roots=(HANDLER_MODULE, *PROCESSOR_PLUGINS)) -> tuple[dict[str, Path], set[str]]:
    """``({module: file}, {third-party top-level names})`` the handler needs.

    Raises :class:`PackageError` when a module of the closure imports
    Twisted or txthings.
    """
    package_dir = Path(sense_gateway.__file__).parent
    modules: dict[str, Path] = {}
    third_party: dict[str, str] = {}
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in modules:
            continue
        path = _module_file(package_dir, name)
        if path is None:
            continue  # ``from package import function``: not a module
        modules[name] = path
        # A module needs its parent packages' __init__ too.
        parent = name.rpartition(".")[0]
        if parent:
            pending.append(parent)
        tree = ast.parse(path.read_bytes(), str(path))
        for imported in _imports(tree, name, path.name == "__init__.py"):
            top = imported.split(".")[0]
            if top == "sense_gateway":
                pending.append(imported)
            elif top in FORBIDDEN:
                raise PackageError(f"{name} imports {imported}: the Lambda package must not "
                                   f"need Twisted or txthings")
            elif top and top != "__future__" and top not in sys.stdlib_module_names:
                third_party.setdefault(top, name)
    return modules, set(third_party)


# -- which distributions, and are their wheels fit for Lambda ----------------

def _target_environment(architecture: str) -> dict[str, str]:
    return {
        "python_version": PYTHON_VERSION, "python_full_version": f"{PYTHON_VERSION}.0",
        "implementation_name": "cpython", "platform_python_implementation": "CPython",
        "sys_platform": "linux", "os_name": "posix", "platform_system": "Linux",
        "platform_machine": ARCHITECTURES[architecture], "extra": "",
    }


_MARKER_TOKEN = re.compile(r"""\s*(?:(?P<string>'[^']*'|"[^"]*")|(?P<op>===|==|!=|<=|>=|~=|<|>|not\s+in\b|in\b)"""
                           r"""|(?P<bool>and\b|or\b)|(?P<paren>[()])|(?P<name>[A-Za-z_.]+))""")


def _version_key(text: str):
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.]", text))


def marker_applies(marker: str, environment: dict[str, str]) -> bool:
    """Evaluate a PEP 508 environment marker for the Lambda runtime."""
    tokens = []
    position = 0
    marker = marker.strip()
    while position < len(marker):
        match = _MARKER_TOKEN.match(marker, position)
        if not match or match.end() == position:
            raise PackageError(f"cannot read the requirement marker {marker!r}")
        kind = match.lastgroup
        tokens.append((kind, " ".join(match.group(kind).split())))
        position = match.end()
    tokens.append(("end", ""))
    index = 0

    def take():
        nonlocal index
        index += 1
        return tokens[index - 1]

    def value():
        kind, text = take()
        if kind == "string":
            return text[1:-1]
        if kind == "name" and text in environment:
            return environment[text]
        raise PackageError(f"unknown marker variable {text!r} in {marker!r}")

    def comparison() -> bool:
        if tokens[index] == ("paren", "("):
            take()
            result = disjunction()
            take()
            return result
        left = value()
        _, op = take()
        right = value()
        if op in ("in", "not in"):
            return (left in right) == (op == "in")
        versioned = all(re.fullmatch(r"\d+(\.\d+)*", v) for v in (left, right))
        a, b = (_version_key(left), _version_key(right)) if versioned else (left, right)
        return {"==": a == b, "===": left == right, "!=": a != b, "<": a < b, "<=": a <= b,
                ">": a > b, ">=": a >= b, "~=": a >= b}[op]

    def conjunction() -> bool:
        result = comparison()
        while tokens[index] == ("bool", "and"):
            take()
            result = comparison() and result
        return result

    def disjunction() -> bool:
        result = conjunction()
        while tokens[index] == ("bool", "or"):
            take()
            result = conjunction() or result
        return result

    return disjunction()


def _requirement_name(requirement: str) -> tuple[str, str]:
    """``(normalized name, marker or "")`` of one Requires-Dist line."""
    spec, _, marker = requirement.partition(";")
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    if name is None:
        raise PackageError(f"cannot read the requirement {requirement!r}")
    return normalize(name.group(1)), marker.strip()


def distributions_for(top_level: set[str], architecture: str = "x86_64") -> list[importlib.metadata.Distribution]:
    """The installed distributions providing *top_level* names and what they
    require (extras left out), without what the Lambda runtime provides."""
    providers = importlib.metadata.packages_distributions()
    environment = _target_environment(architecture)
    wanted: list[str] = []
    for top in sorted(top_level):
        if top not in providers:
            raise PackageError(f"{top}: imported by the handler but no installed distribution provides it")
        wanted.extend(normalize(d) for d in providers[top])
    found: dict[str, importlib.metadata.Distribution] = {}
    while wanted:
        name = wanted.pop()
        if name in found or name in RUNTIME_PROVIDED:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise PackageError(f"{name}: required but not installed") from None
        found[name] = dist
        for requirement in dist.requires or ():
            required, marker = _requirement_name(requirement)
            if marker and not marker_applies(marker, environment):
                continue
            wanted.append(required)
    return [found[name] for name in sorted(found)]


def wheel_fits(tags: list[str], architecture: str = "x86_64") -> bool:
    """Whether one of a wheel's tags runs on the Lambda runtime."""
    machine = ARCHITECTURES[architecture]
    for tag in tags:
        try:
            python, abi, platform = tag.split("-")
        except ValueError:
            continue
        if platform == "any":
            if python in ("py3", f"py{PYTHON[0]}{PYTHON[1]}", CPYTHON_TAG) and abi == "none":
                return True
            continue
        same_python = python == CPYTHON_TAG and abi in (CPYTHON_TAG, "abi3", "none")
        stable_abi = (abi == "abi3" and re.fullmatch(r"cp3(\d+)", python) is not None
                      and int(python[3:]) <= PYTHON[1])
        if not (same_python or stable_abi):
            continue
        legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
        match = re.fullmatch(r"(manylinux1|manylinux2010|manylinux2014)_(\w+)", platform)
        if match:
            glibc, arch = legacy[match.group(1)], match.group(2)
        else:
            match = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", platform)
            if not match:
                continue
            glibc, arch = (int(match.group(1)), int(match.group(2))), match.group(3)
        if arch == machine and glibc <= MAX_GLIBC:
            return True
    return False


def _wheel_tags(dist: importlib.metadata.Distribution) -> list[str]:
    text = dist.read_text("WHEEL") or ""
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Tag:")]


def _dist_entries(dist: importlib.metadata.Distribution, architecture: str) -> dict[str, Path]:
    name = dist.metadata["Name"]
    tags = _wheel_tags(dist)
    if not wheel_fits(tags, architecture):
        raise PackageError(f"{name} {dist.version} is installed for {', '.join(tags) or 'an unknown platform'}, "
                           f"not for Lambda (CPython 3.11, {architecture}); build with --pip")
    if dist.files is None:
        raise PackageError(f"{name} {dist.version}: installed without a file list (RECORD)")
    entries = {}
    for file in dist.files:
        parts = PurePosixPath(file).parts
        if parts[0] == ".." or "__pycache__" in parts or file.suffix == ".pyc":
            continue  # scripts outside site-packages, byte code
        if parts[0].endswith(".dist-info") and parts[-1] in _INSTALL_RECORDS:
            continue
        entries[str(PurePosixPath(file))] = Path(dist.locate_file(file))
    return entries


def _pip_entries(dists, architecture: str, workdir: Path) -> dict[str, Path]:
    """The same distributions, as wheels for the Lambda platform."""
    target = workdir / "site"
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
               "--only-binary=:all:", "--implementation", "cp", "--python-version", PYTHON_VERSION,
               "--platform", f"manylinux2014_{ARCHITECTURES[architecture]}",
               "--target", str(target),
               *(f"{d.metadata['Name']}=={d.version}" for d in dists)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise PackageError(f"pip could not fetch the Lambda wheels: {result.stderr.strip()[-500:]}")
    entries = {}
    for path in sorted(target.rglob("*")):
        relative = path.relative_to(target)
        parts = relative.parts
        if (not path.is_file() or parts[0] == "bin" or "__pycache__" in parts
                or path.suffix == ".pyc"
                or (parts[0].endswith(".dist-info") and parts[-1] in _INSTALL_RECORDS)):
            continue
        entries[relative.as_posix()] = path
    return entries


# -- the zip -------------------------------------------------------------------

def write_zip(entries: dict[str, Path], output: Path) -> None:
    """Sorted entries, fixed time and mode, deflate level 9; atomic."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    with zipfile.ZipFile(partial, "w") as archive:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, _ZIP_TIME)
            info.create_system = 3  # Unix, so the mode below is honoured
            info.external_attr = _FILE_MODE << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, entries[name].read_bytes(), compresslevel=9)
    os.replace(partial, output)


def build(output: Path = DEFAULT_OUTPUT, architecture: str = "x86_64", use_pip: bool = False) -> Package:
    if architecture not in ARCHITECTURES:
        raise PackageError(f"--architecture: one of {', '.join(ARCHITECTURES)}, not {architecture!r}")
    modules, top_level = handler_closure()
    package_dir = Path(sense_gateway.__file__).parent
    entries = {f"sense_gateway/{path.relative_to(package_dir).as_posix()}": path
               for path in modules.values()}
    dists = distributions_for(top_level, architecture)
    with tempfile.TemporaryDirectory() as workdir:
        if use_pip:
            third_party = _pip_entries(dists, architecture, Path(workdir))
        else:
            third_party = {}
            for dist in dists:
                third_party.update(_dist_entries(dist, architecture))
        for name in third_party:
            if name.split("/")[0].split(".")[0].lower() in FORBIDDEN:
                raise PackageError(f"{name}: Twisted or txthings would be in the Lambda package")
            if name.startswith("sense_gateway/"):
                raise PackageError(f"{name}: a distribution brings its own sense_gateway files")
        entries.update(third_party)
        write_zip(entries, Path(output))
    data = Path(output).read_bytes()
    return Package(Path(output), len(data), len(entries), hashlib.sha256(data).hexdigest(),
                   tuple(f"{d.metadata['Name']} {d.version}" for d in dists))


def describe_size(size: int) -> str:
    return f"{size / 1e6:.1f} MB ({size:,} bytes)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sense package-lambda",
        description="Build the AWS Lambda zip of the processor (handler "
                    f"{HANDLER}, runtime python3.11).")
    parser.add_argument("--output", "-o", type=Path, default=DEFAULT_OUTPUT,
                        help=f"where to write the zip (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="x86_64",
                        help="the function's architecture (default: x86_64)")
    parser.add_argument("--pip", action="store_true",
                        help="fetch wheels for the Lambda platform with pip instead of "
                             "copying the installed distributions")
    parser.add_argument("--quiet", "-q", action="store_true", help="print only the zip's path")
    args = parser.parse_args(argv)
    try:
        package = build(args.output, args.architecture, args.pip)
    except (PackageError, OSError) as e:
        print(f"sense package-lambda: {e}", file=sys.stderr)
        return 1
    if args.quiet:
        print(package.path)
        return 0
    print(f"{package.path}: {describe_size(package.size)}, {package.files} files, "
          f"sha256 {package.sha256}")
    print(f"handler {HANDLER}, runtime python3.11, {args.architecture}")
    print(f"bundled: sense_gateway, {', '.join(package.distributions)}")
    print(f"from the runtime: {', '.join(sorted(RUNTIME_PROVIDED))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
