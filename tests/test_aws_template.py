"""``etc/aws/sense-gateway.yaml`` read as it is: cfn-lint finds nothing,
the deployment reads it as cfn-lint does, and it states the safe defaults
(those moto cannot show, such as the alarm, are checked here only)."""

from __future__ import annotations

import json
import subprocess

from twisted.trial.unittest import TestCase

from sense_gateway.aws import package, template
from sense_gateway.config import load_config
from tests.servers import BIN
from tests.support import REPO

TEMPLATE = REPO / "etc" / "aws" / "sense-gateway.yaml"


class TemplateTests(TestCase):
    timeout = 120

    def template(self) -> dict:
        from cfnlint.decode import decode

        document, errors = decode(str(TEMPLATE))
        self.assertEqual(errors, [])
        return document

    def test_cfn_lint_finds_nothing(self):
        result = subprocess.run([str(BIN / "cfn-lint"), "--format", "parseable", str(TEMPLATE)],
                                capture_output=True, text=True, timeout=120)
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, "", ""))

    def test_the_deployment_reads_the_template_as_cfn_lint_does(self):
        self.assertEqual(template.load_template(TEMPLATE.read_text()), self.template())

    def test_safe_defaults_are_stated(self):
        document = self.template()
        parameters = document["Parameters"]
        self.assertEqual({k: parameters[k]["Default"] for k in (
            "FunctionTimeout", "MaxReceiveCount", "MaximumConcurrency", "ReservedConcurrency",
            "MemorySize", "BatchSize", "InfluxDBApi")},
            {"FunctionTimeout": "60", "MaxReceiveCount": 5, "MaximumConcurrency": 5,
             "ReservedConcurrency": 5, "MemorySize": 256, "BatchSize": 10, "InfluxDBApi": "v2"})
        self.assertGreaterEqual(parameters["MaxReceiveCount"]["MinValue"], 5)
        # More than 10 needs a batching window, which would delay readings.
        self.assertEqual(parameters["BatchSize"]["MaxValue"], 10)
        self.assertTrue(parameters["InfluxDBToken"]["NoEcho"] and parameters["InfluxDBPassword"]["NoEcho"])
        # Every allowed function timeout maps to six times it.
        visibility = document["Mappings"]["VisibilityTimeout"]
        allowed = parameters["FunctionTimeout"]["AllowedValues"]
        self.assertEqual({int(t): visibility[t]["Seconds"] for t in allowed}, {int(t): 6 * int(t) for t in allowed})
        resources = document["Resources"]
        mapping = resources["QueueMapping"]["Properties"]
        self.assertEqual((mapping["BatchSize"], mapping["MaximumBatchingWindowInSeconds"],
                          mapping["FunctionResponseTypes"], mapping["ScalingConfig"]),
                         ({"Ref": "BatchSize"}, 0, ["ReportBatchItemFailures"],
                          {"MaximumConcurrency": {"Ref": "MaximumConcurrency"}}))
        function = resources["Function"]["Properties"]
        self.assertEqual((function["Runtime"], function["Handler"]), ("python3.11", package.HANDLER))
        alarm = resources["DeadLetterAlarm"]["Properties"]
        self.assertEqual({k: alarm[k] for k in ("Namespace", "MetricName", "Statistic", "Period", "Threshold",
                                                "ComparisonOperator", "TreatMissingData", "Dimensions")},
                         {"Namespace": "AWS/SQS", "MetricName": "ApproximateNumberOfMessagesVisible",
                          "Statistic": "Maximum", "Period": 300, "Threshold": 0,
                          "ComparisonOperator": "GreaterThanThreshold", "TreatMissingData": "notBreaching",
                          "Dimensions": [{"Name": "QueueName",
                                          "Value": {"Fn::GetAtt": ["DeadLetterQueue", "QueueName"]}}]})
        schedule = resources["LivenessSchedule"]["Properties"]
        self.assertEqual((schedule["ScheduleExpression"], json.loads(schedule["Targets"][0]["Input"])),
                         ("rate(1 minute)", {"sense": "sweep"}))

    def test_every_policy_names_its_actions_and_resources(self):
        resources = self.template()["Resources"]
        documents = [p["PolicyDocument"] for p in resources["FunctionRole"]["Properties"]["Policies"]]
        documents += [r["Properties"]["PolicyDocument"] for r in resources.values()
                      if r["Type"] == "AWS::IAM::ManagedPolicy"]
        self.assertEqual(len(documents), 3)
        for document in documents:
            for statement in document["Statement"]:
                self.assertEqual(statement["Effect"], "Allow")
                self.assertFalse([a for a in statement["Action"] if "*" in a], statement)
                self.assertNotIn('"*"', json.dumps(statement["Resource"]), statement)

    def test_the_function_variables_are_settings_the_gateway_accepts(self):
        document = self.template()
        variables = document["Resources"]["Function"]["Properties"]["Environment"]["Variables"]
        defaults = {name: str(spec.get("Default", "https://influx.example.org"))
                    for name, spec in document["Parameters"].items()}
        resolved = {name: value if isinstance(value, str) else defaults.get(value["Ref"], "resource-name")
                    for name, value in variables.items()}
        config = load_config(environ=resolved)
        self.assertEqual((config.registry.backend, config.influxdb.api), ("dynamodb", "v2"))
        self.assertEqual(template.environment_parameters(document)["SENSE_INFLUXDB_URL"], "InfluxDBUrl")
