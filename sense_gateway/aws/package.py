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
3.11, manylinux up to glibc 2.26, the chosen architecture) and their
versions meet what requires them (requirements, markers and wheel tags
read with ``packaging``, as pip reads them); ``--pip``
fetches wheels built for that platform instead (same versions), for
building on another machine or for arm64.

    sense package-lambda [-o dist/sense-gateway-lambda.zip] [--architecture x86_64|arm64] [--pip]
"""

from __future__ import annotations

import argparse
import ast
import base64
import email
import functools
import hashlib
import importlib.metadata
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags, parse_tag
from packaging.utils import canonicalize_name

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
#: manylinux tags named for their glibc before PEP 600 (2014: PEP 599).
LEGACY_MANYLINUX = (("manylinux2014", (2, 17)), ("manylinux2010", (2, 12)), ("manylinux1", (2, 5)))
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

def target_environment(architecture: str = "x86_64") -> dict[str, str]:
    """The PEP 508 marker variables of the Lambda runtime (not of this
    machine): what a requirement's marker is evaluated against. The
    runtime's patch release is not known here: a marker asking for one
    is judged as for 3.11.0, which at worst bundles a backport."""
    return {
        "implementation_name": "cpython", "implementation_version": f"{PYTHON_VERSION}.0",
        "os_name": "posix", "platform_machine": ARCHITECTURES[architecture],
        "platform_release": "", "platform_system": "Linux", "platform_version": "",
        "python_full_version": f"{PYTHON_VERSION}.0", "platform_python_implementation": "CPython",
        "python_version": PYTHON_VERSION, "sys_platform": "linux",
    }


@functools.cache
def lambda_tags(architecture: str = "x86_64") -> frozenset[Tag]:
    """Every wheel tag the Lambda runtime can load: CPython 3.11 (its own
    ABI, the stable ABI of 3.2 to 3.11, or none) on manylinux up to Amazon
    Linux 2's glibc for the architecture, and pure Python."""
    machine = ARCHITECTURES[architecture]
    # manylinux_2_17 is the oldest glibc with an aarch64 wheel tag.
    oldest = 5 if machine == "x86_64" else 17
    platforms = [f"manylinux_{MAX_GLIBC[0]}_{minor}_{machine}"
                 for minor in range(MAX_GLIBC[1], oldest - 1, -1)]
    # The names PEP 599 and earlier gave glibc 2.17, 2.12 and 2.5.
    platforms += [f"{legacy}_{machine}" for legacy, glibc in LEGACY_MANYLINUX
                  if glibc <= MAX_GLIBC and (machine == "x86_64" or glibc >= (2, 17))]
    return frozenset(cpython_tags(PYTHON, platforms=platforms)) | frozenset(
        compatible_tags(PYTHON, CPYTHON_TAG, platforms))


def requirement_applies(requirement: Requirement, architecture: str = "x86_64") -> bool:
    """Whether the Lambda runtime needs *requirement* (extras left out)."""
    return requirement.marker is None or requirement.marker.evaluate(
        {**target_environment(architecture), "extra": ""})


def distributions_for(top_level: set[str], architecture: str = "x86_64") -> list[importlib.metadata.Distribution]:
    """The installed distributions providing *top_level* names and what they
    require (extras left out), without what the Lambda runtime provides.

    Raises :class:`PackageError` when an installed version does not meet
    what a distribution requires of it: the zip would not work.
    """
    providers = importlib.metadata.packages_distributions()
    wanted: list[tuple[str, Requirement | None, str]] = []
    for top in sorted(top_level):
        if top not in providers:
            raise PackageError(f"{top}: imported by the handler but no installed distribution provides it")
        wanted.extend((canonicalize_name(d), None, "the handler") for d in providers[top])
    found: dict[str, importlib.metadata.Distribution] = {}
    while wanted:
        name, requirement, required_by = wanted.pop()
        if name in RUNTIME_PROVIDED:
            continue
        dist = found.get(name)
        if dist is None:
            try:
                dist = importlib.metadata.distribution(name)
            except importlib.metadata.PackageNotFoundError:
                raise PackageError(f"{name}: required by {required_by} but not installed") from None
        if requirement is not None and not requirement.specifier.contains(dist.version, prereleases=True):
            raise PackageError(f"{required_by} requires {requirement}, but {dist.metadata['Name']} "
                               f"{dist.version} is installed")
        if name in found:
            continue
        found[name] = dist
        for line in dist.requires or ():
            try:
                required = Requirement(line)
            except InvalidRequirement as e:
                raise PackageError(f"{dist.metadata['Name']}: cannot read the requirement {line!r}: {e}") from None
            if requirement_applies(required, architecture):
                wanted.append((canonicalize_name(required.name), required,
                               f"{dist.metadata['Name']} {dist.version}"))
    return [found[name] for name in sorted(found)]


def wheel_fits(tags: list[str], architecture: str = "x86_64") -> bool:
    """Whether one of a wheel's tags (as in its WHEEL file, compressed tag
    sets allowed) runs on the Lambda runtime."""
    supported = lambda_tags(architecture)
    return any(not parse_tag(tag).isdisjoint(supported) for tag in tags)


def _wheel_tags(dist: importlib.metadata.Distribution) -> list[str]:
    # WHEEL is in the email header format, as METADATA is.
    return email.message_from_string(dist.read_text("WHEEL") or "").get_all("Tag", [])


def dist_entries(dist: importlib.metadata.Distribution, architecture: str) -> dict[str, Path]:
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
                third_party.update(dist_entries(dist, architecture))
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
