"""What ``etc/aws/sense-gateway.yaml`` declares, read for the deployment:
its parameters (the values a change set gets, checked against the
template's own constraints) and the outputs gateways are configured from.
The resources themselves are only ever described by the template."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from sense_gateway.errors import ConfigError

TEMPLATE = Path(__file__).resolve().parents[2] / "etc" / "aws" / "sense-gateway.yaml"
#: The stack's outputs gateways are configured from, by variable.
GATEWAY_OUTPUTS = {"SENSE_AWS_QUEUE_URL": "QueueUrl", "SENSE_REGISTRY_TABLE": "DeviceTableName",
                   "SENSE_REGISTRY_CREDENTIALS_TABLE": "CredentialTableName"}


class _TemplateLoader(yaml.SafeLoader):
    """Reads CloudFormation's short forms (``!Ref X``, ``!Sub ...``) as the
    long ones (``{"Ref": "X"}``, ``{"Fn::Sub": ...}``)."""


def _intrinsic(loader: yaml.SafeLoader, function: str, node: yaml.Node) -> dict:
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if function == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {"Ref" if function == "Ref" else f"Fn::{function}": value}


_TemplateLoader.add_multi_constructor("!", _intrinsic)


def load_template(text: str) -> dict:
    return yaml.load(text, Loader=_TemplateLoader)  # noqa: S506 (a SafeLoader)


def environment_parameters(template: dict) -> dict[str, str]:
    """``{SENSE_* variable: parameter}`` for the function's variables the
    template takes straight from a parameter (``SENSE_INFLUXDB_URL: !Ref InfluxDBUrl``)."""
    variables = template["Resources"]["Function"]["Properties"]["Environment"]["Variables"]
    return {name: value["Ref"] for name, value in variables.items()
            if isinstance(value, dict) and value.get("Ref") in template["Parameters"]}


def _constraint_problem(spec: dict, value: str) -> str | None:
    if "AllowedValues" in spec and value not in [str(v) for v in spec["AllowedValues"]]:
        return "one of " + ", ".join(str(v) for v in spec["AllowedValues"])
    if spec.get("Type") == "Number":
        try:
            number = float(value)
        except ValueError:
            return "a number"
        if "MinValue" in spec and number < spec["MinValue"]:
            return f"at least {spec['MinValue']}"
        if "MaxValue" in spec and number > spec["MaxValue"]:
            return f"at most {spec['MaxValue']}"
        return None
    # CloudFormation matches a pattern against the whole value.
    if "AllowedPattern" in spec and not re.fullmatch(spec["AllowedPattern"], value):
        return spec.get("ConstraintDescription") or f"matching {spec['AllowedPattern']}"
    if len(value) < spec.get("MinLength", 0) or len(value) > spec.get("MaxLength", len(value)):
        return f"{spec.get('MinLength', 0)} to {spec.get('MaxLength')} characters"
    return None


def check_parameters(declared: dict, values: dict[str, str]) -> None:
    """Refuse, before anything is made, what CloudFormation would refuse
    (the template's constraints; moto checks none) and what it cannot
    express: a mapping allowed more concurrency than the function has."""
    problems = [f"{key}: must be {problem}, not {values[key]!r}" for key in values
                if (problem := _constraint_problem(declared[key], values[key]))]
    reserved, maximum = values.get("ReservedConcurrency", "0"), values.get("MaximumConcurrency", "0")
    if not problems and 0 < float(reserved) < float(maximum):
        problems.append(f"ReservedConcurrency ({reserved}) below MaximumConcurrency ({maximum}): "
                        "the event-source mapping would be throttled")
    if problems:
        raise ConfigError("; ".join(problems))


def stack_parameters(declared: dict, given: dict[str, str], previous: dict[str, str],
                     hints: dict[str, str]) -> tuple[list[dict], dict[str, str]]:
    """The change set's ``Parameters`` and the values known here.

    Every parameter is passed, so the same inputs always make the same
    request: given, else the stack's value (a ``NoEcho`` one, which
    CloudFormation does not show, as ``UsePreviousValue``), else the
    template's default.
    """
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ConfigError(f"{', '.join(unknown)}: not a parameter of the template "
                          f"(it has {', '.join(declared)})")
    parameters, values = [], {}
    for key, spec in declared.items():
        if key in given:
            value = given[key]
        elif key in previous and spec.get("NoEcho"):
            parameters.append({"ParameterKey": key, "UsePreviousValue": True})
            continue
        elif key in previous:
            value = previous[key]
        elif "Default" in spec:
            value = str(spec["Default"])
        else:
            raise ConfigError(f"{key}: the template needs a value ({hints.get(key, f'--parameter {key}=...')})")
        parameters.append({"ParameterKey": key, "ParameterValue": value})
        values[key] = value
    return parameters, values


def gateway_environment(outputs: dict[str, str], stack: str, region: str,
                        endpoint_url: str | None) -> list[str]:
    """``NAME=VALUE`` settings of a gateway sending to the stack's queue
    and reading its device directory; an output the stack does not (yet)
    report is named, never guessed."""
    found = {name: outputs.get(output) or f"<{output} of stack {stack}>"
             for name, output in GATEWAY_OUTPUTS.items()}
    lines = ["SENSE_QUEUE_BACKEND=sqs", f"SENSE_AWS_REGION={region}",
             f"SENSE_AWS_QUEUE_URL={found['SENSE_AWS_QUEUE_URL']}", "SENSE_REGISTRY_BACKEND=dynamodb",
             f"SENSE_REGISTRY_TABLE={found['SENSE_REGISTRY_TABLE']}",
             f"SENSE_REGISTRY_CREDENTIALS_TABLE={found['SENSE_REGISTRY_CREDENTIALS_TABLE']}"]
    if endpoint_url:
        lines.append(f"SENSE_AWS_ENDPOINT_URL={endpoint_url}")
    return lines
