"""The Lambda package: the zip from ``sense package-lambda``, unpacked and
run by a bare Python against moto and VictoriaMetrics, and the rules the
packager follows (which modules, which distributions, which wheels),
judged with ``packaging`` on real ``.dist-info`` directories."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import orjson
from twisted.trial.unittest import SynchronousTestCase, TestCase

from sense_gateway.aws import package
from tests.servers import BIN, MotoServer, VictoriaMetrics
from tests.support import AWS_ENV, clean_environment

NOW = 1764300000
#: What the Lambda python3.11 runtime brings besides the standard library:
#: the AWS SDK and its dependencies (written out here, not taken from the
#: packager, so a packager that leaves out too much fails the test).
RUNTIME_DISTRIBUTIONS = ["boto3", "botocore", "jmespath", "python-dateutil", "s3transfer", "six",
                         "urllib3"]


def envelope(device: str, seq: int, value: float) -> bytes:
    return orjson.dumps({"v": 1, "id": f"{device}-{seq}", "device": device, "seq": seq,
                         "received": NOW + seq, "source": "[2001:db8::7]:5683", "transport": "coap",
                         "identity": None, "path": "/data", "cf": 50,
                         "readings": [{"m": "sense", "ts": NOW + seq, "f": {"t": value}, "t": {}}]})


class LambdaPackageTests(TestCase):
    """The zip, unpacked and imported by a Python that has nothing else."""

    timeout = 120

    def build(self, name: str) -> tuple[Path, str]:
        output = Path(self.mktemp()).resolve() / name
        result = subprocess.run([str(BIN / "sense"), "package-lambda", "--output", str(output)],
                                capture_output=True, text=True, timeout=120, env=clean_environment())
        self.assertEqual(result.returncode, 0, result.stderr)
        return output, result.stdout

    def test_zip_is_reproducible_prints_its_size_and_holds_no_twisted(self):
        first, out = self.build("a.zip")
        second, _ = self.build("b.zip")
        self.assertEqual(first.read_bytes(), second.read_bytes())
        size = first.stat().st_size
        self.assertIn(f"({size:,} bytes)", out)
        with zipfile.ZipFile(first) as archive:
            infos = archive.infolist()
        names = [i.filename for i in infos]
        self.assertEqual(names, sorted(names))
        self.assertEqual({(i.date_time, i.external_attr >> 16) for i in infos},
                         {((1980, 1, 1, 0, 0, 0), 0o100644)})
        tops = {n.split("/")[0] for n in names}
        for absent in ("twisted", "txthings", "boto3", "botocore", "urllib3", "sense_gateway_dropins"):
            self.assertNotIn(absent, tops)
        self.assertFalse([n for n in names if n.startswith(("sense_gateway/coap/", "sense_gateway/web/",
                                                             "sense_gateway/queues/"))])
        self.assertFalse([n for n in names if n.endswith(".pyc")])
        for needed in ("sense_gateway/aws/lambda_handler.py", "sense_gateway/sinks/influxdb.py",
                       "sense_gateway/registry/dynamodb.py", "pluggy/__init__.py",
                       "influxdb_client/__init__.py", "orjson/__init__.py"):
            self.assertIn(needed, names)

    def test_unpacked_zip_processes_an_sqs_event_against_moto_and_victoriametrics(self):
        moto = MotoServer(self)
        vm = VictoriaMetrics(self)
        zip_path, _ = self.build("sense-gateway-lambda.zip")
        code = Path(self.mktemp()).resolve()
        code.mkdir()
        with zipfile.ZipFile(zip_path) as archive:
            archive.extractall(code)
        runtime = self.runtime_libraries()

        sqs = moto.client("sqs")
        queue_url = sqs.create_queue(QueueName="sense")["QueueUrl"]
        moto.client("dynamodb").create_table(
            TableName="sense-devices", BillingMode="PAY_PER_REQUEST",
            KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}])
        for body in (envelope("node-1", 1, 0.5), envelope("node-1", 2, 1.0), envelope("node-2", 9, 4.5),
                     b"not an envelope"):
            sqs.send_message(QueueUrl=queue_url, MessageBody=body.decode())
        messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10,
                                       AttributeNames=["All"], WaitTimeSeconds=1)["Messages"]
        self.assertEqual(len(messages), 4)
        event = {"Records": [{
            "messageId": m["MessageId"], "receiptHandle": m["ReceiptHandle"], "body": m["Body"],
            "attributes": m["Attributes"], "messageAttributes": {}, "md5OfBody": m["MD5OfBody"],
            "eventSource": "aws:sqs", "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:sense",
            "awsRegion": "us-east-1"} for m in messages]}
        poison = next(m["MessageId"] for m in messages if m["Body"] == "not an envelope")

        # -I: no PYTHON* variables, no user site; -S: not even the
        # interpreter's own site-packages. Only the zip and the runtime's
        # libraries are on the path, as in Lambda.
        interpreter = getattr(sys, "_base_executable", None) or shutil.which("python3.11")
        child = subprocess.run(
            [interpreter, "-I", "-S", "-c", LAMBDA_INVOKE, str(code), str(runtime)],
            input=json.dumps(event), capture_output=True, text=True, timeout=120,
            env={"PATH": os.environ["PATH"], **AWS_ENV, "AWS_REGION": "us-east-1",
                 "SENSE_REGISTRY_BACKEND": "dynamodb", "SENSE_REGISTRY_TABLE": "sense-devices",
                 "SENSE_AWS_REGION": "us-east-1", "SENSE_AWS_ENDPOINT_URL": moto.url,
                 **vm.environment()})
        self.assertEqual(child.returncode, 0, child.stderr)
        result = json.loads(child.stdout)
        self.assertEqual(result["response"], {"batchItemFailures": [{"itemIdentifier": poison}]})
        self.assertEqual(result["outside"], [], "modules loaded from outside the zip, the runtime "
                                                "libraries and the standard library")
        self.assertFalse({"twisted", "txthings"} & set(result["loaded"]))

        points = vm.points()
        self.assertEqual(points[("sense_t", "node-1")], {(NOW + 1) * 1000: 0.5, (NOW + 2) * 1000: 1.0})
        self.assertEqual(points[("sense_t", "node-2")], {(NOW + 9) * 1000: 4.5})
        items = moto.client("dynamodb").scan(TableName="sense-devices")["Items"]
        self.assertEqual({i["id"]["S"]: (int(i["last_seq"]["N"]), int(i["received"]["N"])) for i in items},
                         {"node-1": (2, 2), "node-2": (9, 1)})

    def runtime_libraries(self) -> Path:
        """A directory holding only what the Lambda runtime provides (boto3
        and its dependencies), linked from this environment."""
        runtime = Path(self.mktemp()).resolve()
        runtime.mkdir()
        for name in RUNTIME_DISTRIBUTIONS:
            dist = importlib.metadata.distribution(name)
            tops = {Path(f).parts[0] for f in dist.files
                    if not Path(f).parts[0].endswith(".dist-info") and Path(f).parts[0] != ".."}
            for top in tops:
                source = Path(dist.locate_file(top))
                if source.exists() and top != "__pycache__":
                    (runtime / top).symlink_to(source)
        return runtime


class InstalledDistributions:
    """Distributions installed for one test: real ``.dist-info``
    directories (METADATA, WHEEL, RECORD) and modules in a directory put
    on ``sys.path``, where :mod:`importlib.metadata` finds them."""

    def __init__(self, testcase):
        self.site = Path(testcase.mktemp()).resolve()
        self.site.mkdir()
        sys.path.insert(0, str(self.site))
        testcase.addCleanup(sys.path.remove, str(self.site))
        testcase.addCleanup(importlib.invalidate_caches)

    def add(self, name: str, version: str, requires: tuple[str, ...] = (),
            tags: tuple[str, ...] = ("py3-none-any",)) -> importlib.metadata.Distribution:
        module = name.replace("-", "_")
        info = self.site / f"{module}-{version}.dist-info"
        info.mkdir()
        (self.site / module).mkdir()
        (self.site / module / "__init__.py").write_text("")
        (info / "METADATA").write_text("\n".join(
            ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
             *(f"Requires-Dist: {r}" for r in requires)]) + "\n")
        (info / "WHEEL").write_text("\n".join(
            ["Wheel-Version: 1.0", "Generator: hand", "Root-Is-Purelib: false",
             *(f"Tag: {t}" for t in tags)]) + "\n")
        (info / "RECORD").write_text(f"{module}/__init__.py,,\n{info.name}/METADATA,,\n"
                                     f"{info.name}/WHEEL,,\n{info.name}/RECORD,,\n")
        importlib.invalidate_caches()
        return importlib.metadata.distribution(name)


class PackagerRulesTests(SynchronousTestCase):
    """How the packager decides what goes into the zip."""

    def test_a_module_needing_twisted_stops_the_build(self):
        error = self.assertRaises(package.PackageError, package.handler_closure,
                                  ("sense_gateway.aws.lambda_handler", "sense_gateway.service"))
        self.assertIn("must not need Twisted or txthings", str(error))

    def test_handler_closure_is_the_processor_part_of_the_package(self):
        modules, third_party = package.handler_closure()
        self.assertIn("sense_gateway.processor", modules)
        self.assertIn("sense_gateway.registry.dynamodb", modules)
        self.assertFalse([m for m in modules if m.startswith(("sense_gateway.coap", "sense_gateway.web",
                                                              "sense_gateway.queues"))])
        self.assertLessEqual({"orjson", "pluggy", "influxdb_client", "boto3"}, third_party)

    def test_only_wheels_the_lambda_runtime_can_load_are_taken(self):
        fits = {
            "py3-none-any": True,
            "py2.py3-none-any": True,
            "cp311-cp311-manylinux_2_17_x86_64": True,
            "cp311-cp311-manylinux2014_x86_64": True,
            "cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64": True,
            "cp38-abi3-manylinux_2_24_x86_64": True,
            "cp311-cp311-manylinux_2_28_x86_64": False,  # newer glibc than Amazon Linux 2
            "cp311-cp311-musllinux_1_1_x86_64": False,
            "cp312-cp312-manylinux_2_17_x86_64": False,
            "cp312-abi3-manylinux_2_17_x86_64": False,  # needs 3.12's stable ABI
            "cp311-cp311-manylinux_2_17_aarch64": False,
            "cp311-cp311-macosx_11_0_arm64": False,
            "cp311-cp311-win_amd64": False,
        }
        for tag, expected in fits.items():
            self.assertEqual(package.wheel_fits([tag]), expected, tag)
        self.assertTrue(package.wheel_fits(["cp311-cp311-manylinux_2_17_aarch64"], "arm64"))
        self.assertFalse(package.wheel_fits(["cp311-cp311-manylinux1_x86_64"], "arm64"))

    def test_an_installed_wheel_built_for_another_platform_stops_the_build(self):
        site = InstalledDistributions(self)
        newer_glibc = site.add("demo-native", "1.0", tags=("cp311-cp311-manylinux_2_28_x86_64",))
        error = self.assertRaises(package.PackageError, package.dist_entries, newer_glibc, "x86_64")
        self.assertIn("demo-native 1.0 is installed for cp311-cp311-manylinux_2_28_x86_64, "
                      "not for Lambda (CPython 3.11, x86_64); build with --pip", str(error))
        fitting = site.add("demo-fitting", "1.0", tags=("cp311-cp311-manylinux_2_17_x86_64",
                                                        "cp311-cp311-manylinux2014_x86_64"))
        self.assertIn("demo_fitting/__init__.py", package.dist_entries(fitting, "x86_64"))
        self.assertRaises(package.PackageError, package.dist_entries, fitting, "arm64")

    def test_requirement_markers_are_judged_for_the_lambda_runtime(self):
        from packaging.requirements import Requirement

        cases = {
            'python_version < "3.8"': False,
            'python_version >= "3.8" and platform_machine == "x86_64"': True,
            'sys_platform == "win32" or (implementation_name == "cpython" and python_version == "3.11")': True,
            'extra == "test"': False,
            "platform_system != 'Windows'": True,
            'python_full_version >= "3.11.0" and python_version < "3.12"': True,
            # PEP 440's compatible release: >= 3.8.0 and == 3.8.*, not >= 3.8.0.
            'python_version ~= "3.8.0"': False,
            'python_version ~= "3.10"': True,
        }
        for marker, expected in cases.items():
            self.assertEqual(package.requirement_applies(Requirement(f"demo; {marker}")), expected, marker)
        self.assertFalse(package.requirement_applies(Requirement('demo; platform_machine == "x86_64"'),
                                                     "arm64"))

    def test_an_installed_version_outside_a_compatible_release_stops_the_build(self):
        site = InstalledDistributions(self)
        site.add("demo-app", "1.0", requires=("demo-lib~=2.1", 'demo-win; sys_platform == "win32"',
                                              'demo-extra; extra == "fast"'))
        site.add("demo-lib", "3.0")
        error = self.assertRaises(package.PackageError, package.distributions_for, {"demo_app"})
        self.assertEqual(str(error), "demo-app 1.0 requires demo-lib~=2.1, but demo-lib 3.0 is installed")

    def test_a_compatible_release_is_bundled_with_what_requires_it(self):
        site = InstalledDistributions(self)
        site.add("demo-app", "1.0", requires=("Demo.Lib~=2.1", 'demo-win; sys_platform == "win32"',
                                              'demo-extra; extra == "fast"', "boto3>=1"))
        site.add("demo-lib", "2.9")
        found = package.distributions_for({"demo_app"})
        # Neither the Windows-only nor the extra's requirement (not
        # installed: asking for them would fail), nor the runtime's boto3.
        self.assertEqual([(d.metadata["Name"], d.version) for d in found],
                         [("demo-app", "1.0"), ("demo-lib", "2.9")])


# Run by a bare interpreter: import the handler from the unpacked zip,
# invoke it with the event on stdin, report what was loaded from where.
LAMBDA_INVOKE = """
import json, sys, sysconfig
code, runtime = sys.argv[1], sys.argv[2]
sys.path[:0] = [code, runtime]
from sense_gateway.aws.lambda_handler import handler
response = handler(json.load(sys.stdin), None)
stdlib = sysconfig.get_path("stdlib")
outside = sorted(
    name for name, module in list(sys.modules.items())
    if getattr(module, "__file__", None)
    and not module.__file__.startswith((code, runtime, stdlib)))
print(json.dumps({"response": response, "outside": outside,
                  "loaded": sorted({n.split(".")[0] for n in sys.modules})}))
"""
